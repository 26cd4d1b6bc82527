"""Electromagnetic showers in a sampling calorimeter (Dr.Jit, no torch).

Physics: the GFLASH parametrisation of Grindhammer and Peters (hep-ex/0001020;
coefficients as tabulated in Geant4's ``GFlashSamplingShowerTuning``), evaluated
analytically per readout cell instead of by depositing spots:

* Geometry: ``n_layers`` identical sampling layers along the beam (z), each an
  absorber plate followed by an active plate; the front face is at z = 0 and the
  particle enters at normal incidence at (x0, y0). Consecutive layers are summed
  into longitudinal readout segments; transversely an ``n_cells x n_cells`` grid
  of square cells of side ``cell_size`` centred on the axis x = y = 0.
* Effective medium (GFLASH): volume-weighted 1/X0 and 1/R_M, mass-weighted Z,
  E_c = E_s X0 / R_M, sampling frequency F_s = X0_eff / (d_absorber + d_active),
  e/mip = 1 / (1 + 0.007 (Z_absorber - Z_active)).
* Longitudinal profile of the visible energy: a Gamma density in t = z / X0_eff,
  f(t) = beta^alpha t^(alpha-1) exp(-beta t) / Gamma(alpha), with shower maximum
  T = (alpha - 1) / beta. Per shower (ln T, ln alpha) is drawn from a correlated
  normal distribution whose means, widths and correlation depend on
  y = E / E_c, Z_eff, F_s and e/mip (shower-to-shower fluctuations).
* Lateral profile: f(r) = p 2r R_C^2/(r^2+R_C^2)^2 + (1-p) 2r R_T^2/(r^2+R_T^2)^2
  with R_C, R_T [R_M], p depending on E, Z_eff and tau = t/T (plus the sampling
  corrections). Its integral over a square cell is closed-form.
* Energy in cell c (visible = deposited in the active plates, GeV):
  mu_c = E * e/mip * f_mip * integral over the segment of f(t) L_c(t) dt
  (Gauss-Legendre in depth), f_mip = d_a S_a / (d_a S_a + d_p S_p) the sampling
  fraction for minimum-ionising particles, L_c the lateral fraction in the cell.
* Fluctuations of the measured cell energy: sampling fluctuations (compound
  Poisson in the number of active-plate crossings, Gaussian approximation) with
  variance q mu_c, q = e/mip * c_s^2 * d_active, which makes the stochastic term
  of a contained shower sigma/E = c_s sqrt(d_active[mm] / f_mip) / sqrt(E[GeV])
  (c_s = 0.027 GeV^1/2 mm^-1/2: the PDG calorimetry review's rule), plus
  Gaussian electronic noise ``noise`` [GeV] per readout cell.

All random numbers enter as standard normals (reparametrised): the cell energies
are differentiable almost everywhere in every continuous input, so Dr.Jit AD
gives pathwise gradients of expectations.

Layout: cell outputs are ``n_cells**2`` arrays with one lane per (shower, readout segment),
lane j is shower j // n_segments, segment j % n_segments; cell (ix, iy) is at index
ix * n_cells + iy (ix along x). Internally the depth integral runs one lane per (shower,
segment, quadrature node), then sums blocks of nodes: the kernel and its adjoint stay small
(fast LLVM/CUDA compilation) while every lane does the same work. Units: GeV, mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import drjit as dr
import numpy as np

from pyhybrid.kernels.backend import KernelTypes, check_integer, types_of

__all__ = ["E_S", "SAMPLING_COEFFICIENT", "MAX_LAYERS", "MAX_CELLS", "MAX_DEPTH_PER_NODE", "nodes_per_segment",
           "Material", "MATERIALS", "Design", "Segmentation", "EffectiveMedium", "ProfileDistribution",
           "effective_medium", "profile_distribution", "fluctuated_profile", "radial_profile", "square_fraction",
           "shower_normals", "cell_normals", "cell_means", "add_fluctuations", "cell_energies",
           "cell_energies_and_means", "cells_vjp"]

#: Scale energy E_s = m_e sqrt(4 pi / alpha) [GeV] (Moliere radius R_M = E_s X0 / E_c).
E_S = 0.0212052
#: Sampling-term coefficient c_s [GeV^1/2 mm^-1/2]: sigma/E = c_s sqrt(d_active / f_mip) / sqrt(E) (PDG).
SAMPLING_COEFFICIENT = 0.027


@dataclass(frozen=True)
class Material:
    """A calorimeter material (PDG atomic and nuclear properties).

    radiation_length X0 [mm], moliere_radius R_M [mm], atomic_number Z (mass-weighted
    for compounds), density [g/cm^3], mip_dedx: minimum-ionisation stopping power [MeV/mm].
    """

    name: str
    radiation_length: float
    moliere_radius: float
    atomic_number: float
    density: float
    mip_dedx: float

    @property
    def critical_energy(self) -> float:
        """E_c = E_s X0 / R_M [GeV]."""
        return E_S * self.radiation_length / self.moliere_radius


MATERIALS = {m.name: m for m in (
    Material("lead", 5.612, 16.02, 82.0, 11.35, 1.273),
    Material("tungsten", 3.504, 9.327, 74.0, 19.30, 2.210),
    Material("iron", 17.57, 17.19, 26.0, 7.874, 1.143),
    Material("copper", 14.36, 15.68, 29.0, 8.960, 1.257),
    Material("liquid_argon", 140.0, 90.43, 18.0, 1.396, 0.2105),
    Material("scintillator", 413.1, 94.06, 5.61, 1.060, 0.2175),  # polystyrene
    Material("silicon", 93.70, 49.43, 14.0, 2.329, 0.3876),
)}


@dataclass
class Design:
    """Calorimeter design parameters: floats or 1-lane Dr.Jit arrays (differentiable).

    Thicknesses and lengths in mm, densities in g/cm^3, ``*_mip_dedx`` in MeV/mm
    (only their ratio matters), ``noise`` in GeV of visible energy per readout
    cell, ``sampling_coefficient`` c_s in GeV^1/2 mm^-1/2.
    """

    absorber_thickness: Any
    active_thickness: Any
    absorber_radiation_length: Any
    absorber_moliere_radius: Any
    absorber_atomic_number: Any
    absorber_density: Any
    absorber_mip_dedx: Any
    active_radiation_length: Any
    active_moliere_radius: Any
    active_atomic_number: Any
    active_density: Any
    active_mip_dedx: Any
    cell_size: Any
    noise: Any
    sampling_coefficient: Any

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_materials(cls, absorber: Material, active: Material, *, absorber_thickness: float,
                       active_thickness: float, cell_size: float, noise: float = 0.0,
                       sampling_coefficient: float = SAMPLING_COEFFICIENT) -> "Design":
        """The design of ``absorber`` and ``active`` layers; the absorber must not have a lower Z than
        the active material: the e/mip ratio 1 / (1 + 0.007 (Z_abs - Z_act)) describes the
        suppressed response of high-Z absorbers only (the reverse would give the active layers
        more than the deposited energy)."""
        if absorber.atomic_number < active.atomic_number:
            raise ValueError(f"the absorber ({absorber.name}, Z = {absorber.atomic_number:g}) must not have a lower Z "
                             f"than the active material ({active.name}, Z = {active.atomic_number:g})")
        return cls(absorber_thickness, active_thickness,
                   absorber.radiation_length, absorber.moliere_radius, absorber.atomic_number,
                   absorber.density, absorber.mip_dedx,
                   active.radiation_length, active.moliere_radius, active.atomic_number,
                   active.density, active.mip_dedx, cell_size, noise, sampling_coefficient)

    @classmethod
    def from_columns(cls, columns) -> "Design":
        if len(columns) != len(fields(cls)):
            raise ValueError(f"a Design needs {len(fields(cls))} columns {cls.field_names()}, got {len(columns)}")
        return cls(*columns)

    def columns(self) -> list:
        return [getattr(self, name) for name in self.field_names()]


#: Limits of :class:`Segmentation` (compile time grows fast with the cells; memory with the layers).
MAX_LAYERS, MAX_CELLS = 1000, 15
#: Deepest span [radiation lengths] one Gauss-Legendre node of the depth integral may cover (a
#: 40 X0 segment with 6 nodes was 3 % non-linear and up to 2x too wide in resolution; 3.3 X0 per
#: node is accurate to 1e-3).
MAX_DEPTH_PER_NODE = 2.5


def nodes_per_segment(segment_depth: float, minimum: int) -> int:
    """Gauss-Legendre nodes for a readout segment ``segment_depth`` radiation lengths deep: at least
    ``minimum``, and at least one per :data:`MAX_DEPTH_PER_NODE`."""
    return max(int(minimum), math.ceil(float(segment_depth) / MAX_DEPTH_PER_NODE))


@dataclass(frozen=True)
class Segmentation:
    """Static readout geometry: ``n_layers`` (at most 1000) sampling layers summed in groups of
    ``layers_per_segment``; ``n_cells x n_cells`` transverse cells, n_cells at most 15 (each cell
    is an output of the compiled kernel: 15 compile in seconds, 25 take minutes)."""

    n_layers: int
    layers_per_segment: int = 1
    n_cells: int = 5

    def __post_init__(self):
        for name, largest in (("n_layers", MAX_LAYERS), ("layers_per_segment", None), ("n_cells", MAX_CELLS)):
            object.__setattr__(self, name, check_integer(getattr(self, name), name, 1, largest))
        if self.n_layers % self.layers_per_segment:
            raise ValueError(f"n_layers ({self.n_layers}) must be a multiple of layers_per_segment "
                             f"({self.layers_per_segment})")

    @property
    def n_segments(self) -> int:
        return self.n_layers // self.layers_per_segment

    @property
    def cells_per_segment(self) -> int:
        return self.n_cells * self.n_cells


@dataclass
class EffectiveMedium:
    """GFLASH effective quantities of one absorber + active layer.

    radiation_length, moliere_radius, layer_thickness [mm]; critical_energy [GeV];
    atomic_number Z_eff; sampling_frequency F_s = X0_eff / layer thickness;
    e_over_mip = 1/(1 + 0.007 (Z_abs - Z_act)); mip_fraction f_mip;
    visible_fraction = e_over_mip * f_mip (visible / incident energy of a contained shower).
    """

    radiation_length: Any
    moliere_radius: Any
    critical_energy: Any
    atomic_number: Any
    layer_thickness: Any
    sampling_frequency: Any
    e_over_mip: Any
    mip_fraction: Any
    visible_fraction: Any


def effective_medium(design: Design) -> EffectiveMedium:
    """Effective material of the sampling structure (GFLASH, hep-ex/0001020 sec. 4)."""
    d_abs, d_act = design.absorber_thickness, design.active_thickness
    layer = d_abs + d_act
    volume_abs, volume_act = d_abs / layer, d_act / layer
    mass_abs, mass_act = d_abs * design.absorber_density, d_act * design.active_density
    weight_abs = mass_abs / (mass_abs + mass_act)
    radiation_length = 1.0 / (volume_abs / design.absorber_radiation_length
                              + volume_act / design.active_radiation_length)
    moliere_radius = 1.0 / (volume_abs / design.absorber_moliere_radius
                            + volume_act / design.active_moliere_radius)
    atomic_number = weight_abs * design.absorber_atomic_number + (1.0 - weight_abs) * design.active_atomic_number
    e_over_mip = 1.0 / (1.0 + 0.007 * (design.absorber_atomic_number - design.active_atomic_number))
    loss_act = d_act * design.active_mip_dedx
    mip_fraction = loss_act / (loss_act + d_abs * design.absorber_mip_dedx)
    return EffectiveMedium(
        radiation_length=radiation_length,
        moliere_radius=moliere_radius,
        critical_energy=E_S * radiation_length / moliere_radius,
        atomic_number=atomic_number,
        layer_thickness=layer,
        sampling_frequency=radiation_length / layer,
        e_over_mip=e_over_mip,
        mip_fraction=mip_fraction,
        visible_fraction=e_over_mip * mip_fraction,
    )


# ---------------------------------------------------------------- longitudinal profile


@dataclass
class ProfileDistribution:
    """Normal distribution of (ln T, ln alpha) of the visible-energy profile, T in X0_eff."""

    mean_log_t: Any
    mean_log_alpha: Any
    sigma_log_t: Any
    sigma_log_alpha: Any
    correlation: Any


def _inverse_linear_width(intercept, slope, log_y):
    """GFLASH width 1 / (intercept + slope ln y), capped at 0.5 as in Geant4 (also where it diverges)."""
    denominator = intercept + slope * log_y
    return dr.select(denominator > 2.0, 1.0 / dr.maximum(denominator, 2.0), 0.5)


def profile_distribution(energy, medium: EffectiveMedium) -> ProfileDistribution:
    """(ln T, ln alpha) distribution for incident energy ``energy`` [GeV] in ``medium``.

    Homogeneous means <ln T> = ln(ln y - 0.812), <ln alpha> = ln(0.81 + (0.458 + 2.26/Z) ln y),
    shifted for sampling: T -> T - 0.55/F_s - 0.69 (1 - e/mip), alpha -> alpha - 0.476/F_s;
    widths 1/(-2.5 + 1.25 ln y), 1/(-0.82 + 0.79 ln y); correlation 0.784 - 0.023 ln y.
    Valid for y = E/E_c >~ 50 (E >~ 0.5 GeV in lead-based calorimeters).
    """
    log_y = dr.log(energy / medium.critical_energy)
    t_homogeneous = dr.maximum(log_y - 0.812, 0.1)
    alpha_homogeneous = dr.maximum(0.81 + (0.458 + 2.26 / medium.atomic_number) * log_y, 0.1)
    t_sampling = t_homogeneous - 0.55 / medium.sampling_frequency - 0.69 * (1.0 - medium.e_over_mip)
    alpha_sampling = alpha_homogeneous - 0.476 / medium.sampling_frequency
    return ProfileDistribution(
        mean_log_t=dr.log(dr.maximum(t_sampling, 0.1)),
        mean_log_alpha=dr.log(dr.maximum(alpha_sampling, 1.1)),
        sigma_log_t=_inverse_linear_width(-2.5, 1.25, log_y),
        sigma_log_alpha=_inverse_linear_width(-0.82, 0.79, log_y),
        correlation=0.784 - 0.023 * log_y,
    )


def fluctuated_profile(distribution: ProfileDistribution, z1, z2):
    """One shower's (T, alpha, beta) from two independent standard normals z1, z2.

    T >= 1 and alpha >= 1.1 as in Geant4; beta = (alpha - 1) / T [1/X0_eff].
    """
    c1 = dr.sqrt(0.5 * (1.0 + distribution.correlation))
    c2 = dr.sqrt(0.5 * (1.0 - distribution.correlation))
    shower_max = dr.maximum(dr.exp(distribution.mean_log_t + distribution.sigma_log_t * (c1 * z1 + c2 * z2)), 1.0)
    alpha = dr.maximum(dr.exp(distribution.mean_log_alpha + distribution.sigma_log_alpha * (c1 * z1 - c2 * z2)), 1.1)
    return shower_max, alpha, (alpha - 1.0) / shower_max


# ---------------------------------------------------------------- lateral profile


def radial_profile(energy, medium: EffectiveMedium, tau):
    """GFLASH radial parameters at relative depth ``tau``: (R_C [mm], R_T [mm], core weight p)."""
    log_e = dr.log(energy)
    z = medium.atomic_number
    one_minus_e = 1.0 - medium.e_over_mip
    inverse_fs = 1.0 / medium.sampling_frequency
    core = (0.0251 + 0.00319 * log_e) + (0.1162 - 0.000381 * z) * tau
    core += -0.0203 * one_minus_e + 0.0397 * inverse_fs * dr.exp(-tau)
    k2 = 0.645
    tail = (0.659 - 0.00309 * z) * (dr.exp(-2.59 * (tau - k2)) + dr.exp((0.3585 + 0.0412 * log_e) * (tau - k2)))
    tail += -0.14 * one_minus_e - 0.495 * inverse_fs * dr.exp(-tau)
    x = ((0.401 + 0.00187 * z) - tau) / (1.313 - 0.0686 * log_e)
    weight = (2.632 - 0.00094 * z) * dr.exp(x - dr.exp(x))
    weight += one_minus_e * (0.348 - 0.642 * inverse_fs * dr.exp(-(tau - 1.0) * (tau - 1.0)))
    radius_floor = 1e-3
    return (dr.maximum(core, radius_floor) * medium.moliere_radius,
            dr.maximum(tail, radius_floor) * medium.moliere_radius,
            dr.clip(weight, 0.0, 1.0))


def square_fraction(u, v, radius):
    """Fraction of the profile 2r R^2/(r^2+R^2)^2 dr in the quadrant [0, u] x [0, v] (odd in u and v).

    F(u, v) = [u/a atan(v/a) + v/b atan(u/b)] / (2 pi), a = sqrt(u^2+R^2), b = sqrt(v^2+R^2);
    a cell's fraction is F(u2,v2) - F(u1,v2) - F(u2,v1) + F(u1,v1).
    """
    a = dr.sqrt(u * u + radius * radius)
    b = dr.sqrt(v * v + radius * radius)
    return (u / a * dr.atan(v / a) + v / b * dr.atan(u / b)) * (0.5 / math.pi)


# ---------------------------------------------------------------- random numbers


def shower_normals(types: KernelTypes, n_showers: int, seed: int):
    """Two standard normals per shower (stream 0): the (ln T, ln alpha) fluctuations."""
    rng = types.rng(n_showers, seed, stream=0)
    z1 = types.normal(rng)
    return z1, types.normal(rng)


def cell_normals(types: KernelTypes, n_lanes: int, cells_per_segment: int, seed: int) -> list:
    """One standard normal per readout cell (stream 1), ``n_lanes`` (shower, segment) lanes."""
    rng = types.rng(n_lanes, seed, stream=1)
    return [types.normal(rng) for _ in range(cells_per_segment)]


# ---------------------------------------------------------------- cells


def _expand(value, types: KernelTypes, block: int, n_lanes: int):
    """Per-shower array -> one entry per lane of a shower's block of ``block`` lanes (1-lane values stay)."""
    value = types.Float(value)
    if block == 1 or dr.width(value) == 1:
        return value
    return dr.gather(types.Float, value, dr.arange(types.UInt32, n_lanes) // block)


def _node_contributions(energy, impact_x, impact_y, z1, z2, design: Design, segmentation: Segmentation,
                        quadrature_points: int, n_lanes: int) -> list:
    """Quadrature-node terms of the cell means, one lane per (shower, segment, node).

    Per-shower inputs are given per lane (or 1-lane). Summing blocks of
    ``quadrature_points`` lanes gives :func:`cell_means`. One lane per node keeps the
    kernel (and its adjoint) small: the lateral integrals are the bulk of the work.
    """
    types = types_of(energy)
    lane = dr.arange(types.UInt32, n_lanes)
    q = quadrature_points
    nodes, weights = np.polynomial.legendre.leggauss(q)
    node = lane % q
    segment = types.Float((lane // q) % segmentation.n_segments)
    node_position = dr.gather(types.Float, types.Float(0.5 * (nodes + 1.0)), node)
    node_weight = dr.gather(types.Float, types.Float(0.5 * weights), node)

    medium = effective_medium(design)
    distribution = profile_distribution(energy, medium)
    _, alpha, beta = fluctuated_profile(distribution, z1, z2)
    mean_alpha = dr.exp(distribution.mean_log_alpha)
    # tau = t / <t>_shower * (<t> / T)_average shower (Geant4 GFlash)
    tau_per_depth = beta / alpha * mean_alpha / (mean_alpha - 1.0)

    segment_depth = segmentation.layers_per_segment * medium.layer_thickness / medium.radiation_length
    t = (segment + node_position) * segment_depth
    density = dr.exp(alpha * dr.log(beta) - dr.lgamma(alpha) + (alpha - 1.0) * dr.log(t) - beta * t)
    core, tail, core_weight = radial_profile(energy, medium, t * tau_per_depth)

    n = segmentation.n_cells
    edges = [(i - 0.5 * n) * design.cell_size for i in range(n + 1)]
    u = [e - impact_x for e in edges]
    v = [e - impact_y for e in edges]
    corner = [[core_weight * square_fraction(ui, vj, core) + (1.0 - core_weight) * square_fraction(ui, vj, tail)
               for vj in v] for ui in u]
    scale = energy * medium.visible_fraction * segment_depth * node_weight * density
    return [scale * (corner[ix + 1][iy + 1] - corner[ix][iy + 1] - corner[ix + 1][iy] + corner[ix][iy])
            for ix in range(n) for iy in range(n)]


def _widths(segmentation: Segmentation, quadrature_points: int, *per_shower) -> tuple[int, int]:
    """(number of showers, number of (shower, segment, node) lanes)."""
    n_showers = max(dr.width(a) for a in per_shower)
    return n_showers, n_showers * segmentation.n_segments * quadrature_points


def cell_means(energy, impact_x, impact_y, design: Design, z1, z2, segmentation: Segmentation,
               quadrature_points: int = 6) -> list:
    """Expected visible energy [GeV] per readout cell, given each shower's profile fluctuation.

    energy [GeV], impact_x, impact_y [mm], z1, z2 (standard normals; zeros give the
    mean profile): arrays of N showers (or 1-lane). Returns ``n_cells**2`` arrays of
    N * n_segments lanes (module docstring). Depth integrals per segment use
    ``quadrature_points``-point Gauss-Legendre.
    """
    types = types_of(energy)
    _, n_lanes = _widths(segmentation, quadrature_points, energy, impact_x, impact_y, z1, z2)
    block = segmentation.n_segments * quadrature_points
    lanes = [_expand(a, types, block, n_lanes) for a in (energy, impact_x, impact_y, z1, z2)]
    terms = _node_contributions(*lanes, design, segmentation, quadrature_points, n_lanes)
    dr.eval(terms)  # one kernel for all cells; the block sums are then cheap reductions
    return [dr.block_sum(term, quadrature_points) for term in terms]


def add_fluctuations(means: list, design: Design, normals: list) -> list:
    """Measured cell energies: mean + sqrt(q mean + noise^2) * normal, q = e/mip c_s^2 d_active [GeV]."""
    medium = effective_medium(design)
    quantum = medium.e_over_mip * design.sampling_coefficient ** 2 * design.active_thickness
    noise2 = design.noise * design.noise
    tiny = 1e-30
    return [m + dr.sqrt(dr.maximum(quantum * m + noise2, tiny)) * z for m, z in zip(means, normals)]


def cell_energies(energy, impact_x, impact_y, design: Design, segmentation: Segmentation, seed: int,
                  quadrature_points: int = 6) -> list:
    """Simulated visible energy [GeV] per readout cell for N showers (all fluctuations on).

    Same inputs and layout as :func:`cell_means`; random numbers from ``seed``
    (streams 0 and 1 of :class:`KernelTypes.rng`), so a call is reproducible.
    """
    return cell_energies_and_means(energy, impact_x, impact_y, design, segmentation, seed, quadrature_points)[0]


def cell_energies_and_means(energy, impact_x, impact_y, design: Design, segmentation: Segmentation, seed: int,
                            quadrature_points: int = 6) -> tuple[list, list]:
    """:func:`cell_energies` and the shower's expected cell energies (:func:`cell_means` with its
    shower-to-shower fluctuations) that they fluctuate around: keep the latter for :func:`cells_vjp`,
    which otherwise computes them again (the heaviest kernel of a call)."""
    types = types_of(energy)
    n_showers = max(dr.width(a) for a in (energy, impact_x, impact_y))
    z1, z2 = shower_normals(types, n_showers, seed)
    means = cell_means(energy, impact_x, impact_y, design, z1, z2, segmentation, quadrature_points)
    normals = cell_normals(types, n_showers * segmentation.n_segments, segmentation.cells_per_segment, seed)
    return add_fluctuations(means, design, normals), means


def _leaves(values, types: KernelTypes, block: int, n_lanes: int) -> list:
    """Detached per-lane copies of ``values`` with gradient tracking (leaves of an adjoint pass)."""
    leaves = []
    for value in values:
        lane = _expand(dr.detach(types.Float(value)), types, block, n_lanes)
        if dr.width(lane) != n_lanes:
            lane = dr.gather(types.Float, lane, dr.zeros(types.UInt32, n_lanes))
        leaves.append(lane)
    dr.eval(leaves)
    for leaf in leaves:
        dr.enable_grad(leaf)
    return leaves


def _backward(outputs: list, cotangents: list, leaves: list) -> list:
    """Reverse-mode AD from ``outputs`` seeded with ``cotangents``; evaluated gradients of ``leaves``."""
    for output, cotangent in zip(outputs, cotangents):
        dr.set_grad(output, cotangent)
        dr.enqueue(dr.ADMode.Backward, output)
    dr.traverse(dr.ADMode.Backward)
    grads = [dr.grad(leaf) for leaf in leaves]
    dr.eval(grads)
    return grads


def cells_vjp(grad_cells: list, energy, impact_x, impact_y, design: Design, segmentation: Segmentation,
              quadrature_points: int = 6, *, seed: int | None = None, normals=None, means=None) -> dict:
    """Vector-Jacobian product of :func:`cell_energies` (``seed`` given) or :func:`cell_means`
    (``normals=(z1, z2)`` given) with cotangents ``grad_cells`` (one array per cell, as the outputs).
    ``means``: with ``seed``, the expected cells of that call (:func:`cell_energies_and_means`), else
    computed again here.

    Reverse-mode Dr.Jit AD on per-lane copies of every input, so that each adjoint pass is one
    fused kernel without reductions inside: first through the fluctuations (per segment lane),
    then through the quadrature-node terms (per node lane); gradients are then summed per shower
    and, for the design, over all lanes. Returns ``{"energy", "impact_x", "impact_y", "z1", "z2":
    arrays of the input widths, "design": list of 1-lane arrays in Design field order}``.
    """
    if (seed is None) == (normals is None):
        raise ValueError("give exactly one of seed (simulated cells) or normals (expected cells)")
    types = types_of(energy)
    n_showers, n_lanes = _widths(segmentation, quadrature_points, energy, impact_x, impact_y)
    z1, z2 = shower_normals(types, n_showers, seed) if seed is not None else normals
    design_grads = [0.0] * len(design.columns())

    if seed is not None:  # adjoint of add_fluctuations: cotangents of the means, design gradients
        n_segment_lanes = n_showers * segmentation.n_segments
        if means is None:
            means = cell_means(*(dr.detach(types.Float(a)) for a in (energy, impact_x, impact_y)), design,
                               z1, z2, segmentation, quadrature_points)
        mean_leaves = _leaves(means, types, 1, n_segment_lanes)
        design_leaves = _leaves(design.columns(), types, 1, n_segment_lanes)
        cells = add_fluctuations(mean_leaves, Design.from_columns(design_leaves),
                                 cell_normals(types, n_segment_lanes, segmentation.cells_per_segment, seed))
        grads = _backward(cells, grad_cells, mean_leaves + design_leaves)
        grad_cells = grads[:len(mean_leaves)]
        design_grads = [dr.sum(g) for g in grads[len(mean_leaves):]]

    block = segmentation.n_segments * quadrature_points
    per_shower = {"energy": energy, "impact_x": impact_x, "impact_y": impact_y, "z1": z1, "z2": z2}
    shower_leaves = _leaves(per_shower.values(), types, block, n_lanes)
    design_leaves = _leaves(design.columns(), types, block, n_lanes)
    terms = _node_contributions(*shower_leaves, Design.from_columns(design_leaves), segmentation,
                                quadrature_points, n_lanes)
    to_node = dr.arange(types.UInt32, n_lanes) // quadrature_points
    cotangents = [dr.gather(types.Float, g, to_node) for g in grad_cells]
    grads = _backward(terms, cotangents, shower_leaves + design_leaves)

    result = {}
    for (name, value), grad in zip(per_shower.items(), grads):
        result[name] = dr.sum(grad) if dr.width(value) == 1 else dr.block_sum(grad, block)
    result["design"] = [previous + dr.sum(g) for previous, g in zip(design_grads, grads[len(shower_leaves):])]
    return result
