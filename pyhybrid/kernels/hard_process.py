"""Cross sections and unweighted events of the LO processes at fixed sqrt(s) (Dr.Jit, no torch).

:class:`HardProcess` ties a :class:`~pyhybrid.kernels.matrix_elements.Process`
to a phase-space mapping of the unit hypercube, so that VEGAS
(:mod:`pyhybrid.kernels.vegas`) can integrate it and the adapted grid can
generate unweighted events by hit-or-miss.

Event weights are in pb: w = (hbar c)^2 |M|^2 / (2 s) * dPhi_n / du (massless
incoming beams along +-z, particle 1 along +z).

Mappings of u in [0, 1)^dim:

* ``angles`` (default): 2 -> 2: cos theta = 2 u0 - 1, phi = 2 pi u1 (explicit
  angles of the first outgoing particle). 2 -> 3 (massless): x1 = u0,
  x2 = 1 - u0 u1, cos theta = 2 u2 - 1, phi = 2 pi u3, chi = 2 pi u4.
* ``rambo``: 4 n uniforms per event through RAMBO (any n, massive or not);
  a slower but independent cross-check.

e+e- -> q qbar g needs a cut against the soft/collinear singularities: every
parton pair must have s_ij > y_cut * s (JADE-type invariant-mass cut).
For flavour 'all', the five quark flavours are summed and each event gets one
flavour with probability proportional to its weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import drjit as dr
import numpy as np

from pyhybrid.kernels.backend import KernelTypes
from pyhybrid.kernels.electroweak import QUARKS, SMParameters
from pyhybrid.kernels.matrix_elements import GEV2_TO_PB, Process, get_process, gg_to_ttbar_colour_weights
from pyhybrid.kernels.phase_space import (check_threshold, flux_factor, incoming_momenta, rambo,
                                          three_body_massless, two_body)
from pyhybrid.kernels.vegas import VegasResult, integrate, uniform_points

__all__ = ["MAPPINGS", "HardProcess", "PhasePoints", "UnweightedEvents"]

MAPPINGS = ("angles", "rambo")
_UNWEIGHTING_STREAMS = 1 << 20


@dataclass
class PhasePoints:
    """Momenta (incoming first), total weight [pb] and per-flavour weights of a batch of points."""

    momenta: list
    weight: object
    flavour_weights: list


@dataclass
class UnweightedEvents:
    """Unweighted events (numpy): momenta (n, n_particles, 4) [GeV], PDG ids (n, n_particles),
    colour_flow (n,) (0/1 for g g -> t tbar: top colour-connected to gluon 1/2; else 0),
    plus hit-or-miss bookkeeping (trial points, trials above w_max, w_max [pb])."""

    momenta: np.ndarray
    pdg: np.ndarray
    colour_flow: np.ndarray
    n_trials: int
    n_overweight: int
    max_weight: float


@dataclass
class HardProcess:
    """A process at fixed ``sqrt_s`` [GeV] with parameters, flavour and phase-space mapping."""

    process: Process | str
    sqrt_s: float
    params: SMParameters = field(default_factory=SMParameters)
    flavour: str | None = None
    mapping: str = "angles"
    y_cut: float = 0.01

    def __post_init__(self):
        if isinstance(self.process, str):
            self.process = get_process(self.process)
        self.flavour = self.process.check_flavour(self.flavour)
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        if not (isinstance(self.sqrt_s, (int, float)) and math.isfinite(self.sqrt_s) and self.sqrt_s > 0):
            raise ValueError(f"sqrt_s must be a positive finite number [GeV], got {self.sqrt_s!r}")
        self.params.check()
        check_threshold(self.sqrt_s, self.process.outgoing_masses(self.params))
        if self.process.n_out == 3 and not 0.0 < self.y_cut < 1.0 / 3.0:
            raise ValueError(f"y_cut must lie in (0, 1/3) for {self.process.name}, got {self.y_cut}")

    @property
    def dim(self) -> int:
        """Dimension of the unit hypercube of the mapping."""
        if self.mapping == "rambo":
            return 4 * self.process.n_out
        return 2 if self.process.n_out == 2 else 5

    @property
    def flavours(self) -> tuple[str | None, ...]:
        return QUARKS if self.flavour == "all" else (self.flavour,)

    def points(self, u: list) -> PhasePoints:
        """Map unit-cube points ``u`` (list of ``dim`` arrays) to momenta and weights [pb]."""
        momenta, density, passed = self._phase_space(u)
        scale = GEV2_TO_PB * flux_factor(self.sqrt_s) * density
        flavour_weights = [dr.select(passed, scale * self.process.squared(momenta, self.params, f), 0.0)
                           for f in self.flavours]
        total = flavour_weights[0]
        for w in flavour_weights[1:]:
            total = total + w
        return PhasePoints(momenta, total, flavour_weights)

    def weight(self, u: list):
        """Event weight [pb] at unit-cube points ``u`` (the VEGAS integrand)."""
        return self.points(u).weight

    def _phase_space(self, u: list):
        sqrt_s = self.sqrt_s
        incoming = list(incoming_momenta(sqrt_s))
        masses = self.process.outgoing_masses(self.params)
        if self.mapping == "rambo":
            outgoing, density = rambo(sqrt_s, masses, [1.0 - v for v in u])
        elif self.process.n_out == 2:
            cos_theta, phi = 2.0 * u[0] - 1.0, 2.0 * math.pi * u[1]
            p3, p4, density = two_body(sqrt_s, masses[0], masses[1], cos_theta, phi)
            outgoing, density = [p3, p4], density * 4.0 * math.pi
        else:
            x1, x2 = u[0], 1.0 - u[0] * u[1]
            cos_theta, phi, chi = 2.0 * u[2] - 1.0, 2.0 * math.pi * u[3], 2.0 * math.pi * u[4]
            p3, p4, p5, density = three_body_massless(sqrt_s, x1, x2, cos_theta, phi, chi)
            outgoing, density = [p3, p4, p5], density * u[0] * 8.0 * math.pi**2
        passed = True
        if self.process.n_out == 3:
            s = sqrt_s * sqrt_s
            for i, j in ((0, 1), (0, 2), (1, 2)):
                passed = passed & (2.0 * outgoing[i].dot(outgoing[j]) > self.y_cut * s)
        return incoming + outgoing, density, passed

    def cross_section(self, types: KernelTypes, *, n_points: int = 100_000, adapt_iterations: int = 5,
                      iterations: int = 5, seed: int = 0,
                      advance: Callable[[int], None] | None = None) -> VegasResult:
        """sigma [pb] with its Monte Carlo error (VEGAS over the mapping)."""
        return integrate(self.weight, self.dim, types, n_points=n_points, adapt_iterations=adapt_iterations,
                         iterations=iterations, seed=seed, advance=advance)

    def unweighted_batches(self, types: KernelTypes, result: VegasResult, n_events: int, *, seed: int = 0,
                           batch: int = 100_000) -> Iterator[UnweightedEvents]:
        """Hit-or-miss unweighting with the adapted grid of ``result``, w_max = its largest weight.

        Yields the accepted events of each batch of ``batch`` trial points
        (possibly none) until ``n_events`` are reached. Trial weights above
        w_max (possible, since w_max comes from a finite sample) are counted in
        ``n_overweight`` and such events kept once; the resulting bias is at most
        of the order of the overweight fraction n_overweight / n_trials.
        """
        if n_events < 1:
            raise ValueError(f"n_events must be >= 1, got {n_events}")
        max_weight = result.max_weight
        pdg_table = np.array([self.process.pdg_ids(f) for f in self.flavours], dtype=np.int32)
        accepted, iteration = 0, 0
        while accepted < n_events:
            # Streams disjoint from the integration's (which use 0 .. iterations - 1).
            u = uniform_points(types, batch, self.dim + 2, seed, _UNWEIGHTING_STREAMS + iteration)
            x, jacobian, _ = result.grid.sample(types, u[: self.dim])
            point = self.points(x)
            weight = point.weight * jacobian
            keep = u[self.dim] * max_weight < weight
            # One more uniform picks the flavour (flavour 'all') or the g g -> t tbar colour flow.
            flavour_index = self._choose_flavour(point, u[self.dim + 1], types)
            colour = self._colour_flow(point, u[self.dim + 1], types)
            columns = [c + dr.zeros(types.Float, batch) for p in point.momenta for c in p.columns()]
            dr.eval(weight, keep, flavour_index, colour, *columns)
            take = np.flatnonzero(keep.numpy())[: n_events - accepted]
            n_trials = batch if accepted + len(take) < n_events else int(take[-1]) + 1
            n_overweight = int(np.count_nonzero(weight.numpy()[:n_trials] > max_weight))
            momenta = np.stack([np.asarray(c.numpy(), np.float64)[take] for c in columns], axis=1)
            accepted += len(take)
            iteration += 1
            yield UnweightedEvents(momenta.reshape(len(take), -1, 4), pdg_table[flavour_index.numpy()[take]],
                                   colour.numpy()[take].astype(np.int8), n_trials, n_overweight, max_weight)

    def unweighted_events(self, types: KernelTypes, result: VegasResult, n_events: int, *, seed: int = 0,
                          batch: int = 100_000) -> UnweightedEvents:
        """All ``n_events`` of :meth:`unweighted_batches` in one :class:`UnweightedEvents`."""
        chunks = list(self.unweighted_batches(types, result, n_events, seed=seed, batch=batch))
        return UnweightedEvents(np.concatenate([c.momenta for c in chunks]), np.concatenate([c.pdg for c in chunks]),
                                np.concatenate([c.colour_flow for c in chunks]), sum(c.n_trials for c in chunks),
                                sum(c.n_overweight for c in chunks), result.max_weight)

    def _choose_flavour(self, point: PhasePoints, u, types: KernelTypes):
        """Flavour index with probability w_f / sum w (0 for a single flavour)."""
        index = dr.zeros(types.UInt32, dr.width(u))
        if len(point.flavour_weights) == 1:
            return index
        threshold = u * point.weight
        cumulative = 0.0
        for w in point.flavour_weights[:-1]:
            cumulative = cumulative + w
            index = index + types.UInt32(dr.select(threshold >= cumulative, 1, 0))
        return index

    def _colour_flow(self, point: PhasePoints, u, types: KernelTypes):
        """g g -> t tbar: 1 (top connected to gluon 2) with its leading-colour probability; else 0."""
        if self.process.name != "gg_tt":
            return dr.zeros(types.UInt32, dr.width(u))
        w13, _ = gg_to_ttbar_colour_weights(point.momenta)
        return types.UInt32(dr.select(u < w13, 0, 1))

