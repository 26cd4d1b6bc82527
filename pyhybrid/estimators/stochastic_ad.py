"""Stochastic automatic differentiation for the discrete veto decisions of the shower.

Stochastic AD (G. Arya, M. Schauer, F. Schaefer, C. Rackauckas, "Automatic
differentiation of programs with discrete randomness", NeurIPS 2022; applied to
branching HEP programs by M. Kagan and L. Heinrich, arXiv:2308.16680): a
Bernoulli decision X = [u < p(theta)] has, besides its (zero) continuous
derivative, an infinitesimal probability |dp| / (1 - p) d theta (veto) or |dp| / p
d theta (accept) of flipping. Every trial emission of the veto algorithm is such a
decision, with dp / d alpha_s = p d ln alpha_s(t) (the overestimate is fixed).

Per event the kernel keeps one flip, chosen among all trials with probability
w_k / W by weighted reservoir sampling (W = sum_k w_k, "pruning"), and a second
shower run with the same random numbers replays the event with that decision
inverted (later randomness reused: the paths are coupled). The estimator is
W (F(alternative) - F(primal)), unbiased; only the changed part of the event enters, but
the flip weights of all vetoed trials add up: for this shower its variance is 0.8-2.5x that
of the score function with a leave-one-out baseline (docs/shower.md, per histogram bin).

The t0 cutoff is a support boundary: its stochastic derivative is the
alternative "one more emission at t0" with weight rho(t0) (see
:func:`~pyhybrid.estimators.base.boundary_derivative`).
"""
from __future__ import annotations

from typing import Sequence

from pyhybrid.estimators.base import (GradientEstimator, HistogramObservable, boundary_derivative, check_overflow,
                                      shapes_of)
from pyhybrid.kernels.backend import KernelTypes
from pyhybrid.kernels.shower import ShowerSettings, run_shower

__all__ = ["StochasticAD"]


class StochasticAD(GradientEstimator):
    """Stochastic-AD estimator with one pruned alternative path per event."""

    name = "stochastic AD"

    def per_event(self, types: KernelTypes, settings: ShowerSettings, observable_spec: HistogramObservable,
                  n_events: int, seed: int, parameters: Sequence[str]):
        want_alpha = "alpha_s" in parameters
        primal = run_shower(types, n_events, settings, seed, stochastic_ad=want_alpha)
        check_overflow(primal)
        values = observable_spec.features(shapes_of(primal))
        derivatives = {}
        if want_alpha:
            alternative = run_shower(types, n_events, settings, seed, flip_trial=primal.sad_trial)
            check_overflow(alternative)
            flipped = observable_spec.features(shapes_of(alternative))
            derivatives["alpha_s"] = [primal.sad_weight * (f_alt - f) for f_alt, f in zip(flipped, values)]
        if "t0" in parameters:
            derivatives["t0"] = boundary_derivative(types, primal, observable_spec, values, seed)
        return values, derivatives
