"""Score-function (likelihood-ratio, REINFORCE) estimator for the parton shower.

With the overestimate of the veto algorithm held fixed, the probability of a
shower history (all trial emissions, accepted and vetoed) depends on alpha_s(mZ)
only through the acceptance probabilities p_k = f_k / g_k, so

    d log P / d alpha_s = sum_accepted d ln p_k + sum_vetoed d ln(1 - p_k)
                        = sum_accepted d ln alpha_s(t_k) - sum_vetoed p_k d ln alpha_s(t_k) / (1 - p_k),

accumulated per event inside the shower kernel (``ShowerResult.score_alpha``).
d E[F] / d alpha_s = E[(F - b) S] for any baseline b independent of the event;
the default control variate is the leave-one-out optimal baseline
b_k = sum_j F_jk S_j^2 / sum_j S_j^2 (event i excluded), which keeps the estimate unbiased.

The cutoff t0 bounds the support of the emission scales, so the plain score
(the t0-dependence of the last no-emission probability) is not enough; the
generalised likelihood ratio adds the boundary term, and the two combine into
:func:`~pyhybrid.estimators.base.boundary_derivative` (one extra emission at t0).
"""
from __future__ import annotations

from typing import Sequence

from pyhybrid.estimators.base import (GradientEstimator, HistogramObservable, boundary_derivative, check_overflow,
                                      leave_one_out_baseline, shapes_of)
from pyhybrid.kernels.backend import KernelTypes
from pyhybrid.kernels.shower import ShowerSettings, run_shower

__all__ = ["ScoreFunction"]

BASELINES = ("leave-one-out", "none")


class ScoreFunction(GradientEstimator):
    """Likelihood-ratio estimator with a baseline: ``baseline`` "leave-one-out" (default) or "none"."""

    name = "score function"

    def __init__(self, baseline: str = "leave-one-out"):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        self.baseline = baseline

    def per_event(self, types: KernelTypes, settings: ShowerSettings, observable_spec: HistogramObservable,
                  n_events: int, seed: int, parameters: Sequence[str]):
        result = run_shower(types, n_events, settings, seed)
        check_overflow(result)
        values = observable_spec.features(shapes_of(result))
        derivatives = {}
        if "alpha_s" in parameters:
            score = result.score_alpha
            if self.baseline == "leave-one-out":
                baselines = leave_one_out_baseline(values, score)
                derivatives["alpha_s"] = [(f - b) * score for f, b in zip(values, baselines)]
            else:
                derivatives["alpha_s"] = [f * score for f in values]
        if "t0" in parameters:
            derivatives["t0"] = boundary_derivative(types, result, observable_spec, values, seed)
        return values, derivatives
