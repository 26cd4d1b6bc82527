"""Detector-design objectives: optimise the detector together with its reconstruction.

Calorimeter (:class:`CalorimeterDesign`): a :class:`~pyhybrid.nn.calorimeter.SamplingCalorimeter`
simulates showers, an :class:`EnergyRegression` network reconstructs their energy, and the
objective

    J(theta, w) = < ((E_reco(w; cells(theta)) - E) / E)^2 >  +  cost_weight * cost(theta)

(mean squared relative error over a log-uniform energy spectrum plus a material cost) is minimised
jointly over the design parameters theta and the network weights w with pathwise
(reparametrised) gradients through the Dr.Jit shower kernel (:func:`train_jointly`). The optimum
of the design alone is min_w J, which :func:`grid_scan` evaluates on a grid by training the
network at every point, with common random numbers.

Tracker (:class:`TrackerDesign`): a barrel of silicon layers whose radii, thicknesses and hit
resolutions are parameters. The covariance of the perigee parameters of a linearised
least-squares track fit, C = (H^T V^-1 H)^-1, uses the measurement Jacobians H of the
differentiable propagator (:mod:`pyhybrid.nn.propagator`) and a hit covariance V that adds to
the hit resolutions the multiple-scattering correlations (Highland) of every layer's material;
momentum and impact-parameter resolutions and the material budget are differentiable in the design.

Units: GeV, mm, rad, Tesla; costs in the caller's currency per unit area.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from pyhybrid import engine
from pyhybrid.kernels.backend import check_integer, name_tuple
from pyhybrid.kernels.material import MATERIALS as TRACKER_MATERIALS
from pyhybrid.kernels.material import highland_theta0
from pyhybrid.kernels.propagation import PARTICLES
from pyhybrid.nn.calorimeter import SamplingCalorimeter
from pyhybrid.nn.propagator import CylinderLayer, Propagator, UniformField
from pyhybrid.nn.hybrid import perigee_to_free as perigee_components

__all__ = ["EnergyRegression", "relative_resolution", "material_cost", "CalorimeterDesign", "History",
           "train_jointly", "fit_regression", "evaluate", "grid_scan", "fit_resolution_terms", "PERIGEE_NAMES",
           "perigee_to_free", "TrackerDesign"]


class EnergyRegression(nn.Module):
    """Energy regression from calorimeter cells: calibrated sum times a learned shape correction.

    E_reco = S (1 + MLP(f, log S)), S = sum(cells) / visible_fraction (the design's calibration),
    f = cells / sum(cells) (the shower shape, which carries the leakage information). The last layer
    starts at zero, so an untrained network returns the calibrated sum.

    cells: (N, n_segments, n_cells, n_cells) [GeV]; visible_fraction: 0-d tensor. Returns (N,) [GeV].
    """

    def __init__(self, n_segments: int, n_cells: int, hidden: int = 32):
        super().__init__()
        self.n_segments, self.n_cells = n_segments, n_cells
        n_inputs = n_segments * n_cells * n_cells + 1
        self.mlp = nn.Sequential(nn.Linear(n_inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, cells: torch.Tensor, visible_fraction: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        engine.check_tensor(cells, "cells", shape=(None, self.n_segments, self.n_cells, self.n_cells),
                            dtype=weight.dtype, device=weight.device)
        engine.check_tensor(visible_fraction, "visible_fraction", shape=(), dtype=weight.dtype)
        if not float(visible_fraction.detach()) > 0:
            raise ValueError(f"visible_fraction must be positive, got {float(visible_fraction.detach())}")
        flat = cells.flatten(1)
        visible = flat.sum(1, keepdim=True)
        calibrated = visible / visible_fraction
        shape = flat / visible.abs().clamp(min=1e-6)
        features = torch.cat([shape, torch.log(calibrated.clamp(min=1e-3))], dim=1)
        return (calibrated * (1.0 + self.mlp(features))).squeeze(1)


def relative_resolution(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Root-mean-square relative error sqrt(<((predicted - true) / true)^2>) (bias included)."""
    if true.numel() == 0:
        raise ValueError("the resolution of an empty batch is undefined: pass at least one energy")
    return torch.sqrt((((predicted - true) / true) ** 2).mean())


def material_cost(calo: SamplingCalorimeter, absorber_price: float, active_price: float) -> torch.Tensor:
    """Material cost per unit area: n_layers * (absorber_price * d_absorber + active_price * d_active),
    prices per mm of plate."""
    return calo.segmentation.n_layers * (absorber_price * calo.absorber_thickness
                                         + active_price * calo.active_thickness)


class CalorimeterDesign(nn.Module):
    """Joint objective of a calorimeter design and its energy regression (module docstring).

    Parameters
    ----------
    calorimeter: the simulated detector; its ``nn.Parameter`` s are the design parameters.
    regression: reconstruction network (default: :class:`EnergyRegression` for its segmentation).
    energy_range: incident energies are log-uniform in this range [GeV].
    cost_weight, absorber_price, active_price: J = resolution^2 + cost_weight * :func:`material_cost`.
    bounds: ``{parameter name: (low, high)}`` box for :meth:`project` (low < high; low > 0, or >= 0
        for ``noise``; high may be inf). Design parameters without bounds are kept at or above 1 % of
        their starting value (``noise``: at or above 0), so that no step makes the design unphysical.
    """

    def __init__(self, calorimeter: SamplingCalorimeter, regression: nn.Module | None = None, *,
                 energy_range: tuple[float, float] = (2.0, 100.0), cost_weight: float = 0.0,
                 absorber_price: float = 1.0, active_price: float = 1.0,
                 bounds: Mapping[str, tuple[float, float]] | None = None):
        super().__init__()
        low, high = energy_range
        if not 0.1 <= low <= high:
            raise ValueError(f"energy_range must satisfy 0.1 <= low <= high [GeV], got {energy_range}")
        self.calorimeter = calorimeter
        s = calorimeter.segmentation
        if isinstance(regression, EnergyRegression) and (regression.n_segments, regression.n_cells) != (
                s.n_segments, s.n_cells):
            raise ValueError(f"regression is an EnergyRegression for {regression.n_segments} segments of "
                             f"{regression.n_cells}x{regression.n_cells} cells, the calorimeter has {s.n_segments} of "
                             f"{s.n_cells}x{s.n_cells}")
        self.regression = regression if regression is not None else EnergyRegression(s.n_segments, s.n_cells)
        self.regression.to(dtype=calorimeter.absorber_thickness.dtype, device=calorimeter.absorber_thickness.device)
        self.energy_range = (float(low), float(high))
        for name, value in (("cost_weight", cost_weight), ("absorber_price", absorber_price),
                            ("active_price", active_price)):
            # a negative price would reward material without bound; NaN would make every loss NaN
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.cost_weight, self.absorber_price, self.active_price = (float(v) for v in (cost_weight, absorber_price,
                                                                                        active_price))
        self.bounds = _design_bounds(calorimeter, dict(bounds or {}))

    def design_parameters(self) -> list[nn.Parameter]:
        return list(self.calorimeter.parameters())

    def design_values(self) -> dict[str, float]:
        return {name: float(p.detach()) for name, p in self.calorimeter.named_parameters()}

    def sample_energies(self, n: int, generator: torch.Generator) -> torch.Tensor:
        low, high = self.energy_range
        dtype = self.calorimeter.absorber_thickness.dtype
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        energy = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return energy.to(dtype=dtype, device=self.calorimeter.absorber_thickness.device)

    def cost(self) -> torch.Tensor:
        return material_cost(self.calorimeter, self.absorber_price, self.active_price)

    def forward(self, energy: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Objective on showers of ``energy`` [GeV] with random numbers ``seed``:
        ``{"loss", "resolution", "cost"}`` (0-d tensors; loss = resolution^2 + cost_weight * cost)."""
        cells = self.calorimeter(energy, seed=seed)
        predicted = self.regression(cells, self.calorimeter.visible_fraction())
        resolution = relative_resolution(predicted, energy)
        cost = self.cost()
        return {"loss": resolution ** 2 + self.cost_weight * cost, "resolution": resolution, "cost": cost}

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the design parameters into their ``bounds`` (after each optimiser step)."""
        for name, (low, high) in self.bounds.items():
            self.calorimeter.get_parameter(name).clamp_(low, high)


def _design_bounds(calorimeter: SamplingCalorimeter, given: dict) -> dict:
    """The bounds of every design parameter: the given ones, checked, and the default floors."""
    parameters = dict(calorimeter.named_parameters())
    unknown = set(given) - set(parameters)
    if unknown:
        raise ValueError(f"bounds given for {sorted(unknown)}, which are not design parameters {sorted(parameters)}")
    bounds = {}
    for name, parameter in parameters.items():
        positive = name != "noise"  # every design field is positive, the noise may be 0
        if name not in given:
            bounds[name] = (0.01 * float(parameter.detach()) if positive else 0.0, math.inf)
            continue
        low, high = (float(v) for v in given[name])
        if not (math.isfinite(low) and low < high and (low > 0 if positive else low >= 0)):
            raise ValueError(f"bounds of {name} must be (low, high) with {'0 <' if positive else '0 <='} low < high, "
                             f"got {given[name]}")
        bounds[name] = (low, high)
    return bounds


@dataclass
class History:
    """Per-step record of an optimisation: the design values at which the step's resolution, cost and
    loss were evaluated (before the step's update), and those three."""

    steps: list[int] = field(default_factory=list)
    design: list[dict[str, float]] = field(default_factory=list)
    resolution: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def record(self, step: int, design: CalorimeterDesign, terms: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.design.append(design.design_values())
        for key in ("resolution", "cost", "loss"):
            getattr(self, key).append(float(terms[key].detach()))

    def averaged_design(self, last_fraction: float = 0.3) -> dict[str, float]:
        """Mean design over the last ``last_fraction`` (in (0, 1]) of the steps (Polyak averaging of SGD iterates)."""
        if not self.design:
            raise ValueError("the history is empty: no optimisation step was recorded")
        if not 0 < last_fraction <= 1:
            raise ValueError(f"last_fraction must lie in (0, 1], got {last_fraction!r}")
        tail = self.design[-max(1, int(len(self.design) * last_fraction)):]
        return {name: sum(d[name] for d in tail) / len(tail) for name in tail[0]}


def train_jointly(design: CalorimeterDesign, steps: int, *, batch: int = 1024, design_lr: float = 0.1,
                  network_lr: float = 3e-3, final_lr_fraction: float = 0.1, pretrain_steps: int = 300,
                  seed: int = 0, callback: Callable[[int, History], None] | None = None) -> History:
    """Adam on the design parameters and the network weights together.

    The network is first fitted at the starting design (``pretrain_steps`` of :func:`fit_regression`),
    so that the design gradients are meaningful from the first step and do not inflate Adam's
    second-moment estimates. Learning rates decay (cosine) to ``final_lr_fraction`` of their start;
    fresh showers every step (seed ``(seed << 32) + step``); the design is projected into its
    bounds after each step.
    """
    if pretrain_steps > 0:
        fit_regression(design, pretrain_steps, seed=seed + 1)
    optimizer = torch.optim.Adam([{"params": design.design_parameters(), "lr": design_lr},
                                  {"params": design.regression.parameters(), "lr": network_lr}],
                                 betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: final_lr_fraction + (
        1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(steps - 1, 1), 1.0))))
    generator = torch.Generator().manual_seed(seed)
    history = History()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        terms = design(design.sample_energies(batch, generator), seed=(seed << 32) + step)
        terms["loss"].backward()
        history.record(step, design, terms)  # the design the terms belong to, before the update
        optimizer.step()
        schedule.step()
        design.project()
        if callback is not None:
            callback(step, history)
    return history


def fit_regression(design: CalorimeterDesign, steps: int, *, batch: int = 4096, lr: float = 3e-3,
                   seed: int = 0) -> float:
    """Train only the network on one fixed simulated sample at the current design; returns the final
    training loss. The shower cells are simulated once (no design gradients needed)."""
    check_integer(steps, "steps", 1)
    generator = torch.Generator().manual_seed(seed)
    energy = design.sample_energies(batch, generator)
    with torch.no_grad():
        cells = design.calorimeter(energy, seed=seed)
        visible = design.calorimeter.visible_fraction()
    optimizer = torch.optim.Adam(design.regression.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = relative_resolution(design.regression(cells, visible), energy) ** 2
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(design: CalorimeterDesign, n_showers: int, seed: int) -> dict[str, float]:
    """Objective terms on ``n_showers`` showers with fixed random numbers (common across designs)."""
    check_integer(n_showers, "n_showers", 1)
    energy = design.sample_energies(n_showers, torch.Generator().manual_seed(seed))
    return {key: float(value) for key, value in design(energy, seed=seed).items()}


def grid_scan(design: CalorimeterDesign, grid: Mapping[str, Iterable[float]], *, train_steps: int = 300,
              train_showers: int = 4096, validation_showers: int = 16384, seed: int = 1,
              callback: Callable[[int, int], None] | None = None) -> dict:
    """min over the network of J on a grid of design values (the other design parameters fixed).

    At every grid point the network starts from its state at the call (e.g. the jointly trained
    one), is trained with :func:`fit_regression` on ``train_showers`` and J is evaluated on
    ``validation_showers``; both samples use the same seeds at every point (common random
    numbers), and restarting from the same state keeps the network from memorising the training
    sample over many points. Returns ``{"names", "values": [axis values], "loss", "resolution",
    "cost": arrays of the grid's shape, "best": {name: value}}``. The design and the network are
    restored afterwards.
    """
    names = list(grid)
    if not names:
        raise ValueError("grid must name at least one design parameter")
    trainable = {name for name, _ in design.calorimeter.named_parameters()}
    if set(names) - trainable:
        raise ValueError(f"grid names {sorted(set(names) - trainable)} are not design parameters (trainable fields "
                         f"of the calorimeter): {sorted(trainable)}")
    axes = [torch.as_tensor(list(values), dtype=torch.float64) for values in grid.values()]
    for name, axis in zip(names, axes):
        if axis.dim() != 1 or axis.numel() == 0 or not bool(torch.isfinite(axis).all()):
            raise ValueError(f"grid values of {name} must be a non-empty list of finite numbers, got {axis.tolist()}")
    mesh = torch.cartesian_prod(*axes).reshape(-1, len(axes))
    saved = {name: design.calorimeter.get_parameter(name).detach().clone() for name in names}
    network = copy.deepcopy(design.regression.state_dict())
    results = {key: torch.empty(mesh.shape[0], dtype=torch.float64) for key in ("loss", "resolution", "cost")}
    try:
        for index, point in enumerate(mesh):
            with torch.no_grad():
                for name, value in zip(names, point):
                    design.calorimeter.get_parameter(name).fill_(float(value))
            design.regression.load_state_dict(network)
            fit_regression(design, train_steps, batch=train_showers, seed=seed)
            for key, value in evaluate(design, validation_showers, seed + 1).items():
                results[key][index] = value
            if callback is not None:
                callback(index + 1, mesh.shape[0])
    finally:  # also when a grid point is invalid or the scan is interrupted
        with torch.no_grad():
            for name, value in saved.items():
                design.calorimeter.get_parameter(name).copy_(value)
        design.regression.load_state_dict(network)
    shape = tuple(len(a) for a in axes)
    best = int(torch.argmin(results["loss"]))
    return {"names": names, "values": [a.tolist() for a in axes],
            **{key: value.reshape(shape).numpy() for key, value in results.items()},
            "best": {name: float(mesh[best, i]) for i, name in enumerate(names)}}


def fit_resolution_terms(energy: torch.Tensor, predicted: torch.Tensor, bins: int = 8) -> dict[str, float]:
    """Fit sigma/E = a/sqrt(E) (+) b/E (+) c to the relative residuals in log-spaced energy bins.

    Returns ``{"stochastic": a [GeV^1/2], "noise": b [GeV], "constant": c}``: the non-negative least-squares
    fit of the binned variances with relative weights (exact: the best of the unconstrained fits on every
    subset of terms)."""
    energy = engine.check_tensor(energy, "energy", shape=(None,)).detach().double().cpu()
    predicted = engine.check_tensor(predicted, "predicted", shape=tuple(energy.shape)).detach().double().cpu()
    if not bool((energy > 0).all()):
        raise ValueError("energy must be positive [GeV]")
    edges = torch.logspace(math.log10(float(energy.min())), math.log10(float(energy.max())) + 1e-9, bins + 1,
                           dtype=torch.float64)
    rows, variances = [], []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (energy >= low) & (energy < high)
        if int(inside.sum()) < 20:
            continue
        e = energy[inside]
        rows.append([float((1.0 / e).mean()), float((1.0 / e**2).mean()), 1.0])  # bin averages of the terms
        variances.append(float(((predicted[inside] - e) / e).var()))
    if len(rows) < 3:
        raise ValueError("need at least 3 energy bins with >= 20 entries to fit three terms")
    # Relative residuals: a binned variance's statistical error is proportional to it.
    target = torch.tensor(variances, dtype=torch.float64)
    design_matrix = torch.tensor(rows, dtype=torch.float64) / target[:, None]
    target = torch.ones_like(target)
    best, best_residual = torch.zeros(3, dtype=torch.float64), float(target.square().sum())
    for subset in ([0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]):
        solution = torch.linalg.lstsq(design_matrix[:, subset], target.unsqueeze(1)).solution.squeeze(1)
        if bool((solution < 0).any()):
            continue
        residual = float((design_matrix[:, subset] @ solution - target).square().sum())
        if residual < best_residual:
            best = torch.zeros(3, dtype=torch.float64)
            best[subset] = solution
            best_residual = residual
    a2, b2, c2 = best.tolist()
    return {"stochastic": math.sqrt(a2), "noise": math.sqrt(b2), "constant": math.sqrt(c2)}


# ---------------------------------------------------------------- tracker

#: Perigee track parameters of :class:`TrackerDesign`: d0 [mm], z0 [mm], phi, theta [rad], q/p [e/GeV].
PERIGEE_NAMES = ("d0", "z0", "phi", "theta", "qop")
#: Central-difference steps in d0, z0 [mm], phi, theta [rad]; q/p uses 1e-4 of its value. Large
#: enough that the propagator's navigation noise (~1e-9 mm with the surface tolerance below) stays
#: below 1e-6 of the derivatives, small enough for a truncation error below 1e-7.
_PERIGEE_STEPS = (1e-2, 1e-2, 1e-4, 1e-4)
_QOP_RELATIVE_STEP = 1e-4
_SURFACE_TOLERANCE = 1e-5  # mm


def perigee_to_free(perigee: torch.Tensor) -> torch.Tensor:
    """Free parameters (N, 8) = (x, y, z, t=0, dx, dy, dz, q/p) of tracks given as perigee (N, 5)."""
    position, direction, qop = perigee_components(perigee)
    return torch.cat([position, torch.zeros_like(qop)[:, None], direction, qop[:, None]], dim=1)


def _highland(path, momentum, *, material, mass):
    return highland_theta0(material, path, momentum, mass)


_highland_fn = engine.kernel_function(_highland)


def _wrap(difference: torch.Tensor, period) -> torch.Tensor:
    """Difference of two angles (or arc lengths) mapped into [-period/2, period/2]."""
    return difference - period * torch.round(difference / period)


def _as_layer_tensor(value, n: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(n)
    if tensor.numel() != n:
        raise ValueError(f"{name} needs 1 or {n} values (one per layer), got {tensor.numel()}")
    return tensor.clone()


class TrackerDesign(nn.Module):
    """Barrel tracker in a solenoid: resolutions of a linearised track fit, differentiable in the design.

    Parameters
    ----------
    radii: layer radii [mm], increasing (cylinders around the z axis, unbounded in z).
    thickness: silicon-equivalent thickness per layer [mm] (one value or one per layer).
    resolution_rphi, resolution_z: hit resolutions [mm] (one value or one per layer).
    b_field: solenoid field B_z [T] (uniform).
    material: layer material, a name of :data:`pyhybrid.kernels.material.MATERIALS`.
    beam_pipe: (radius [mm], thickness [mm], material) of a passive scatterer inside the first
        layer, or None.
    particle: track hypothesis for the propagation and multiple scattering ("muon", "pion", ...).
    trainable: which of "radii", "thickness", "resolution_rphi", "resolution_z" are ``nn.Parameter`` s.

    The fit (:meth:`track_covariance`) estimates the five perigee parameters from the hits
    (r phi, z) of every measuring layer the track crosses. H is the derivative of the hits
    with respect to the perigee parameters and D_j that of the track state at layer j (hit,
    direction angles, q/p), both by central differences of the propagator in the five
    parameters (one batched propagation of 11 tracks per reference track). A scattering angle
    at layer j moves the later hits by H_l D_j^-1 (d state_j / d angle), so

        V = diag(sigma_hit^2) + sum_j theta0_j^2 K_j K_j^T,    C = (H^T V^-1 H)^-1,

    theta0_j from Highland with the path through layer j at the track's incidence angle.
    Gradients with respect to radii and thicknesses flow through the propagator's forward-mode
    transport Jacobians (its backward pass) and through Highland (Dr.Jit AD).
    """

    def __init__(self, radii, *, thickness=0.3, resolution_rphi=0.01, resolution_z=0.05, b_field: float = 2.0,
                 material: str = "silicon", beam_pipe: tuple[float, float, str] | None = (25.0, 0.8, "beryllium"),
                 particle: str = "muon", trainable: Iterable[str] = ("radii", "thickness", "resolution_rphi")):
        super().__init__()
        try:
            b_field = math.nan if isinstance(b_field, (str, bytes)) else float(b_field)
        except (TypeError, ValueError, RuntimeError):
            b_field = math.nan
        if not (math.isfinite(b_field) and b_field != 0):
            raise ValueError(f"b_field must be a finite, non-zero field [T] (momenta are measured from the curvature), "
                             f"got {b_field!r}")
        radii = torch.as_tensor(radii, dtype=torch.float64).flatten().clone()
        n = radii.numel()
        if n < 3:
            raise ValueError(f"a track fit of five parameters needs at least 3 layers, got {n}")
        values = {"radii": radii, "thickness": _as_layer_tensor(thickness, n, "thickness"),
                  "resolution_rphi": _as_layer_tensor(resolution_rphi, n, "resolution_rphi"),
                  "resolution_z": _as_layer_tensor(resolution_z, n, "resolution_z")}
        trainable = name_tuple(trainable)
        unknown = set(trainable) - set(values)
        if unknown:
            raise ValueError(f"trainable names {sorted(unknown)} are not in {sorted(values)}")
        for name, value in values.items():
            if name in trainable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        for name in (material,) + ((beam_pipe[2],) if beam_pipe else ()):
            if name not in TRACKER_MATERIALS:
                raise ValueError(f"unknown material {name!r}; known: {sorted(TRACKER_MATERIALS)}")
        if particle not in PARTICLES:
            raise ValueError(f"unknown particle {particle!r}; known: {sorted(PARTICLES)}")
        self.mass = PARTICLES[particle].mass
        self.materials = ([TRACKER_MATERIALS[beam_pipe[2]]] if beam_pipe else []) + [TRACKER_MATERIALS[material]] * n
        self.beam_pipe = None if beam_pipe is None else (float(beam_pipe[0]), float(beam_pipe[1]))
        layers = [CylinderLayer(radius=float(r), thickness=1.0, material=m.name)
                  for r, m in zip(self._positions().tolist(), self.materials)]
        self.propagator = Propagator(UniformField((0.0, 0.0, b_field)), layers, particle=particle,
                                     energy_loss=True, scattering="none", surface_tolerance=_SURFACE_TOLERANCE)
        self.propagator.requires_grad_(False)
        self.check()

    @property
    def n_layers(self) -> int:
        return self.radii.numel()

    def _positions(self) -> torch.Tensor:
        if self.beam_pipe is None:
            return self.radii
        return torch.cat([self.radii.new_tensor([self.beam_pipe[0]]), self.radii])

    def _thicknesses(self) -> torch.Tensor:
        if self.beam_pipe is None:
            return self.thickness
        return torch.cat([self.thickness.new_tensor([self.beam_pipe[1]]), self.thickness])

    def check(self) -> None:
        """Raise ValueError for unphysical designs (non-increasing radii, non-positive values)."""
        positions = self._positions().detach()
        engine.check_tensor(positions, "radii")
        if not bool((positions > 0).all()) or not bool((positions[1:] > positions[:-1]).all()):
            raise ValueError(f"radii must be positive, increasing and outside the beam pipe, got {positions.tolist()}")
        for name in ("thickness", "resolution_rphi", "resolution_z"):
            value = engine.check_tensor(getattr(self, name).detach(), name)
            if not bool((value > 0).all()):
                raise ValueError(f"{name} must be positive, got {value.tolist()}")

    def material_budget(self) -> torch.Tensor:
        """Material of the measuring layers at normal incidence, sum of thickness / X0 (beam pipe excluded)."""
        x0 = self.thickness.new_tensor([m.radiation_length for m in self.materials[-self.n_layers:]])
        return (self.thickness / x0).sum()

    def fit_matrices(self, pt: torch.Tensor, eta: torch.Tensor, charge: float = 1.0) -> dict[str, torch.Tensor]:
        """The linearised fit of tracks from the origin with transverse momenta ``pt`` (N,) [GeV],
        pseudorapidities ``eta`` (N,) (phi = 0) and ``charge`` +1 or -1 (a number or (N,) tensor), over
        the M = 2 x (layers incl. beam pipe) hit coordinates:

        ``jacobian`` (N, M, 5): d hits / d perigee (rows of unmeasured or missed hits are zero);
        ``covariance`` (N, M, M): V (hit resolutions + multiple scattering; identity on unused rows);
        ``hits`` (N, M): the nominal hits (r phi, z per layer) [mm]; ``mask`` (N, M): 1 for used hits.
        A track must cross at least 3 measuring layers (else ValueError)."""
        self.check()
        pt = engine.check_tensor(pt, "pt", shape=(None,), dtype=torch.float64)
        charges = None
        if isinstance(charge, numbers.Real) or (isinstance(charge, (torch.Tensor, np.ndarray))
                                                and tuple(charge.shape) in ((), tuple(pt.shape))):
            charges = torch.as_tensor(charge, dtype=torch.float64)
        if charges is None or not bool((charges.abs() == 1).all()):
            raise ValueError(f"charge must be +1 or -1 [e], a number or a tensor of shape () or {tuple(pt.shape)} "
                             f"(the sign per track; the particle hypothesis is singly charged), got {charge!r}")
        eta = engine.check_tensor(eta, "eta", shape=pt.shape, dtype=torch.float64)
        if not bool((pt > 0).all()):
            raise ValueError("pt must be positive (GeV)")
        n, n_all = pt.shape[0], self._positions().numel()
        theta = 2.0 * torch.atan(torch.exp(-eta))
        qop = charges / (pt * torch.cosh(eta))
        zero = torch.zeros_like(pt)
        perigee = torch.stack([zero, zero, zero, theta, qop], dim=1)
        steps = torch.cat([pt.new_tensor(_PERIGEE_STEPS).expand(n, 4), (_QOP_RELATIVE_STEP * qop.abs())[:, None]], 1)
        identity = torch.eye(5, dtype=pt.dtype, device=pt.device)
        offsets = torch.cat([pt.new_zeros(1, 5), identity, -identity])
        tracks = perigee[:, None, :] + offsets[None] * steps[:, None, :]  # (n, 11, 5)
        out = torch.func.functional_call(self.propagator, {"positions": self._positions(),
                                                           "thickness": self._thicknesses()},
                                         (perigee_to_free(tracks.reshape(-1, 5)),))
        local = out.local.reshape(n, 11, n_all, 2)
        free = out.free.reshape(n, 11, n_all, 8)
        valid = out.valid.reshape(n, 11, n_all).all(dim=1)
        direction = free[..., 4:7]
        state = torch.stack([local[..., 0], local[..., 1], torch.atan2(direction[..., 1], direction[..., 0]),
                             torch.acos(direction[..., 2].clamp(-1.0, 1.0)), free[..., 7]], dim=-1)
        difference = state[:, 1:6] - state[:, 6:11]  # (n, parameter, layer, state)
        arc = 2.0 * math.pi * self._positions()[None, None, :]
        difference = torch.stack([_wrap(difference[..., 0], arc), difference[..., 1],
                                  _wrap(difference[..., 2], 2.0 * math.pi), difference[..., 3],
                                  difference[..., 4]], dim=-1)
        state_jacobian = (difference / (2.0 * steps[:, :, None, None])).permute(0, 2, 3, 1)  # (n, L, state, par)
        hits = state_jacobian[..., :2, :]  # (n, L, 2, 5)

        # Scattering angles (alpha_1 transverse to the direction in phi, alpha_2 in theta) at layer j.
        # A layer the track misses (it curls back before it) has no state: finite placeholders there
        # (identity Jacobian, unit direction and q/p), whose terms are masked out below.
        crossed = valid[..., None]  # (n, L, 1)
        centre = torch.where(crossed, state[:, 0], 1.0)
        kick = pt.new_zeros(n, n_all, 5, 2)
        kick[..., 2, 0] = 1.0
        kick[..., 3, 1] = 1.0
        kick = kick / torch.stack([torch.sin(centre[..., 3]), torch.ones_like(centre[..., 3])], -1)[..., None, :]
        usable = torch.where(crossed[..., None], state_jacobian, torch.eye(5, dtype=pt.dtype, device=pt.device))
        response = torch.linalg.solve(usable, kick) * crossed[..., None]  # D_j^-1 (d state_j / d alpha): (n, L, 5, 2)
        layer = torch.arange(n_all, device=pt.device)
        later = layer[:, None] > layer[None, :]  # hit l after scatterer j
        kinks = torch.einsum("nlap,njpb->nlajb", hits, response) * later[None, :, None, :, None]
        kinks = kinks.reshape(n, 2 * n_all, 2 * n_all)

        position = torch.where(crossed, free[:, 0, :, 0:3], 1.0)
        direction = torch.where(crossed, direction[:, 0], 1.0)
        cos_incidence = ((position[..., 0] * direction[..., 0] + position[..., 1] * direction[..., 1])
                         / position[..., :2].norm(dim=-1)).abs().clamp(min=1e-3)
        paths = self._thicknesses()[None, :] / cos_incidence
        momenta = 1.0 / centre[..., 4].abs()
        if n == 0:  # (a kernel cannot combine an empty array with its constants)
            theta0 = engine.empty_batch((0, n_all), paths)
        else:
            theta0 = torch.stack([_highland_fn(paths[:, j].contiguous(), momenta[:, j].contiguous(), material=m,
                                               mass=self.mass) for j, m in enumerate(self.materials)], dim=1)
        scattering = (theta0 ** 2).repeat_interleave(2, dim=1)  # (n, 2L)

        measured = torch.ones(n_all, dtype=torch.bool, device=pt.device)
        if self.beam_pipe is not None:
            measured[0] = False
        mask = (valid & measured[None, :]).repeat_interleave(2, dim=1).to(pt.dtype)  # (n, 2L)
        if bool((mask.sum(1) < 6).any()):
            raise ValueError("every track must cross at least 3 measuring layers; check eta and the radii")
        resolution = torch.stack([self.resolution_rphi, self.resolution_z], dim=1)
        if self.beam_pipe is not None:
            resolution = torch.cat([resolution.new_ones(1, 2), resolution])
        variance = resolution.reshape(-1) ** 2
        multiple = kinks @ (scattering[..., None] * kinks.transpose(1, 2))
        covariance = (mask[:, :, None] * mask[:, None, :] * multiple
                      + torch.diag_embed(mask * variance + (1.0 - mask)))
        return {"jacobian": hits.reshape(n, 2 * n_all, 5) * mask[..., None], "covariance": covariance,
                "hits": local[:, 0].reshape(n, 2 * n_all), "mask": mask}

    def track_covariance(self, pt: torch.Tensor, eta: torch.Tensor, charge: float = 1.0) -> torch.Tensor:
        """Covariance (N, 5, 5) of (d0 [mm], z0 [mm], phi, theta, q/p [e/GeV]), C = (H^T V^-1 H)^-1, for
        tracks from the origin with ``pt`` (N,) [GeV] and ``eta`` (N,) (see :meth:`fit_matrices`)."""
        fit = self.fit_matrices(pt, eta, charge)
        factor = torch.linalg.cholesky(fit["covariance"])
        information = fit["jacobian"].transpose(1, 2) @ torch.cholesky_solve(fit["jacobian"], factor)
        return torch.linalg.inv(information)

    def resolutions(self, pt: torch.Tensor, eta: torch.Tensor, charge: float = 1.0) -> dict[str, torch.Tensor]:
        """Per track: ``d0`` and ``z0`` resolutions [mm], ``pt``: relative sigma(pT)/pT, ``phi``, ``theta`` [rad]."""
        c = self.track_covariance(pt, eta, charge)
        theta = 2.0 * torch.atan(torch.exp(-eta))
        qop = charge / (pt * torch.cosh(eta))
        cot = 1.0 / torch.tan(theta)
        pt_variance = c[:, 4, 4] / qop**2 + cot**2 * c[:, 3, 3] - 2.0 * cot * c[:, 3, 4] / qop
        return {"d0": c[:, 0, 0].sqrt(), "z0": c[:, 1, 1].sqrt(), "phi": c[:, 2, 2].sqrt(),
                "theta": c[:, 3, 3].sqrt(), "pt": pt_variance.sqrt()}
