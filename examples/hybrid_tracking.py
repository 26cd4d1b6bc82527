#!/usr/bin/env python
"""Example A: a network + the differentiable propagator, trained on hit residuals only.

Task: estimate the perigee parameters (d0, z0, phi, theta, q/p) of muons from
their noisy hits on the 10 barrel layers of an ACTS-like silicon tracker in a
2 T solenoid. Compared, for several training-set sizes N:

* ``hybrid``          network (hits -> parameters) followed by the Propagator
                      (parameters -> predicted hits); trained on the chi^2 of the
                      hit residuals only -- no truth labels -- with Gauss-Newton
                      preconditioning (:func:`pyhybrid.nn.hybrid.fit_through_physics`).
* ``hybrid+refine``   the same trained model, plus two Gauss-Newton steps through
                      the propagator at inference time (physics also at test time).
* ``surrogate``       the same training, with the propagator swapped for a network
                      surrogate fitted to it on simulated tracks (``Component`` in
                      ``surrogate`` mode): how much exact physics is worth.
* ``supervised``      pure network trained on the truth parameters (labels a real
                      detector does not have).
* ``direct``          pure network predicting the hits directly (5-number bottleneck,
                      no physics), trained on the same hit residuals; its bottleneck
                      is not identifiable as track parameters, so only its hit
                      resolution is reported.
* ``least-squares``   no network: a per-track Gauss-Newton fit through the propagator
                      from a straight-line seed (the reference resolution).

The data are simulated with the same propagator, with multiple scattering sampled
in 0.3 mm of silicon per layer (the models propagate without it, as a simple
track fit would) and Gaussian measurement noise. All numbers are measured on
held-out tracks: sigma68 = half-width of the central 68 % interval of
(estimate - truth). Everything is seeded.

Run:  python examples/hybrid_tracking.py --quick -o out/   (< 2 min on 2 CPU cores)
      python examples/hybrid_tracking.py -o out/           (the full scan, ~15 min)
Writes out/hybrid_tracking.png, out/hybrid_tracking.h5 (pyhybrid.io layout) and
prints the comparison table.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pyhybrid.engine import set_threads
from pyhybrid.io import EventWriter
from pyhybrid.nn.hybrid import (Component, PerigeeHits, Surrogate, TrackEncoder, canonical_frame, fit,
                                fit_surrogate, fit_through_physics, gauss_newton_step, rotate_hits,
                                rotate_perigee)
from pyhybrid.nn.propagator import RK4, Propagator, SolenoidField, barrel
from pyhybrid.progress import progress_bar

PARAMETERS = ("d0", "z0", "phi", "theta", "qop")
#: How each parameter's sigma68 is reported: (label, factor from the internal unit).
REPORTED = {"d0": ("d0 [um]", 1e3), "z0": ("z0 [um]", 1e3), "phi": ("phi [mrad]", 1e3),
            "theta": ("theta [mrad]", 1e3), "qop": ("q/p [%]", 100.0)}


@dataclass(frozen=True)
class Setup:
    """Detector, data and training settings (lengths in mm, momenta in GeV, field in T)."""

    radii: tuple = (32.0, 72.0, 116.0, 172.0, 260.0, 360.0, 500.0, 660.0, 820.0, 1020.0)
    half_length: float = 3000.0
    pixel_layers: int = 4
    sigma_pixel: tuple = (0.015, 0.050)   # (r*phi, z) resolution of pixel layers
    sigma_strip: tuple = (0.050, 0.500)   # (r*phi, z) resolution of strip layers (stereo z)
    thickness: float = 0.3               # silicon per layer; multiple scattering sampled in the data
    b_field: float = 2.0
    step_size: float = 50.0              # RK4 step [mm]
    pt_range: tuple = (1.0, 10.0)
    eta_max: float = 1.0
    d0_sigma: float = 0.1
    z0_sigma: float = 50.0
    sizes: tuple = (100, 300, 1000, 3000, 10000)
    n_test: int = 2000
    n_simulated: int = 20000             # tracks to fit the surrogate on
    rounds: int = 5                      # Gauss-Newton rounds of the hybrid training
    steps_per_round: int = 400
    network_steps: int = 2000            # Adam steps of the supervised and direct networks
    surrogate_steps: int = 4000
    batch_size: int = 256
    hidden: tuple = (128, 128)
    seed: int = 7


QUICK = dict(sizes=(200, 800, 2400), n_test=1000, n_simulated=6000, rounds=3, steps_per_round=250,
             network_steps=900, surrogate_steps=1200)


def sigma_per_layer(setup: Setup, dtype) -> torch.Tensor:
    rows = [setup.sigma_pixel] * setup.pixel_layers + [setup.sigma_strip] * (len(setup.radii) - setup.pixel_layers)
    return torch.tensor(rows, dtype=dtype)


def make_physics(setup: Setup, scattering: str) -> PerigeeHits:
    layers = barrel(setup.radii, half_length=setup.half_length, thickness=setup.thickness)
    return PerigeeHits(Propagator(SolenoidField(setup.b_field), layers, stepper=RK4(step_size=setup.step_size),
                                  energy_loss=True, scattering=scattering))


def sample_truth(setup: Setup, n: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """Perigee parameters (n, 5) of muons: pT, eta uniform; phi uniform; d0, z0 Gaussian."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=dtype)

    pt = uniform(*setup.pt_range)
    theta = 2 * torch.atan(torch.exp(-uniform(-setup.eta_max, setup.eta_max)))
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    d0 = setup.d0_sigma * torch.randn(n, generator=generator, dtype=dtype)
    z0 = setup.z0_sigma * torch.randn(n, generator=generator, dtype=dtype)
    return torch.stack([d0, z0, uniform(-math.pi, math.pi), theta, charge * torch.sin(theta) / pt], dim=1)


def simulate(setup: Setup, n: int, seed: int, dtype=torch.float64) -> dict:
    """Truth parameters, true hits (with sampled scattering) and measured hits, in the canonical frame."""
    generator = torch.Generator().manual_seed(seed)
    truth = sample_truth(setup, n, generator, dtype)
    physics = make_physics(setup, scattering="sample")
    with torch.no_grad():
        true_hits = physics(truth, seed=seed)
    if not bool(physics.valid.all()):
        raise RuntimeError("a simulated track missed a layer; check the acceptance settings")
    noise = sigma_per_layer(setup, dtype) * torch.randn(true_hits.shape, generator=generator, dtype=dtype)
    radii = torch.tensor(setup.radii, dtype=dtype)
    measured, phi_ref = canonical_frame(true_hits + noise, radii)
    return {"truth": rotate_perigee(truth, -phi_ref), "measured": measured,
            "true_hits": rotate_hits(true_hits, -phi_ref, radii)}
