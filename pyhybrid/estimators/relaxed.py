"""Relaxed (smoothed, biased) pathwise estimator: trades bias for variance.

Two relaxations make the shower expectation smooth enough for pathwise
derivatives:

* sigmoid cuts: histogram bins with sigmoid edges of width ``bin_width``
  (observable units), and the cutoff theta(t - t0) replaced by
  sigma(ln(t / t0) / cutoff_width) in the acceptance probability (the relaxed model);
* fixed coupling-weighted evolution time: with tau = int_t^s alpha_s dt'/t' held
  fixed, raising alpha_s(mZ) moves every emission scale by
  dt / d alpha_s = t / alpha_s(t) * d/d alpha_s int_{ln t}^{ln s} alpha_s d ln t'
  while the veto decisions stay (the "event mover" coupling). The shower kernel
  carries the resulting momentum tangents (forward mode); the observables are
  differentiated at fixed clustering history / thrust partition.

d F / d alpha_s = pathwise term + the likelihood ratio of the sigmoid cutoff
factors as the trial scales move (local to t ~ t0); d F / d t0 = likelihood ratio
of the cutoff factors (again local). Both use leave-one-out baselines.

Neglected (the bias, besides the smoothing): veto decisions flipping because the
acceptance depends on t at fixed z through y = t / (m^2 z (1 - z)) and the
phase-space boundary y < 1, and clustering-history jumps. As bin_width and
cutoff_width -> 0 the relaxed model tends to the shower, but the pathwise part
stays biased by the neglected flips (measured in docs/shower.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from pyhybrid.estimators.base import (GradientEstimator, HistogramObservable, check_overflow,
                                      leave_one_out_baseline, shapes_of)
from pyhybrid.kernels.backend import KernelTypes
from pyhybrid.kernels.shower import ShowerSettings, run_shower

__all__ = ["Relaxed"]


class Relaxed(GradientEstimator):
    """Relaxed pathwise estimator.

    bin_width: sigmoid width of the bin edges in units of the observable, or None for a
        quarter of the narrowest bin;
    cutoff_width: sigmoid width of the cutoff in ln t.
    """

    name = "relaxed"

    def __init__(self, bin_width: float | None = None, cutoff_width: float = 0.1):
        if bin_width is not None and not bin_width > 0:
            raise ValueError(f"bin_width must be positive, got {bin_width}")
        if not 0.0 < cutoff_width <= 1.0:
            raise ValueError(f"cutoff_width must lie in (0, 1], got {cutoff_width}")
        self.bin_width = bin_width
        self.cutoff_width = cutoff_width

    def width_for(self, observable_spec: HistogramObservable) -> float:
        if self.bin_width is not None:
            return self.bin_width
        edges = observable_spec.edges
        return 0.25 * min(b - a for a, b in zip(edges, edges[1:]))

    def per_event(self, types: KernelTypes, settings: ShowerSettings, observable_spec: HistogramObservable,
                  n_events: int, seed: int, parameters: Sequence[str]):
        relaxed = replace(settings, cutoff_width=self.cutoff_width)
        want_alpha = "alpha_s" in parameters
        result = run_shower(types, n_events, relaxed, seed, tangents=want_alpha)
        check_overflow(result)
        values, pathwise = observable_spec.soft_features(shapes_of(result, tangents=want_alpha),
                                                         self.width_for(observable_spec))
        derivatives = {}
        if want_alpha:
            score = result.score_fixed_tau
            baselines = leave_one_out_baseline(values, score)
            derivatives["alpha_s"] = [d + (f - b) * score for d, f, b in zip(pathwise, values, baselines)]
        if "t0" in parameters:
            score = result.score_t0
            baselines = leave_one_out_baseline(values, score)
            derivatives["t0"] = [(f - b) * score for f, b in zip(values, baselines)]
        return values, derivatives
