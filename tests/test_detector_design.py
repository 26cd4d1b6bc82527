"""Detector-design objectives: tracker resolutions against analytic results and a Monte Carlo with
sampled multiple scattering, their gradients; the calorimeter objective's gradients against
common-random-number finite differences, joint training and the grid scan."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyhybrid.nn.calorimeter import SamplingCalorimeter
from pyhybrid.nn.detector_design import (CalorimeterDesign, EnergyRegression, History, TrackerDesign, evaluate,
                                         fit_regression, fit_resolution_terms, grid_scan, material_cost,
                                         perigee_to_free, train_jointly)
from pyhybrid.nn.propagator import CylinderLayer, Propagator, UniformField

F64 = torch.float64
RADII = [40.0, 80.0, 150.0, 250.0, 400.0]


def tensor(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------- tracker


def test_tracker_without_material_matches_gluckstern_and_least_squares():
    """No material: sigma(pT)/pT = sigma pT / (0.2998 B L^2) sqrt(720 (N-1)^3 / ((N-2) N (N+1) (N+2))) for N
    equidistant layers (Gluckstern, exact form), d0 and z0 = intercept errors of the parabola / line fits."""
    n, sigma_rphi, sigma_z, b = 10, 0.02, 0.03, 2.0
    radii = np.linspace(50.0, 500.0, n)
    tracker = TrackerDesign(radii, thickness=1e-6, resolution_rphi=sigma_rphi, resolution_z=sigma_z, b_field=b,
                            beam_pipe=None, trainable=())
    pt = tensor(100.0, 1000.0)
    with torch.no_grad():
        res = tracker.resolutions(pt, tensor(0.0, 0.0))
    lever = (radii[-1] - radii[0]) * 1e-3
    gluckstern = (sigma_rphi * 1e-3 * pt / (0.299792458 * b * lever**2)
                  * math.sqrt(720.0 * (n - 1) ** 3 / ((n - 2) * n * (n + 1) * (n + 2))))
    torch.testing.assert_close(res["pt"], gluckstern, rtol=1e-4, atol=0.0)
    parabola = np.stack([np.ones(n), radii, radii**2 / 2], axis=1)
    line = np.stack([np.ones(n), radii], axis=1)
    assert res["d0"][0].item() == pytest.approx(sigma_rphi * math.sqrt(np.linalg.inv(parabola.T @ parabola)[0, 0]),
                                                rel=1e-6)
    assert res["z0"][0].item() == pytest.approx(sigma_z * math.sqrt(np.linalg.inv(line.T @ line)[0, 0]), rel=1e-6)


def test_tracker_single_scatterer_gives_radius_times_highland_angle():
    """Perfect layers behind a 0.8 mm beryllium beam pipe at r = 25 mm: sigma(d0) = sigma(z0) = r theta0."""
    tracker = TrackerDesign(RADII, thickness=1e-6, resolution_rphi=1e-5, resolution_z=1e-5,
                            beam_pipe=(25.0, 0.8, "beryllium"), trainable=())
    muon = 0.1056583755
    for pt in (1.0, 10.0):
        with torch.no_grad():
            res = tracker.resolutions(tensor(pt), tensor(0.0))
        beta = pt / math.hypot(pt, muon)
        x = 0.8 / 352.8  # x / X0 of beryllium
        theta0 = 0.0136 / (beta * pt) * math.sqrt(x) * (1 + 0.038 * math.log(x / beta**2))
        assert res["d0"].item() == pytest.approx(25.0 * theta0, rel=2e-4)
        assert res["z0"].item() == pytest.approx(25.0 * theta0, rel=2e-4)


def test_tracker_covariance_matches_monte_carlo_with_sampled_scattering():
    """Fitting tracks propagated with random Highland deflections (the propagator's 'sample' mode) and
    smeared hits with the linear estimator C H^T V^-1 gives the spread the covariance predicts."""
    torch.manual_seed(3)
    tracker = TrackerDesign(RADII, thickness=0.5, resolution_rphi=0.01, resolution_z=0.05, trainable=())
    pt, eta = tensor(0.7), tensor(0.5)
    with torch.no_grad():
        fit = tracker.fit_matrices(pt, eta)
        covariance = tracker.track_covariance(pt, eta)[0]
    jacobian, hit_covariance, nominal, mask = (fit[k][0] for k in ("jacobian", "covariance", "hits", "mask"))
    layers = [CylinderLayer(radius=r, thickness=t, material=m.name)
              for r, t, m in zip([25.0] + RADII, [0.8] + [0.5] * 5, tracker.materials)]
    sampler = Propagator(UniformField((0.0, 0.0, 2.0)), layers, scattering="sample", surface_tolerance=1e-5)
    n = 8000
    theta, qop = 2 * torch.atan(torch.exp(-eta)), 1.0 / (pt * torch.cosh(eta))
    perigee = torch.cat([torch.zeros(1, 3, dtype=F64), theta[:, None], qop[:, None]], 1).expand(n, 5)
    with torch.no_grad():
        hits = sampler(perigee_to_free(perigee), seed=11).local.reshape(n, -1)
    sigma = tensor(1.0, 1.0, *([0.01, 0.05] * 5))
    hits = hits + torch.randn_like(hits) * sigma * mask
    estimates = (covariance @ jacobian.T @ torch.linalg.solve(hit_covariance, ((hits - nominal) * mask).T)).T
    predicted = covariance.diagonal().sqrt()
    torch.testing.assert_close(estimates.std(0), predicted, rtol=4 / math.sqrt(2 * n), atol=0.0)
    assert torch.all(estimates.mean(0).abs() < 4 * predicted / math.sqrt(n))


def test_tracker_resolution_gradients():
    tracker = TrackerDesign(RADII, thickness=0.3, resolution_rphi=0.01, resolution_z=0.05)
    module = _Resolutions(tracker)
    pt, eta = tensor(0.8, 5.0), tensor(0.3, 1.2)
    names = ["tracker.radii", "tracker.thickness", "tracker.resolution_rphi"]

    def resolutions(*values):
        return torch.func.functional_call(module, dict(zip(names, values)), (pt, eta))

    values = tuple(module.get_parameter(name).detach().clone().requires_grad_() for name in names)
    # The propagator's derivatives in the layer radii are accurate to ~1e-5 relative: tolerance 2e-3.
    assert torch.autograd.gradcheck(resolutions, values, eps=1e-5, atol=1e-8, rtol=2e-3, fast_mode=True)
    tracker.material_budget().backward()
    torch.testing.assert_close(tracker.thickness.grad, torch.full((5,), 1 / 93.70, dtype=F64))


def test_tracker_track_that_curls_before_the_outer_layers_is_fitted_with_the_layers_it_crosses():
    """0.3 GeV in 2 T: helix radius 500 mm, so the track reaches r = 1000 mm and misses the layer at
    1100 mm. Its resolutions (and their gradients, finite) equal those of the design without that
    layer; a stiff track in the same batch is unaffected by it."""
    pt, eta = tensor(0.3, 5.0), tensor(0.0, 0.3)
    with_outer = TrackerDesign([40.0, 80.0, 120.0, 600.0, 1100.0])
    without_outer = TrackerDesign([40.0, 80.0, 120.0, 600.0])
    curling, reference = with_outer.resolutions(pt, eta), without_outer.resolutions(pt[:1], eta[:1])
    stiff = with_outer.resolutions(pt[1:], eta[1:])
    for name in reference:
        torch.testing.assert_close(curling[name][:1], reference[name], rtol=1e-9, atol=0)
        torch.testing.assert_close(curling[name][1:], stiff[name], rtol=1e-12, atol=0)
    sum(v.sum() for v in curling.values()).backward()
    assert torch.isfinite(with_outer.radii.grad).all() and torch.isfinite(with_outer.thickness.grad).all()


class _Resolutions(torch.nn.Module):
    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def forward(self, pt, eta):
        res = self.tracker.resolutions(pt, eta)
        return torch.cat([res["d0"], res["z0"], res["pt"]])


def test_tracker_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="radii must be positive, increasing"):
        TrackerDesign([40.0, 30.0, 150.0])
    with pytest.raises(ValueError, match="radii must be positive, increasing and outside the beam pipe"):
        TrackerDesign([20.0, 80.0, 150.0], beam_pipe=(25.0, 0.8, "beryllium"))
    with pytest.raises(ValueError, match="at least 3 layers"):
        TrackerDesign([40.0, 80.0])
    with pytest.raises(ValueError, match="unknown material 'lead'"):
        TrackerDesign(RADII, material="lead")
    with pytest.raises(ValueError, match="thickness needs 1 or 5 values"):
        TrackerDesign(RADII, thickness=[0.3, 0.3])
    tracker = TrackerDesign(RADII)
    with pytest.raises(ValueError, match="pt must be positive"):
        tracker.resolutions(tensor(-1.0), tensor(0.0))
    with pytest.raises(TypeError, match="pt must have dtype torch.float64"):
        tracker.resolutions(torch.tensor([1.0]), tensor(0.0))
    with pytest.raises(ValueError, match="the history is empty"):
        History().averaged_design()
    with pytest.raises(ValueError, match="b_field must be a finite, non-zero field"):
        TrackerDesign(RADII, b_field=0.0)
    with pytest.raises(ValueError, match="charge must be \\+1 or -1"):
        tracker.resolutions(tensor(1.0), tensor(0.0), charge=0.0)
    per_track = tracker.resolutions(tensor(1.0, 1.0), tensor(0.0, 0.0), charge=tensor(1.0, -1.0))  # per track
    torch.testing.assert_close(per_track["pt"][0], per_track["pt"][1])
    for charge in ([1, -1], "1", tensor(1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="charge must be \\+1 or -1"):
            tracker.resolutions(tensor(1.0, 1.0), tensor(0.0, 0.0), charge=charge)
    with pytest.raises(ValueError, match="b_field must be a finite, non-zero field"):
        TrackerDesign(RADII, b_field="2")
    TrackerDesign(RADII, b_field=torch.tensor(2.0))  # a 0-d tensor is a field value too


def small_design(dtype=F64, **options) -> CalorimeterDesign:
    calo = SamplingCalorimeter("lead", "scintillator", absorber_thickness=2.0, active_thickness=4.0, n_layers=12,
                               layers_per_segment=4, n_cells=3, cell_size=60.0, noise=0.01, quadrature_points=4,
                               dtype=dtype)
    return CalorimeterDesign(calo, cost_weight=1e-5, absorber_price=1.0, active_price=2.0, **options)


def test_design_bounds_are_checked_and_default_floors_keep_the_design_physical():
    with pytest.raises(ValueError, match=r"bounds of absorber_thickness must be \(low, high\) with 0 < low < high"):
        small_design(bounds={"absorber_thickness": (5.0, 1.0)})
    with pytest.raises(ValueError, match="bounds of active_thickness must be"):
        small_design(bounds={"active_thickness": (0.0, 5.0)})
    with pytest.raises(ValueError, match="regression is an EnergyRegression for 2 segments"):
        CalorimeterDesign(small_design().calorimeter, EnergyRegression(2, 3))
    design = small_design()
    assert design.bounds["absorber_thickness"] == pytest.approx((0.02, math.inf))  # 1 % of 2 mm
    with torch.no_grad():
        design.calorimeter.active_thickness.fill_(-0.1)  # an optimiser step too far
    design.project()
    assert design.calorimeter.active_thickness.item() == pytest.approx(0.04)
    with pytest.raises(ValueError, match=r"grid names \['cell_size'\] are not design parameters"):
        grid_scan(design, {"cell_size": [20.0, 30.0]})


def test_regression_starts_at_the_calibrated_sum_and_cost_is_linear():
    design = small_design()
    energy = tensor(3.0, 30.0)
    with torch.no_grad():
        cells = design.calorimeter(energy, seed=1)
        visible = design.calorimeter.visible_fraction()
        torch.testing.assert_close(design.regression(cells, visible), cells.sum((1, 2, 3)) / visible)
        assert float(material_cost(design.calorimeter, 1.0, 2.0)) == pytest.approx(12 * (2.0 + 2 * 4.0))
    assert isinstance(design.regression, EnergyRegression)


def test_objective_gradient_matches_common_random_number_differences():
    """dJ/d(design) of the full objective (simulation, calibration, network, cost): pathwise gradients
    equal central differences with the same showers (seed) and the same network."""
    torch.manual_seed(0)
    design = small_design()
    energy = design.sample_energies(256, torch.Generator().manual_seed(4))
    names = [name for name, _ in design.calorimeter.named_parameters()]
    for seed in (1, 2):
        design.zero_grad()
        design(energy, seed=seed)["loss"].backward()
        for name in names:
            parameter = design.calorimeter.get_parameter(name)
            h = 1e-6 * float(parameter.detach())
            with torch.no_grad():
                parameter += h
                up = design(energy, seed=seed)["loss"]
                parameter -= 2 * h
                down = design(energy, seed=seed)["loss"]
                parameter += h
            assert parameter.grad.item() == pytest.approx(float((up - down) / (2 * h)), rel=1e-5, abs=1e-12)


def test_joint_training_lowers_the_objective_and_grid_scan_restores_the_design():
    torch.manual_seed(0)
    bounds = {"absorber_thickness": (1.0, 4.0), "active_thickness": (1.0, 8.0)}
    design = small_design(torch.float32, bounds=bounds)
    before = evaluate(design, 1024, seed=9)
    history = train_jointly(design, 25, batch=512, pretrain_steps=0, design_lr=0.1, network_lr=1e-2)
    after = evaluate(design, 1024, seed=9)
    # each record pairs the terms with the design they were evaluated at (before the step's update)
    assert history.design[0] == {name: before_value for name, before_value in zip(bounds, (2.0, 4.0))}
    for record, cost in zip(history.design, history.cost):  # 12 layers, prices 1 and 2 per mm
        assert cost == pytest.approx(12 * (record["absorber_thickness"] + 2.0 * record["active_thickness"]), rel=1e-5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        fit_regression(design, 0)
    with pytest.raises(ValueError, match="n_showers must be a positive integer"):
        evaluate(design, 0, seed=1)
    with pytest.raises(ValueError, match="grid values of active_thickness must be a non-empty list"):
        grid_scan(design, {"active_thickness": []})
    energies = torch.linspace(1.0, 100.0, 400, dtype=torch.float64)
    with pytest.raises(ValueError, match="predicted contains NaN"):
        fit_resolution_terms(energies, torch.full_like(energies, float("nan")))
    for bad in (float("nan"), -1.0, "1"):
        with pytest.raises(ValueError, match="cost_weight must be a finite number >= 0"):
            CalorimeterDesign(design.calorimeter, cost_weight=bad)
    assert after["loss"] < before["loss"]
    assert len(history.steps) == 25 and set(history.design[-1]) == set(bounds)
    assert all(low <= history.design[-1][name] <= high for name, (low, high) in bounds.items())
    start = design.design_values()
    scan = grid_scan(design, {"absorber_thickness": [1.5, 3.0], "active_thickness": [2.0]}, train_steps=10,
                     train_showers=512, validation_showers=512)
    assert scan["loss"].shape == (2, 1) and scan["best"]["active_thickness"] == 2.0
    assert design.design_values() == start
    with pytest.raises(ValueError, match="absorber_thickness"):  # an invalid grid point
        grid_scan(design, {"absorber_thickness": [2.0, -1.0]}, train_steps=1, train_showers=64,
                  validation_showers=64)
    assert design.design_values() == start


def test_fit_resolution_terms_recovers_known_terms():
    generator = torch.Generator().manual_seed(5)
    energy = torch.exp(torch.empty(200_000, dtype=F64).uniform_(math.log(1.0), math.log(100.0), generator=generator))
    sigma = torch.sqrt(0.1**2 / energy + (0.3 / energy) ** 2 + 0.02**2)
    predicted = energy * (1 + sigma * torch.randn(energy.shape, generator=generator, dtype=F64))
    terms = fit_resolution_terms(energy, predicted)
    assert terms["stochastic"] == pytest.approx(0.1, rel=0.05)
    assert terms["noise"] == pytest.approx(0.3, rel=0.1)
    assert terms["constant"] == pytest.approx(0.02, rel=0.1)


def test_tracker_resolution_gradients_in_the_track_inputs_and_resolution_z():
    tracker = TrackerDesign(RADII, thickness=0.3, resolution_rphi=0.01, resolution_z=0.05)
    module = _Resolutions(tracker)
    pt, eta = tensor(0.8, 5.0).requires_grad_(), tensor(0.3, 1.2).requires_grad_()

    def resolutions(pt, eta, resolution_z):
        return torch.func.functional_call(module, {"tracker.resolution_z": resolution_z}, (pt, eta))

    resolution_z = tracker.resolution_z.detach().clone().requires_grad_()
    # d/d pt and eta go through the propagator (accurate to ~1e-5 relative): tolerance 2e-3.
    assert torch.autograd.gradcheck(resolutions, (pt, eta, resolution_z), eps=1e-5, atol=1e-8, rtol=2e-3,
                                    fast_mode=True)


def test_empty_batches_of_the_design_objectives():
    resolutions = TrackerDesign(RADII).resolutions(tensor(), tensor())
    assert all(value.shape == (0,) for value in resolutions.values())
    design = CalorimeterDesign(SamplingCalorimeter(n_layers=4, dtype=F64))
    with pytest.raises(ValueError, match="resolution of an empty batch is undefined"):
        design(torch.zeros(0, dtype=F64), seed=1)


def test_energy_regression_rejects_bad_inputs():
    regression = EnergyRegression(4, 5).double()
    fraction = torch.tensor(0.1, dtype=F64)
    with pytest.raises(ValueError, match=r"cells must have shape \(N, 4, 5, 5\)"):
        regression(torch.rand(3, 4, 4, 3, dtype=F64), fraction)
    with pytest.raises(TypeError, match="cells must have dtype torch.float64"):
        regression(torch.rand(3, 4, 5, 5), fraction)
    with pytest.raises(ValueError, match="visible_fraction must be positive"):
        regression(torch.rand(3, 4, 5, 5, dtype=F64), torch.tensor(0.0, dtype=F64))
