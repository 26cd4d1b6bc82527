"""Gradient estimators for programs with discrete randomness (the parton shower): one interface,
usable from torch. See :mod:`pyhybrid.estimators.base`."""
from pyhybrid.estimators.base import PARAMETERS, Estimate, GradientEstimator, HistogramObservable
from pyhybrid.estimators.relaxed import Relaxed
from pyhybrid.estimators.score_function import ScoreFunction
from pyhybrid.estimators.stochastic_ad import StochasticAD

__all__ = ["PARAMETERS", "Estimate", "GradientEstimator", "HistogramObservable", "Relaxed", "ScoreFunction",
           "StochasticAD"]
