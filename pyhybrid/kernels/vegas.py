"""VEGAS adaptive importance sampling on the unit hypercube (Dr.Jit sampling, numpy grid).

G. P. Lepage, J. Comput. Phys. 27 (1978) 192. The sampling density is a product
of one-dimensional piecewise-constant densities, one per dimension, each with
``n_bins`` bins of equal probability whose edges adapt to the integrand: after
each adaptation iteration, the bin edges move so that every bin holds an equal
share of the smoothed, damped sum of (f J)^2 over the points that fell into it.

The integrand is a Python callable ``f(x) -> Float`` taking a list of ``dim``
Dr.Jit arrays (one lane per point, coordinates in [0, 1)) and returning the
integrand values (any physics Jacobian included). Random numbers come from the
per-lane PCG32 generators of :class:`~pyhybrid.kernels.backend.KernelTypes`,
so a run is reproducible from its seed on the CPU backend.

Estimates: each iteration gives I_k = mean(f J) and its variance; the result
is the inverse-variance weighted mean of the iterations after the adaptation
phase (grid frozen, so the estimates are independent and unbiased), with its
error and chi^2 / dof as a consistency check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import drjit as dr
import numpy as np

from pyhybrid.kernels.backend import KernelTypes

__all__ = ["VegasGrid", "VegasIteration", "VegasResult", "uniform_points", "integrate"]


def uniform_points(types: KernelTypes, n: int, dim: int, seed: int, stream: int = 0) -> list:
    """``dim`` arrays of n uniform numbers in [0, 1) from per-lane PCG32 streams (seed, stream)."""
    rng = types.rng(n, seed, stream)
    return [types.uniform(rng) for _ in range(dim)]


class VegasGrid:
    """Separable VEGAS grid: ``edges[d]`` are the n_bins + 1 increasing bin edges of dimension d."""

    def __init__(self, dim: int, n_bins: int = 64, edges: np.ndarray | None = None):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if edges is None:
            edges = np.tile(np.linspace(0.0, 1.0, n_bins + 1), (dim, 1))
        edges = np.asarray(edges, dtype=np.float64)
        if edges.shape != (dim, n_bins + 1):
            raise ValueError(f"edges must have shape {(dim, n_bins + 1)}, got {edges.shape}")
        if np.any(np.diff(edges, axis=1) <= 0) or np.any(edges[:, 0] != 0.0) or np.any(edges[:, -1] != 1.0):
            raise ValueError("edges must increase strictly from 0 to 1 in every dimension")
        self.dim = dim
        self.n_bins = n_bins
        self.edges = edges

    def sample(self, types: KernelTypes, uniforms: list):
        """Map uniform points to the grid.

        Returns ``(x, jacobian, bins)``: ``dim`` arrays of points in [0, 1), the
        Jacobian dx/du (so that E[f(x) J] = integral f), and the bin index per
        dimension (UInt32 arrays).
        """
        if len(uniforms) != self.dim:
            raise ValueError(f"expected {self.dim} uniform arrays, got {len(uniforms)}")
        stride = self.n_bins + 1
        edges = types.Float(self.edges.reshape(-1))
        x, bins = [], []
        jacobian = types.Float(1.0)
        for d, u in enumerate(uniforms):
            position = u * self.n_bins
            index = dr.minimum(types.UInt32(position), self.n_bins - 1)
            low = dr.gather(types.Float, edges, index + d * stride)
            high = dr.gather(types.Float, edges, index + d * stride + 1)
            width = high - low
            x.append(low + (position - types.Float(index)) * width)
            jacobian = jacobian * (self.n_bins * width)
            bins.append(index)
        return x, jacobian, bins

    def refine(self, bin_sums: np.ndarray, alpha: float = 1.5) -> None:
        """Move the edges given the per-bin sums of (f J)^2, shape (dim, n_bins) (Lepage's algorithm)."""
        bin_sums = np.asarray(bin_sums, dtype=np.float64)
        for d in range(self.dim):
            values = bin_sums[d]
            if not np.any(values > 0):
                continue
            smoothed = np.empty_like(values)
            smoothed[0] = (values[0] + values[1]) / 2.0
            smoothed[-1] = (values[-2] + values[-1]) / 2.0
            smoothed[1:-1] = (values[:-2] + values[1:-1] + values[2:]) / 3.0
            fractions = smoothed / smoothed.sum()
            with np.errstate(divide="ignore", invalid="ignore"):
                importance = np.where(fractions > 0, ((fractions - 1.0) / np.log(fractions)) ** alpha, 0.0)
            # fractions == 1 (all weight in one bin) is the limit 1 of (f - 1) / ln f.
            importance = np.where(np.isfinite(importance), importance, 1.0)
            cumulative = np.concatenate([[0.0], np.cumsum(importance)])
            targets = np.linspace(0.0, cumulative[-1], self.n_bins + 1)[1:-1]
            # Piecewise-linear inverse of the cumulative importance over the old edges.
            new_inner = np.interp(targets, cumulative, self.edges[d])
            new_edges = np.concatenate([[0.0], new_inner, [1.0]])
            if np.all(np.diff(new_edges) > 0):
                self.edges[d] = new_edges


@dataclass
class VegasIteration:
    """One iteration: estimate, its standard error, number of points, largest weight f J."""

    integral: float
    error: float
    n_points: int
    max_weight: float


@dataclass
class VegasResult:
    """Combined estimate of the measuring iterations (adaptation iterations are listed, not used)."""

    integral: float
    error: float
    chi2_per_dof: float | None  # None for a single measuring iteration
    grid: VegasGrid
    adaptation: list[VegasIteration] = field(default_factory=list)
    iterations: list[VegasIteration] = field(default_factory=list)

    @property
    def max_weight(self) -> float:
        """Largest f J seen in the measuring iterations (for unweighting)."""
        return max(it.max_weight for it in self.iterations)


def _run_iteration(integrand, grid: VegasGrid, types: KernelTypes, n_points: int, seed: int, stream: int):
    x, jacobian, bins = grid.sample(types, uniform_points(types, n_points, grid.dim, seed, stream))
    weight = integrand(x) * jacobian
    dr.eval(weight, bins)
    w = weight.numpy().astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise FloatingPointError("integrand returned NaN or infinite values")
    mean = w.mean()
    variance = max((np.mean(w * w) - mean * mean) / (n_points - 1), 0.0)
    w2 = w * w
    bin_sums = np.stack([np.bincount(b.numpy(), weights=w2, minlength=grid.n_bins) for b in bins])
    return VegasIteration(float(mean), math.sqrt(variance), n_points, float(w.max())), bin_sums


def integrate(integrand: Callable[[list], object], dim: int, types: KernelTypes, *, n_points: int = 100_000,
              adapt_iterations: int = 5, iterations: int = 5, n_bins: int = 64, alpha: float = 1.5,
              seed: int = 0, grid: VegasGrid | None = None,
              advance: Callable[[int], None] | None = None) -> VegasResult:
    """Integrate ``integrand`` over [0, 1)^dim with VEGAS.

    ``adapt_iterations`` iterations train the grid (pass an existing ``grid``
    to continue training it), then ``iterations`` iterations with the frozen
    grid give the estimate. Each iteration uses ``n_points`` points and its own
    random stream. ``advance(1)`` is called after each iteration (progress bars).
    """
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    if iterations < 1 or adapt_iterations < 0:
        raise ValueError("need iterations >= 1 and adapt_iterations >= 0")
    grid = grid if grid is not None else VegasGrid(dim, n_bins)
    if grid.dim != dim:
        raise ValueError(f"grid has dimension {grid.dim}, integrand {dim}")
    adaptation, measured = [], []
    for k in range(adapt_iterations + iterations):
        result, bin_sums = _run_iteration(integrand, grid, types, n_points, seed, stream=k)
        if k < adapt_iterations:
            adaptation.append(result)
            grid.refine(bin_sums, alpha)
        else:
            measured.append(result)
        if advance is not None:
            advance(1)
    return _combine(measured, grid, adaptation)


def _combine(measured: list[VegasIteration], grid: VegasGrid, adaptation: list[VegasIteration]) -> VegasResult:
    values = np.array([it.integral for it in measured])
    errors = np.array([it.error for it in measured])
    if np.any(errors == 0):  # a constant integrand: every iteration exact
        return VegasResult(float(values.mean()), 0.0, 0.0, grid, adaptation, measured)
    inverse = 1.0 / errors**2
    mean = float(np.sum(values * inverse) / np.sum(inverse))
    error = float(1.0 / math.sqrt(np.sum(inverse)))
    chi2 = float(np.sum((values - mean) ** 2 * inverse) / (len(values) - 1)) if len(values) > 1 else None
    return VegasResult(mean, error, chi2, grid, adaptation, measured)
