"""Torch-eager reference of the GFLASH sampling calorimeter (test reference and benchmark baseline).

Deliberately plain: the formulas of Grindhammer & Peters (hep-ex/0001020, Geant4
GFlashSamplingShowerTuning coefficients) written out once more on dense tensors
of shape (N showers, S segments, Q quadrature nodes, corners), independently of
the Dr.Jit kernel in ``pyhybrid/kernels/calorimeter.py``. Units: GeV, mm.

``design`` is a dict of 0-d tensors with the keys of :data:`DESIGN_FIELDS`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

E_S = 0.0212052  # GeV
DESIGN_FIELDS = ("absorber_thickness", "active_thickness", "absorber_radiation_length", "absorber_moliere_radius",
                 "absorber_atomic_number", "absorber_density", "absorber_mip_dedx", "active_radiation_length",
                 "active_moliere_radius", "active_atomic_number", "active_density", "active_mip_dedx", "cell_size",
                 "noise", "sampling_coefficient")


def effective_medium(d: dict) -> dict:
    layer = d["absorber_thickness"] + d["active_thickness"]
    f_abs = d["absorber_thickness"] / layer
    f_act = d["active_thickness"] / layer
    m_abs = d["absorber_thickness"] * d["absorber_density"]
    m_act = d["active_thickness"] * d["active_density"]
    x0 = 1.0 / (f_abs / d["absorber_radiation_length"] + f_act / d["active_radiation_length"])
    rm = 1.0 / (f_abs / d["absorber_moliere_radius"] + f_act / d["active_moliere_radius"])
    z = (m_abs * d["absorber_atomic_number"] + m_act * d["active_atomic_number"]) / (m_abs + m_act)
    ehat = 1.0 / (1.0 + 0.007 * (d["absorber_atomic_number"] - d["active_atomic_number"]))
    s_act = d["active_thickness"] * d["active_mip_dedx"]
    f_mip = s_act / (s_act + d["absorber_thickness"] * d["absorber_mip_dedx"])
    return {"x0": x0, "rm": rm, "ec": E_S * x0 / rm, "z": z, "layer": layer, "fs": x0 / layer, "ehat": ehat,
            "f_mip": f_mip, "visible": ehat * f_mip}


def _width(a, b, log_y):
    denominator = a + b * log_y
    return torch.where(denominator > 2.0, 1.0 / denominator.clamp(min=2.0), torch.full_like(log_y, 0.5))


def profile(energy, m: dict, normals):
    """Per shower: (T, alpha, beta, exp<ln alpha>) of the visible-energy Gamma profile."""
    log_y = torch.log(energy / m["ec"])
    t_hom = (log_y - 0.812).clamp(min=0.1)
    a_hom = (0.81 + (0.458 + 2.26 / m["z"]) * log_y).clamp(min=0.1)
    mean_log_t = torch.log((t_hom - 0.55 / m["fs"] - 0.69 * (1 - m["ehat"])).clamp(min=0.1))
    mean_log_a = torch.log((a_hom - 0.476 / m["fs"]).clamp(min=1.1))
    rho = 0.784 - 0.023 * log_y
    c1, c2 = torch.sqrt((1 + rho) / 2), torch.sqrt((1 - rho) / 2)
    z1, z2 = normals[:, 0], normals[:, 1]
    t_max = torch.exp(mean_log_t + _width(-2.5, 1.25, log_y) * (c1 * z1 + c2 * z2)).clamp(min=1.0)
    alpha = torch.exp(mean_log_a + _width(-0.82, 0.79, log_y) * (c1 * z1 - c2 * z2)).clamp(min=1.1)
    return t_max, alpha, (alpha - 1) / t_max, torch.exp(mean_log_a)


def radial(energy, m: dict, tau):
    """GFLASH R_C, R_T [mm] and core weight p; energy broadcast against tau."""
    log_e, z, one_minus_e, inv_fs = torch.log(energy), m["z"], 1 - m["ehat"], 1 / m["fs"]
    rc = 0.0251 + 0.00319 * log_e + (0.1162 - 0.000381 * z) * tau - 0.0203 * one_minus_e \
        + 0.0397 * inv_fs * torch.exp(-tau)
    k4 = 0.3585 + 0.0412 * log_e
    rt = (0.659 - 0.00309 * z) * (torch.exp(-2.59 * (tau - 0.645)) + torch.exp(k4 * (tau - 0.645))) \
        - 0.14 * one_minus_e - 0.495 * inv_fs * torch.exp(-tau)
    x = (0.401 + 0.00187 * z - tau) / (1.313 - 0.0686 * log_e)
    p = (2.632 - 0.00094 * z) * torch.exp(x - torch.exp(x)) \
        + one_minus_e * (0.348 - 0.642 * inv_fs * torch.exp(-(tau - 1) ** 2))
    return rc.clamp(min=1e-3) * m["rm"], rt.clamp(min=1e-3) * m["rm"], p.clamp(0.0, 1.0)


def quadrant(u, v, r):
    a, b = torch.sqrt(u * u + r * r), torch.sqrt(v * v + r * r)
    return (u / a * torch.atan(v / a) + v / b * torch.atan(u / b)) / (2 * math.pi)


def cell_means(energy, impact, design: dict, shower_normals, n_layers: int, layers_per_segment: int,
               n_cells: int, quadrature_points: int):
    """Expected visible energy per cell [GeV], shape (N, S, n_cells, n_cells)."""
    m = effective_medium(design)
    t_max, alpha, beta, mean_alpha = profile(energy, m, shower_normals)
    n_seg = n_layers // layers_per_segment
    x, w = np.polynomial.legendre.leggauss(quadrature_points)
    x = torch.as_tensor(x, dtype=energy.dtype, device=energy.device)
    w = torch.as_tensor(w, dtype=energy.dtype, device=energy.device)
    depth = layers_per_segment * m["layer"] / m["x0"]
    seg = torch.arange(n_seg, dtype=energy.dtype, device=energy.device)
    t = (seg[:, None] + 0.5 * (x[None, :] + 1)) * depth  # (S, Q)
    a, b = alpha[:, None, None], beta[:, None, None]
    density = torch.exp(a * torch.log(b) - torch.lgamma(a) + (a - 1) * torch.log(t) - b * t)  # (N, S, Q)
    tau = t * (b / a) * (mean_alpha / (mean_alpha - 1))[:, None, None]
    rc, rt, p = radial(energy[:, None, None], m, tau)
    edges = (torch.arange(n_cells + 1, dtype=energy.dtype, device=energy.device) - 0.5 * n_cells) * design["cell_size"]
    u = (edges[None, :] - impact[:, :1])[:, None, None, :, None]  # (N, 1, 1, n+1, 1)
    v = (edges[None, :] - impact[:, 1:])[:, None, None, None, :]
    rc, rt, p = rc[..., None, None], rt[..., None, None], p[..., None, None]
    corner = p * quadrant(u, v, rc) + (1 - p) * quadrant(u, v, rt)  # (N, S, Q, n+1, n+1)
    cells = corner[..., 1:, 1:] - corner[..., :-1, 1:] - corner[..., 1:, :-1] + corner[..., :-1, :-1]
    weight = 0.5 * depth * w * density  # (N, S, Q)
    return energy[:, None, None, None] * m["visible"] * (weight[..., None, None] * cells).sum(2)


def add_fluctuations(means, design: dict, cell_normals):
    m = effective_medium(design)
    quantum = m["ehat"] * design["sampling_coefficient"] ** 2 * design["active_thickness"]
    variance = (quantum * means + design["noise"] ** 2).clamp(min=1e-30)
    return means + torch.sqrt(variance) * cell_normals


def simulate(energy, impact, design: dict, n_layers: int, layers_per_segment: int, n_cells: int,
             quadrature_points: int, generator: torch.Generator | None = None):
    """Cell energies with torch's own random numbers (benchmark baseline)."""
    n = energy.shape[0]
    shower_normals = torch.randn(n, 2, dtype=energy.dtype, device=energy.device, generator=generator)
    means = cell_means(energy, impact, design, shower_normals, n_layers, layers_per_segment, n_cells,
                       quadrature_points)
    cell_normals = torch.randn(means.shape, dtype=energy.dtype, device=energy.device, generator=generator)
    return add_fluctuations(means, design, cell_normals)
