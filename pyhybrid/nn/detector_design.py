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

Units: GeV, mm; costs in the caller's currency per unit area.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from pyhybrid.nn.calorimeter import SamplingCalorimeter

__all__ = ["EnergyRegression", "relative_resolution", "material_cost", "CalorimeterDesign", "train_jointly",
           "fit_regression", "grid_scan", "fit_resolution_terms"]


class EnergyRegression(nn.Module):
    """Energy regression from calorimeter cells: calibrated sum times a learned shape correction.

    E_reco = S (1 + MLP(f, log S)), S = sum(cells) / visible_fraction (the design's calibration),
    f = cells / sum(cells) (the shower shape, which carries the leakage information). The last layer
    starts at zero, so an untrained network returns the calibrated sum.

    cells: (N, n_segments, n_cells, n_cells) [GeV]; visible_fraction: 0-d tensor. Returns (N,) [GeV].
    """

    def __init__(self, n_segments: int, n_cells: int, hidden: int = 32):
        super().__init__()
        n_inputs = n_segments * n_cells * n_cells + 1
        self.mlp = nn.Sequential(nn.Linear(n_inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, cells: torch.Tensor, visible_fraction: torch.Tensor) -> torch.Tensor:
        flat = cells.flatten(1)
        visible = flat.sum(1, keepdim=True)
        calibrated = visible / visible_fraction
        shape = flat / visible.abs().clamp(min=1e-6)
        features = torch.cat([shape, torch.log(calibrated.clamp(min=1e-3))], dim=1)
        return (calibrated * (1.0 + self.mlp(features))).squeeze(1)


def relative_resolution(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Root-mean-square relative error sqrt(<((predicted - true) / true)^2>) (bias included)."""
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
    bounds: ``{parameter name: (low, high)}`` box for :meth:`project`.
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
        self.regression = regression if regression is not None else EnergyRegression(s.n_segments, s.n_cells)
        self.regression.to(dtype=calorimeter.absorber_thickness.dtype)
        self.energy_range = (float(low), float(high))
        self.cost_weight, self.absorber_price, self.active_price = cost_weight, absorber_price, active_price
        self.bounds = dict(bounds or {})
        design_names = {name for name, _ in calorimeter.named_parameters()}
        unknown = set(self.bounds) - design_names
        if unknown:
            raise ValueError(f"bounds given for {sorted(unknown)}, which are not design parameters {sorted(design_names)}")

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
        """Clamp the design parameters into their ``bounds``."""
        for name, (low, high) in self.bounds.items():
            self.calorimeter.get_parameter(name).clamp_(low, high)


@dataclass
class History:
    """Per-step record of an optimisation: design values, resolution, cost and loss."""

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
        """Mean design over the last ``last_fraction`` of the steps (Polyak averaging of SGD iterates)."""
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
        optimizer.step()
        schedule.step()
        design.project()
        history.record(step, design, terms)
        if callback is not None:
            callback(step, history)
    return history


def fit_regression(design: CalorimeterDesign, steps: int, *, batch: int = 4096, lr: float = 3e-3,
                   seed: int = 0) -> float:
    """Train only the network on one fixed simulated sample at the current design; returns the final
    training loss. The shower cells are simulated once (no design gradients needed)."""
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
    energy = design.sample_energies(n_showers, torch.Generator().manual_seed(seed))
    return {key: float(value) for key, value in design(energy, seed=seed).items()}


def grid_scan(design: CalorimeterDesign, grid: Mapping[str, Iterable[float]], *, train_steps: int = 300,
              train_showers: int = 4096, validation_showers: int = 16384, seed: int = 1,
              callback: Callable[[int, int], None] | None = None) -> dict:
    """min over the network of J on a grid of design values (the other design parameters fixed).

    At every grid point (visited in raster order, the network warm-started from the previous
    point) the network is trained with :func:`fit_regression` on ``train_showers`` and J is
    evaluated on ``validation_showers`` with the same seed at every point (common random numbers).
    Returns ``{"names", "values": [axis values], "loss", "resolution", "cost": arrays of the grid's
    shape, "best": {name: value}}``. The design is restored afterwards.
    """
    names = list(grid)
    axes = [torch.as_tensor(list(values), dtype=torch.float64) for values in grid.values()]
    mesh = torch.cartesian_prod(*axes).reshape(-1, len(axes)) if axes else torch.empty(0)
    saved = {name: design.calorimeter.get_parameter(name).detach().clone() for name in names}
    results = {key: torch.empty(mesh.shape[0], dtype=torch.float64) for key in ("loss", "resolution", "cost")}
    for index, point in enumerate(mesh):
        with torch.no_grad():
            for name, value in zip(names, point):
                design.calorimeter.get_parameter(name).fill_(float(value))
        fit_regression(design, train_steps, batch=train_showers, seed=seed)
        for key, value in evaluate(design, validation_showers, seed + 1).items():
            results[key][index] = value
        if callback is not None:
            callback(index + 1, mesh.shape[0])
    with torch.no_grad():
        for name, value in saved.items():
            design.calorimeter.get_parameter(name).copy_(value)
    shape = tuple(len(a) for a in axes)
    best = int(torch.argmin(results["loss"]))
    return {"names": names, "values": [a.tolist() for a in axes],
            **{key: value.reshape(shape).numpy() for key, value in results.items()},
            "best": {name: float(mesh[best, i]) for i, name in enumerate(names)}}


def fit_resolution_terms(energy: torch.Tensor, predicted: torch.Tensor, bins: int = 8) -> dict[str, float]:
    """Fit sigma/E = a/sqrt(E) (+) b/E (+) c to the relative residuals in log-spaced energy bins.

    Returns ``{"stochastic": a [GeV^1/2], "noise": b [GeV], "constant": c}``: the non-negative least-squares
    fit of the binned variances (exact: the best of the unconstrained fits on every subset of terms)."""
    energy, predicted = energy.detach().double().cpu(), predicted.detach().double().cpu()
    edges = torch.logspace(math.log10(float(energy.min())), math.log10(float(energy.max())) + 1e-9, bins + 1,
                           dtype=torch.float64)
    rows, variances = [], []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (energy >= low) & (energy < high)
        if int(inside.sum()) < 20:
            continue
        e = energy[inside]
        mean_e = float(e.mean())
        rows.append([1.0 / mean_e, 1.0 / mean_e**2, 1.0])
        variances.append(float(((predicted[inside] - e) / e).var()))
    if len(rows) < 3:
        raise ValueError("need at least 3 energy bins with >= 20 entries to fit three terms")
    design_matrix = torch.tensor(rows, dtype=torch.float64)
    target = torch.tensor(variances, dtype=torch.float64)
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
