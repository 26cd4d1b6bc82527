"""Differentiable sampling calorimeter as a torch module (GFLASH showers, Dr.Jit kernel).

``SamplingCalorimeter`` maps electron/photon energies and impact points to
simulated cell energies; its design quantities (plate thicknesses, materials'
X0 and R_M, cell size, noise, ...) are ``nn.Parameter`` s or buffers, so a loss
on the cell energies back-propagates to the detector design. The physics and
the random model are described in :mod:`pyhybrid.kernels.calorimeter`.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pyhybrid import engine
from pyhybrid.kernels import calorimeter as kernel
from pyhybrid.kernels.backend import check_integer, check_seed, name_tuple
from pyhybrid.kernels.calorimeter import MATERIALS, Design, Material, Segmentation

__all__ = ["SamplingCalorimeter", "Material", "MATERIALS"]

_POSITIVE = ("absorber_thickness", "active_thickness", "absorber_radiation_length", "absorber_moliere_radius",
             "absorber_atomic_number", "absorber_density", "absorber_mip_dedx", "active_radiation_length",
             "active_moliere_radius", "active_atomic_number", "active_density", "active_mip_dedx", "cell_size",
             "sampling_coefficient")
_MEDIUM_FIELDS = ("radiation_length", "moliere_radius", "critical_energy", "atomic_number", "layer_thickness",
                  "sampling_frequency", "e_over_mip", "mip_fraction", "visible_fraction")
#: Lowest accepted incident energy [GeV] (the GFLASH fits start around 1 GeV).
MIN_ENERGY = 0.1


def _simulate(energy, impact, design, *, segmentation, seed, quadrature_points):
    x, y = impact
    cells, means = kernel.cell_energies_and_means(energy, x, y, Design.from_columns(design), segmentation, seed,
                                                  quadrature_points)
    return cells, (energy, impact, design, means)  # the means (evaluated already): the VJP need not recompute them


def _simulate_vjp(saved, grad_outputs, needs, *, segmentation, seed, quadrature_points):
    energy, (x, y), design, means = saved
    grads = kernel.cells_vjp(grad_outputs[0], energy, x, y, Design.from_columns(design), segmentation,
                             quadrature_points, seed=seed, means=means)
    return grads["energy"], (grads["impact_x"], grads["impact_y"]), grads["design"]


def _expected(energy, impact, normals, design, *, segmentation, quadrature_points):
    x, y = impact
    z1, z2 = normals
    cells = kernel.cell_means(energy, x, y, Design.from_columns(design), z1, z2, segmentation, quadrature_points)
    return cells, (energy, impact, normals, design)


def _expected_vjp(saved, grad_outputs, needs, *, segmentation, quadrature_points):
    energy, (x, y), normals, design = saved
    grads = kernel.cells_vjp(grad_outputs[0], energy, x, y, Design.from_columns(design), segmentation,
                             quadrature_points, normals=normals)
    return (grads["energy"], (grads["impact_x"], grads["impact_y"]), (grads["z1"], grads["z2"]),
            grads["design"])


def _medium(design):
    medium = kernel.effective_medium(Design.from_columns(design))
    return tuple(getattr(medium, name) for name in _MEDIUM_FIELDS)


# Supplied VJPs: reverse AD on per-lane input copies keeps the backward pass one fused kernel
# (the generic path would reduce every broadcast design parameter in a kernel of its own).
_simulate_fn = engine.kernel_function(_simulate, vjp=_simulate_vjp)
_expected_fn = engine.kernel_function(_expected, vjp=_expected_vjp)
_medium_fn = engine.kernel_function(_medium)


def _material(value: str | Material) -> Material:
    if isinstance(value, Material):
        return value
    if value not in MATERIALS:
        raise ValueError(f"unknown material {value!r}; known: {sorted(MATERIALS)} (or pass a Material)")
    return MATERIALS[value]


class SamplingCalorimeter(nn.Module):
    """Sampling calorimeter of ``n_layers`` absorber + active layers with an ``n_cells x n_cells`` readout.

    Parameters
    ----------
    absorber, active: material names from :data:`MATERIALS` or :class:`Material` s.
    absorber_thickness, active_thickness: plate thicknesses [mm].
    n_layers, layers_per_segment: sampling layers, summed in readout segments of this many layers.
    n_cells, cell_size: transverse readout grid (cells per side) and cell side [mm], centred on x = y = 0.
    noise: electronic noise per readout cell [GeV of visible energy].
    sampling_coefficient: c_s in sigma/E = c_s sqrt(d_active[mm]/f_mip)/sqrt(E) [GeV^1/2 mm^-1/2].
    trainable: names of :class:`Design` fields that become ``nn.Parameter`` s (the rest are buffers),
        e.g. ``("absorber_thickness", "active_thickness", "absorber_radiation_length")``.
    quadrature_points: Gauss-Legendre points per readout segment for the depth integral (at least;
        deep segments get one per 2.5 radiation lengths, see :func:`kernel.nodes_per_segment`).
    dtype: float32 or float64 of the design tensors (inputs must match it).

    Every design quantity is an attribute (``calo.absorber_thickness`` ...), a 0-d tensor.
    """

    def __init__(self, absorber: str | Material = "lead", active: str | Material = "scintillator", *,
                 absorber_thickness: float = 2.0, active_thickness: float = 4.0, n_layers: int = 20,
                 layers_per_segment: int = 1, n_cells: int = 5, cell_size: float = 30.0, noise: float = 0.0,
                 sampling_coefficient: float = kernel.SAMPLING_COEFFICIENT,
                 trainable: Iterable[str] = ("absorber_thickness", "active_thickness"),
                 quadrature_points: int = 6, dtype: torch.dtype = torch.float32):
        super().__init__()
        engine.check_kernel_dtype(dtype)
        self.segmentation = Segmentation(n_layers, layers_per_segment, n_cells)
        self.quadrature_points = check_integer(quadrature_points, "quadrature_points", 1, 32)
        design = Design.from_materials(_material(absorber), _material(active),
                                       absorber_thickness=absorber_thickness, active_thickness=active_thickness,
                                       cell_size=cell_size, noise=noise, sampling_coefficient=sampling_coefficient)
        trainable = name_tuple(trainable)
        unknown = set(trainable) - set(Design.field_names())
        if unknown:
            raise ValueError(f"trainable names {sorted(unknown)} are not design fields {Design.field_names()}")
        for name, value in zip(Design.field_names(), design.columns()):
            tensor = torch.tensor(float(value), dtype=dtype)
            if name in trainable:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self._check_design()

    # ------------------------------------------------------------ design

    def design_tensor(self) -> torch.Tensor:
        """All design quantities as one (1, 15) tensor in :meth:`Design.field_names` order."""
        return torch.stack([getattr(self, name) for name in Design.field_names()]).unsqueeze(0)

    def _check_design(self) -> None:
        for name in _POSITIVE:
            value = float(getattr(self, name).detach())
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be positive and finite, got {value}")
        noise = float(self.noise.detach())
        if not math.isfinite(noise) or noise < 0.0:
            raise ValueError(f"noise must be finite and >= 0, got {noise}")

    def medium(self) -> dict[str, torch.Tensor]:
        """Effective-medium quantities (0-d tensors, differentiable in the design):
        radiation_length, moliere_radius, layer_thickness [mm], critical_energy [GeV], atomic_number,
        sampling_frequency, e_over_mip, mip_fraction, visible_fraction."""
        self._check_design()
        values = _medium_fn(self.design_tensor())
        return {name: value.reshape(()) for name, value in zip(_MEDIUM_FIELDS, values)}

    def visible_fraction(self) -> torch.Tensor:
        """Visible / incident energy of a contained shower, e/mip * f_mip (calibration constant)."""
        return self.medium()["visible_fraction"]

    def stochastic_term(self) -> torch.Tensor:
        """Predicted sampling term a [GeV^1/2] of sigma/E = a/sqrt(E) for contained showers:
        c_s sqrt(d_active / f_mip)."""
        return self.sampling_coefficient * torch.sqrt(self.active_thickness / self.medium()["mip_fraction"])

    def depth(self) -> torch.Tensor:
        """Total depth [mm]."""
        return self.segmentation.n_layers * (self.absorber_thickness + self.active_thickness)

    def depth_in_radiation_lengths(self) -> torch.Tensor:
        """Total depth in radiation lengths."""
        return self.segmentation.n_layers * (self.absorber_thickness / self.absorber_radiation_length
                                             + self.active_thickness / self.active_radiation_length)

    # ------------------------------------------------------------ simulation

    def _inputs(self, energy: torch.Tensor, impact: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        design = self.design_tensor()
        energy, impact = (engine.autocast_input(t, design.dtype) for t in (energy, impact))
        energy = engine.check_tensor(energy, "energy", shape=(None,), dtype=design.dtype, device=design.device)
        if bool((energy < MIN_ENERGY).any()):
            raise ValueError(f"energy must be >= {MIN_ENERGY} GeV (GFLASH validity), got min {float(energy.min())}")
        if impact is None:
            impact = torch.zeros(energy.shape[0], 2, dtype=energy.dtype, device=energy.device)
        impact = engine.check_tensor(impact, "impact", shape=(energy.shape[0], 2), dtype=design.dtype,
                                     device=design.device)
        self._check_design()
        return energy, impact

    def _nodes_per_segment(self) -> int:
        segment_depth = float(self.depth_in_radiation_lengths().detach()) / self.segmentation.n_segments
        return kernel.nodes_per_segment(segment_depth, self.quadrature_points)

    def _empty_cells(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The cells of no showers (N = 0), in the graph of the inputs and the design."""
        s = self.segmentation
        return engine.empty_batch((0, s.n_segments, s.n_cells, s.n_cells), *inputs, self.design_tensor())

    def _cells(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        s = self.segmentation
        return flat.reshape(n, s.n_segments, s.n_cells, s.n_cells)

    @engine.eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, energy: torch.Tensor, impact: torch.Tensor | None = None, *,
                seed: int | None = None) -> torch.Tensor:
        """Simulated visible energy per cell [GeV], shape (N, n_segments, n_cells, n_cells).

        energy: (N,) incident electron/photon energies [GeV] (>= 0.1); impact: (N, 2) entry
        point (x, y) [mm] (default: the axis). ``seed`` fixes the random numbers (common random
        numbers across calls); by default it is drawn from torch's generator. Cell (i, j) spans
        x in cell_size * [i - n/2, i + 1 - n/2], y likewise with j.
        """
        energy, impact = self._inputs(energy, impact)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if energy.shape[0] == 0:
            return self._empty_cells(energy, impact)
        flat = _simulate_fn(energy, impact, self.design_tensor(), segmentation=self.segmentation,
                            seed=check_seed(seed), quadrature_points=self._nodes_per_segment())
        return self._cells(flat, energy.shape[0])

    @engine.eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def expected_cells(self, energy: torch.Tensor, impact: torch.Tensor | None = None,
                       shower_normals: torch.Tensor | None = None) -> torch.Tensor:
        """Expected cell energies [GeV] without sampling fluctuations and noise (deterministic).

        shower_normals: (N, 2) standard normals fixing each shower's (ln T, ln alpha)
        fluctuation; zeros (default) give the average profile. Shape (N, n_segments, n_cells, n_cells).
        """
        energy, impact = self._inputs(energy, impact)
        if shower_normals is None:
            shower_normals = torch.zeros_like(impact)
        shower_normals = engine.check_tensor(shower_normals, "shower_normals", shape=(energy.shape[0], 2),
                                             dtype=energy.dtype, device=energy.device)
        if energy.shape[0] == 0:
            return self._empty_cells(energy, impact, shower_normals)
        flat = _expected_fn(energy, impact, shower_normals, self.design_tensor(), segmentation=self.segmentation,
                            quadrature_points=self._nodes_per_segment())
        return self._cells(flat, energy.shape[0])

    def extra_repr(self) -> str:
        s = self.segmentation
        trainable = [name for name, _ in self.named_parameters(recurse=False)]
        return (f"n_layers={s.n_layers}, layers_per_segment={s.layers_per_segment}, n_cells={s.n_cells}, "
                f"trainable={trainable}")
