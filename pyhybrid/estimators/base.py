"""Common interface of the gradient estimators for the parton shower.

An estimator turns one batch of showered events into

* ``values``: per-event features F_i (N, K), e.g. one-hot histogram bins of an
  observable, whose mean estimates E[F];
* ``derivatives[p]``: per-event contributions D_i (N, K) whose mean estimates
  d E[F] / d p for the shower parameters p in ("alpha_s", "t0").

From torch, ``estimator(shower, observable, n_events, seed)`` returns F as a
tensor whose backward pass applies the estimator: the gradient of any loss L(F)
with respect to ``shower.alpha_s`` / ``shower.t0`` is sum_i,k dL/dF_ik D_ik,p
(so ``F.mean(0)`` behaves like a differentiable histogram). Parameters with
``requires_grad=False`` are not estimated (that saves the extra shower or
observable passes they need). ``estimate(...)`` returns values and derivatives
without autograd, for variance studies.

Estimators (subclasses): :class:`~pyhybrid.estimators.score_function.ScoreFunction`,
:class:`~pyhybrid.estimators.stochastic_ad.StochasticAD`,
:class:`~pyhybrid.estimators.relaxed.Relaxed`.

The t0 derivative of the hard cutoff is a pure boundary term (the support of
the emission scales, t > t0, moves with t0):
d E[F] / d t0 = -E[rho(t0) (F(event + emission at t0) - F(event))], with rho the
density of accepted emissions at t0 in the final configuration. Both unbiased
estimators use it (:func:`boundary_derivative`), with one extra emission per event
sampled at t0 (acceptance probability folded into rho).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import drjit as dr
import numpy as np
import torch

from pyhybrid.engine import eager_under_compile, kernel_function
from pyhybrid.kernels.backend import KernelTypes, check_integer, check_seed, name_tuple, types_of
from pyhybrid.kernels.observables import OBSERVABLES, bin_indicators, event_shapes, observable, soft_bin_indicators
from pyhybrid.kernels.shower import ShowerResult, ShowerSettings, boundary_emission
from pyhybrid.nn.shower import PartonShower

__all__ = ["PARAMETERS", "HistogramObservable", "Estimate", "GradientEstimator", "shapes_of", "check_overflow",
           "boundary_derivative", "leave_one_out_baseline"]

#: Differentiable shower parameters, in the order the estimators take them.
PARAMETERS = ("alpha_s", "t0")


@dataclass(frozen=True)
class HistogramObservable:
    """Histogram of one event shape: ``name`` from :data:`pyhybrid.kernels.observables.OBSERVABLES`
    (e.g. "log10_y23", "one_minus_thrust") and bin ``edges`` (increasing)."""

    name: str
    edges: tuple

    def __post_init__(self):
        if self.name not in OBSERVABLES:
            raise ValueError(f"observable must be one of {', '.join(OBSERVABLES)}, got {self.name!r}")
        edges = self.edges.detach().cpu().numpy() if isinstance(self.edges, torch.Tensor) else self.edges
        edges = np.asarray(edges) if not isinstance(edges, (str, bytes)) else np.asarray([])
        numeric = edges.ndim == 1 and np.issubdtype(edges.dtype, np.number) and edges.dtype != np.bool_
        edges = tuple(float(e) for e in edges) if numeric else ()
        if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"edges must be >= 2 finite, strictly increasing numbers, got {self.edges!r}")
        object.__setattr__(self, "edges", edges)

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def features(self, shapes) -> list:
        """One-hot bin indicators of every event (K arrays)."""
        return bin_indicators(observable(shapes, self.name)[0], self.edges)

    def soft_features(self, shapes, width: float):
        """Sigmoid-edged bins of width ``width`` (observable units) and their pathwise derivatives."""
        x, dx = observable(shapes, self.name)
        return soft_bin_indicators(x, dx, self.edges, width)


@dataclass
class Estimate:
    """Per-event features ``values`` (N, K) and derivative contributions ``derivatives[p]`` (N, K)."""

    values: torch.Tensor
    derivatives: dict

    def gradient(self, parameter: str) -> torch.Tensor:
        """Estimate of d E[F] / d parameter, shape (K,)."""
        return self.derivatives[parameter].mean(0)

    def standard_error(self, parameter: str) -> torch.Tensor:
        """Standard error of :meth:`gradient` from the spread of the per-event contributions, (K,)."""
        d = self.derivatives[parameter]
        return d.std(0) / math.sqrt(d.shape[0])


def shapes_of(result: ShowerResult, *, tangents: bool = False):
    """Event shapes (and pathwise derivatives with ``tangents``) of a shower result."""
    record = result.record
    columns = [record.E, record.px, record.py, record.pz]
    tangent_columns = None
    if tangents:
        t = result.tangents
        tangent_columns = [t.E, t.px, t.py, t.pz]
    return event_shapes(columns, result.n_particles, result.settings.s, tangents=tangent_columns)


def check_overflow(result: ShowerResult) -> None:
    """Raise if an event ran out of particle slots (its shower stopped early)."""
    count = int(dr.count(result.overflow)[0]) if dr.width(result.overflow) else 0
    if count:
        raise RuntimeError(f"{count} of {result.n_events} events needed more than max_particles = "
                           f"{result.settings.max_particles} partons; increase max_particles")


def leave_one_out_baseline(values: Sequence, score):
    """Per event i and feature k: b_ik = sum_{j != i} F_jk S_j^2 / sum_{j != i} S_j^2.

    The variance-minimising constant baseline for the score-function term (F - b) S,
    estimated without event i so that E[(F_i - b_i) S_i] = E[F_i S_i] stays unbiased.
    """
    square = score * score
    total = dr.sum(square)
    denominator = total - square
    safe = dr.select(denominator > 0.0, denominator, 1.0)
    out = []
    for f in values:
        numerator = dr.sum(f * square) - f * square
        out.append(dr.select(denominator > 0.0, numerator / safe, 0.0))
    return out


def boundary_derivative(types: KernelTypes, result: ShowerResult, observable_spec: HistogramObservable,
                        values: Sequence, seed: int) -> list:
    """Per-event contributions to d E[F] / d t0 (hard cutoff): -rho (F(with emission at t0) - F)."""
    extra = boundary_emission(types, result, seed)
    record = extra.record
    shapes = event_shapes([record.E, record.px, record.py, record.pz], extra.n_particles, result.settings.s)
    with_emission = observable_spec.features(shapes)
    return [-extra.rate * (f_new - f) for f_new, f in zip(with_emission, values)]


class GradientEstimator(ABC):
    """Base class: subclasses implement :meth:`per_event` on Dr.Jit arrays."""

    #: Short name used in reports and plots.
    name = "estimator"

    @abstractmethod
    def per_event(self, types: KernelTypes, settings: ShowerSettings, observable_spec: HistogramObservable,
                  n_events: int, seed: int, parameters: Sequence[str]):
        """(values: K arrays, {parameter: K arrays of derivative contributions}) for ``parameters``."""

    # ------------------------------------------------------------ torch interface

    def estimate(self, shower, observable_spec: HistogramObservable, n_events: int, seed: int,
                 parameters: Sequence[str] = PARAMETERS) -> Estimate:
        """Values and per-event derivative contributions as torch tensors (no autograd)."""
        _check_inputs(shower, observable_spec)
        parameters = _check_parameters(parameters)
        settings = shower.settings()
        types = shower.kernel_types()
        values, derivatives = self.per_event(types, settings, observable_spec, _check_count(n_events),
                                             check_seed(seed), parameters)
        return Estimate(_stack(values, types), {p: _stack(d, types) for p, d in derivatives.items()})

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def __call__(self, shower, observable_spec: HistogramObservable, n_events: int, seed: int) -> torch.Tensor:
        """Features F (n_events, K) of ``shower``'s events; backward applies this estimator."""
        _check_inputs(shower, observable_spec)
        # no derivative passes where no gradient can be taken (torch.no_grad, frozen parameters)
        parameters = tuple(name for name in PARAMETERS
                           if torch.is_grad_enabled() and getattr(shower, name).requires_grad)
        alpha_s, t0 = shower.parameter_tensors()
        apply = kernel_function(_forward, vjp=_vjp, estimator=self, observable_spec=observable_spec,
                                n_events=_check_count(n_events), seed=check_seed(seed),
                                sqrt_s=shower.sqrt_s, max_particles=shower.max_particles, parameters=parameters)
        return apply(alpha_s, t0)


