"""Relaxed pathwise estimator: smooth observables, moving emission scales; bias for variance.

The shower's events do not move continuously with alpha_s(mZ) at fixed random
numbers of the veto algorithm. This estimator uses another coupling of the
events at neighbouring parameters and smooth ("relaxed") observables:

* fixed coupling-weighted evolution time tau = int_t^s alpha_s dt'/t' (the
  "event mover" coupling): trials are thinned by alpha_s / alpha_max into the
  tau-process, whose trials sit at fixed tau; raising alpha_s(mZ) moves every
  emission scale by dt / d alpha_s = t / alpha_s(t) * d/d alpha_s int_{ln t}^{ln s} alpha_s d ln t'.
  The kernel carries the momentum tangents (forward mode, ``tangents=True``);
  the observables are differentiated at fixed clustering history / thrust partition.
* sigmoid cuts: histogram bins with sigmoid edges of width ``bin_width``
  (observable units), otherwise the pathwise derivative of a bin is zero.

With ``likelihood_ratio=True`` (default) the decisions that this motion changes
are accounted for as well: the likelihood ratio of the acceptance probability
(1 - y) f/g at fixed tau (``ShowerResult.score_fixed_tau``, leave-one-out
baseline) and the cutoff, which the moving scales cross:
+rho(t0) dt/d alpha_s|_{t0} (F(event + emission at t0) - F(event)). What stays
neglected: the dependence of the dipole choice and z range on the moving
dipole masses, and jumps of the clustering history, next to the smoothing bias
of the sigmoid bins. With ``likelihood_ratio=False`` only the pathwise term
remains: lowest variance, biased (about a factor 2 on log10 y23 bins, see docs/shower.md).

``cutoff_width > 0`` relaxes the cutoff as well: the shower accepts with an extra
factor sigma(ln(t / t0) / cutoff_width), and the t0 derivative becomes the
likelihood ratio of these factors (a different, smoothed model). With the hard
cutoff (``cutoff_width=0``) the t0 derivative is the boundary term of
:func:`~pyhybrid.estimators.base.boundary_derivative` on the smooth bins.

Seeds: with alpha_s(mZ) among the differentiated parameters the kernel draws one more random
number per trial, so the same seed gives other events than without it (e.g. with alpha_s frozen,
or under ``torch.no_grad``): for common random numbers, compare runs that differentiate the same
parameters. The score-function and Stochastic-AD estimators draw the same events either way.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import replace
from typing import Sequence

from pyhybrid.estimators.base import (GradientEstimator, HistogramObservable, check_overflow,
                                      leave_one_out_baseline, shapes_of)
from pyhybrid.kernels.backend import KernelTypes
from pyhybrid.kernels.observables import event_shapes
from pyhybrid.kernels.shower import ShowerSettings, boundary_emission, run_shower

__all__ = ["Relaxed"]


class Relaxed(GradientEstimator):
    """Relaxed pathwise estimator.

    bin_width: sigmoid width of the bin edges in units of the observable, or None for a
        quarter of the narrowest bin;
    likelihood_ratio: add the likelihood ratio of the acceptance decisions at fixed
        coupling-weighted time and the cutoff-crossing term (removes most of the bias,
        raises the variance); False gives the pure pathwise estimator;
    cutoff_width: 0 for the hard cutoff, else the sigmoid width of the relaxed cutoff in
        ln t (the coupling must stay perturbative 8 widths below t0: at most ~0.15 for
        t0 = 1 GeV^2).
    """

    name = "relaxed"

    def __init__(self, bin_width: float | None = None, likelihood_ratio: bool = True, cutoff_width: float = 0.0):
        if bin_width is not None and not (isinstance(bin_width, numbers.Real) and not isinstance(bin_width, bool)
                                          and 0 < bin_width < math.inf):
            raise ValueError(f"bin_width must be a positive finite number or None, got {bin_width!r}")
        if isinstance(cutoff_width, bool) or not (isinstance(cutoff_width, numbers.Real) and 0.0 <= cutoff_width <= 1.0):
            raise ValueError(f"cutoff_width must be a number in [0, 1], got {cutoff_width!r}")
        if not isinstance(likelihood_ratio, bool):
            raise ValueError(f"likelihood_ratio must be True or False, got {likelihood_ratio!r}")
        self.bin_width = bin_width
        self.likelihood_ratio = bool(likelihood_ratio)
        self.cutoff_width = float(cutoff_width)

    def width_for(self, observable_spec: HistogramObservable) -> float:
        if self.bin_width is not None:
            return self.bin_width
        edges = observable_spec.edges
        return 0.25 * min(b - a for a, b in zip(edges, edges[1:]))

    def per_event(self, types: KernelTypes, settings: ShowerSettings, observable_spec: HistogramObservable,
                  n_events: int, seed: int, parameters: Sequence[str]):
        model = replace(settings, cutoff_width=self.cutoff_width)
        width = self.width_for(observable_spec)
        want_alpha = "alpha_s" in parameters
        result = run_shower(types, n_events, model, seed, tangents=want_alpha)
        check_overflow(result)
        values, pathwise = observable_spec.soft_features(shapes_of(result, tangents=want_alpha), width)
        hard_cutoff = self.cutoff_width == 0.0
        crossing = None
        if hard_cutoff and ("t0" in parameters or (want_alpha and self.likelihood_ratio)):
            extra = boundary_emission(types, result, seed)
            record = extra.record
            shapes = event_shapes([record.E, record.px, record.py, record.pz], extra.n_particles, model.s)
            with_emission, _ = observable_spec.soft_features(shapes, width)
            crossing = [extra.rate * (f_new - f) for f_new, f in zip(with_emission, values)]
        derivatives = {}
        if want_alpha:
            derivatives["alpha_s"] = list(pathwise)
            if self.likelihood_ratio:
                score = result.score_fixed_tau
                baselines = leave_one_out_baseline(values, score)
                derivatives["alpha_s"] = [d + (f - b) * score for d, f, b in zip(pathwise, values, baselines)]
                if hard_cutoff:
                    coupling = model.coupling
                    t_dot = model.t0 * coupling.integral_derivative(model.t0, model.s) / coupling(model.t0)
                    derivatives["alpha_s"] = [d + t_dot * c for d, c in zip(derivatives["alpha_s"], crossing)]
        if "t0" in parameters:
            if hard_cutoff:
                derivatives["t0"] = [-c for c in crossing]
            else:
                score = result.score_t0
                baselines = leave_one_out_baseline(values, score)
                derivatives["t0"] = [(f - b) * score for f, b in zip(values, baselines)]
        return values, derivatives
