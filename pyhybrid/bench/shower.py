"""Benchmark cases of the parton shower (events per second).

* ``shower``: e+e- -> q qbar + dipole shower only;
* ``shower-observables``: shower + Durham y23..y56 + thrust (the issue's target metric);
* ``shower-gradient-<estimator>``: one estimator pass (score function, Stochastic AD,
  relaxed) of d E[histogram of log10 y23] / d (alpha_s, t0), features and per-event derivatives.

There is no torch-eager implementation of a parton shower (the branching, variable-length
event record has no natural tensor form); the deliberately simple scalar-Python
reference ``tests/reference/python_shower.py`` is timed separately in benchmarks/shower.md
(it would need minutes for one call of these sizes).
"""
from __future__ import annotations

import drjit as dr
import numpy as np

from pyhybrid.bench.harness import BenchCase

N_EVENTS = 100_000
N_GRADIENT_EVENTS = 50_000
CUDA_EVENTS = 2_000_000  # a GPU needs ~1e6 events in flight
EDGES = tuple(np.linspace(-3.5, -0.5, 7))


def _shower_setup(with_observables: bool):
    def setup(device: str, precision: str, n_events: int):
        from pyhybrid.kernels.backend import kernel_types
        from pyhybrid.kernels.observables import event_shapes
        from pyhybrid.kernels.shower import ShowerSettings, run_shower

        types = kernel_types(device, precision)
        settings = ShowerSettings()
        seeds = iter(range(1, 10**9))

        def call():
            result = run_shower(types, n_events, settings, next(seeds))
            if with_observables:
                record = result.record
                event_shapes([record.E, record.px, record.py, record.pz], result.n_particles, settings.s)
            dr.sync_thread()

        return call, None

    return setup


def _gradient_setup(estimator_name: str):
    def setup(device: str, precision: str, n_events: int):
        import torch

        from pyhybrid.estimators import HistogramObservable, Relaxed, ScoreFunction, StochasticAD
        from pyhybrid.nn.shower import PartonShower

        estimators = {"score-function": ScoreFunction, "stochastic-ad": StochasticAD, "relaxed": Relaxed}
        estimator = estimators[estimator_name]()
        dtype = torch.float64 if precision == "float64" else torch.float32
        shower = PartonShower(dtype=dtype, device=device)
        spec = HistogramObservable("log10_y23", EDGES)
        seeds = iter(range(1, 10**9))

        def call():
            estimator.estimate(shower, spec, n_events, next(seeds))
            dr.sync_thread()

        return call, None

    return setup


CASES = [
    BenchCase("shower", "events", N_EVENTS, _shower_setup(False), cuda_batch=CUDA_EVENTS),
    BenchCase("shower-observables", "events", N_EVENTS, _shower_setup(True), cuda_batch=CUDA_EVENTS),
    *[BenchCase(f"shower-gradient-{name}", "events", N_GRADIENT_EVENTS, _gradient_setup(name), grad=True,
                cuda_batch=CUDA_EVENTS)
      for name in ("score-function", "stochastic-ad", "relaxed")],
]