def _forward(alpha_s, t0, *, estimator, observable_spec, n_events, seed, sqrt_s, max_particles, parameters):
    types = types_of(alpha_s)
    settings = ShowerSettings(alpha_s_mz=float(alpha_s[0]), t0=float(t0[0]), sqrt_s=sqrt_s,
                              max_particles=max_particles)
    values, derivatives = estimator.per_event(types, settings, observable_spec, n_events, seed, parameters)
    return list(values), derivatives


def _vjp(saved, grad_outputs, needs, **static):
    columns = grad_outputs[0]
    grads = []
    for name, need in zip(PARAMETERS, needs):
        if not need or name not in saved:
            grads.append(None)
            continue
        total = 0.0
        for g, d in zip(columns, saved[name]):
            total = total + g * d
        grads.append(total)
    return grads


def _stack(arrays, types: KernelTypes) -> torch.Tensor:
    arrays = [types.Float(a) for a in arrays]
    dr.eval(*arrays)
    return torch.stack([a.torch() for a in arrays], dim=-1)


def _check_inputs(shower, observable_spec) -> None:
    if not isinstance(shower, PartonShower):
        raise TypeError(f"shower must be a pyhybrid.nn.PartonShower, got {type(shower).__name__}")
    if not isinstance(observable_spec, HistogramObservable):
        raise TypeError(f"observable_spec must be a HistogramObservable, got {type(observable_spec).__name__}")


def _check_parameters(parameters) -> tuple:
    parameters = name_tuple(parameters)
    unknown = [p for p in parameters if p not in PARAMETERS]
    if unknown:
        raise ValueError(f"parameters must be among {PARAMETERS}, got {unknown}")
    return parameters


def _check_count(n_events) -> int:
    return check_integer(n_events, "n_events", 2)
