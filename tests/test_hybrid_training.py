"""Hybrid training on small seeded runs: Example A (network + propagator) and Example B (learned distortion).

The examples are loaded from examples/ (not a package), so these tests also
exercise the demo code. The detector is the examples' barrel cut to its six
innermost layers to keep the runs short.
"""
import importlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
A = importlib.import_module("hybrid_tracking")
B = importlib.import_module("learned_correction")
SETUP = replace(A.Setup(), radii=(32.0, 72.0, 116.0, 172.0, 260.0, 360.0), rounds=3, steps_per_round=60,
                batch_size=128, seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study():
    """300 training and 400 test tracks; the hybrid trained on hit residuals only; the least-squares reference."""
    torch.set_num_threads(1)
    sigma = A.sigma_per_layer(SETUP, torch.float64)
    radii = torch.tensor(SETUP.radii, dtype=torch.float64)
    train = A.simulate(SETUP, 300, seed=1)
    test = A.simulate(SETUP, 400, seed=2)
    physics = A.make_physics(SETUP, scattering="none")
    encoder, history = A.train_through(physics, SETUP, train, sigma, seed=5, advance=lambda n: None)
    with torch.no_grad():
        hybrid = encoder(test["measured"])
    reference = A.least_squares(physics, test["measured"], sigma, radii, 6)
    refined = A.least_squares(physics, test["measured"], sigma, radii, 2, start=hybrid)
    return dict(history=history, hybrid=hybrid, reference=reference, refined=refined, test=test,
                physics=physics, train=train, sigma=sigma, encoder=encoder)


def test_hybrid_chi2_decreases_every_round(study):
    history = study["history"]
    # median chi2 of the network's own predictions (12 measurements): measured 8e6 -> 5e3 -> 27 -> 23
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 40


def test_hybrid_recovers_the_truth_without_labels(study):
    """Resolution and bias of the trained network alone vs truth, with the least-squares fit as the scale.

    Measured (300 training tracks): hybrid / least-squares sigma68 = 1.0 (d0, z0, phi, theta) and
    1.65 (q/p); the network's q/p has a median relative bias of 1.9 % (least squares: 0.1 %), the
    shrinkage of a regression trained on 300 tracks.
    """
    truth = study["test"]["truth"]
    hybrid = A.parameter_resolution(study["hybrid"], truth)
    reference = A.parameter_resolution(study["reference"], truth)
    limits = {"d0": 1.3, "z0": 1.3, "phi": 1.3, "theta": 1.3, "qop": 2.5}
    for name, factor in limits.items():
        assert hybrid[name] < factor * reference[name], (name, hybrid[name], reference[name])
    bias = (study["hybrid"] - truth).median(0).values
    assert abs(float(bias[0])) < 0.01 and abs(float(bias[1])) < 0.02  # mm
    assert abs(float(bias[2])) < 1e-4 and abs(float(bias[3])) < 1e-4  # rad
    assert abs(float(((study["hybrid"][:, 4] - truth[:, 4]) / truth[:, 4]).median())) < 0.03


def test_refined_hybrid_reaches_the_least_squares_minimum(study):
    """Two Gauss-Newton steps from the network's prediction land on the per-track chi2 minimum."""
    difference = (study["refined"] - study["reference"]).abs().max(0).values
    assert difference[0] < 1e-6 and difference[1] < 1e-6  # mm
    assert difference[4] < 1e-8


def test_end_to_end_gradient_training_lowers_the_chi2(study):
    """Plain Adam on the chi2, gradients through the propagator (the path DDP uses)."""
    physics, train, sigma = study["physics"], study["train"], study["sigma"]
    encoder = A.new_encoder(SETUP, train["measured"], seed=9)
    model = torch.nn.Sequential(encoder, physics)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = ((model(train["measured"]) - train["measured"]) / sigma).pow(2).sum((1, 2)).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])


def test_learned_distortion_restores_the_fit():
    """Example B in small: the correction network inside the pipeline learns the unknown strip deformation.

    Three pixel layers are the reference, the three strip layers are deformed. Measured (400 tracks,
    2 rounds): chi2/ndf of test-track fits 4.9 (nominal) -> 1.09 (learned) vs 0.99 (true distortion);
    the rms of (learned - true shift) is 49 % (r*phi) and 53 % (z) of the rms shift.
    """
    torch.manual_seed(0)
    setup = replace(SETUP, pixel_layers=3, seed=4)
    sigma = A.sigma_per_layer(setup, torch.float64)
    radii = torch.tensor(setup.radii, dtype=torch.float64)
    distortion = B.LayerDistortion(setup.radii, first_distorted=setup.pixel_layers, seed=4)
    train = B.simulate(setup, distortion, 400, seed=5)
    test = B.simulate(setup, distortion, 300, seed=6)
    physics = A.make_physics(setup, scattering="none")
    model = B.Component(physics=physics, correction=B.HitCorrection(
        setup.radii, layers=range(setup.pixel_layers, len(setup.radii))).double())
    history = B.train_correction(setup, model, train, sigma, radii, rounds=2, steps=100, advance=lambda n: None)
    assert history[-1] < 0.4 * history[0]
    n_dof = 2 * len(radii) - 5

    def fitted_chi2(component):
        params = A.least_squares(component, test["measured"], sigma, radii, 5)
        with torch.no_grad():
            return float((A.local_residuals(component(params), test["measured"], radii) / sigma).pow(2)
                         .sum((1, 2)).median()) / n_dof

    nominal, learned = fitted_chi2(model.use("physics")), fitted_chi2(model.use("residual"))
    oracle = fitted_chi2(B.Component(physics=physics, correction=distortion))
    assert learned < 1.3 * oracle and 3 * oracle < nominal
    with torch.no_grad():
        true_shift = distortion(None, test["true_hits"])
        error = model.correction(None, test["true_hits"]) - true_shift
    relative = (error.pow(2).mean((0, 1)) / true_shift.pow(2).mean((0, 1))).sqrt()
    assert relative[0] < 0.75 and relative[1] < 0.75
