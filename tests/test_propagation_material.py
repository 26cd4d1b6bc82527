"""Material effects: Bethe-Bloch vs the PDG muon table, Highland, energy loss and scattering in propagation."""
import math

import numpy as np
import pytest
import torch

from pyhybrid.kernels import fields
from pyhybrid.kernels.material import SILICON, energy_loss_sigma, highland_theta0, interact, mass_stopping_power
from pyhybrid.kernels.propagation import Layer, PropagationOptions, propagate_layers
from pyhybrid.kernels.steppers import RK4
from pyhybrid.kernels.surfaces import Disk
from pyhybrid.nn.propagator import PlaneLayer, Propagator, UniformField
from pyhybrid.units import MUON_MASS
from test_propagation_support import F64, kernel_params

# PDG Atomic and Nuclear Properties, muons in silicon: ionisation -dE/dx [MeV cm^2/g] at kinetic energy [GeV]
PDG_MUON_SILICON = [(0.1, 1.849), (1.0, 1.803), (10.0, 2.177), (100.0, 2.451)]
PDG_SILICON_MINIMUM_IONISATION = 1.664


def _momentum(kinetic):
    energy = kinetic + MUON_MASS
    return math.sqrt(energy ** 2 - MUON_MASS ** 2)


# The table's ionisation column also holds the spin-1/2 term (1/8)(W_max/E)^2 and bremsstrahlung off atomic
# electrons, which the Bethe formula here omits: -1.0 % at 10 GeV, -2.6 % at 100 GeV (docs/propagation.md).
# A 10 % error in the mean excitation energy I moves the two low-energy points by ~1 %.
BETHE_TOLERANCE = {0.1: 0.005, 1.0: 0.005, 10.0: 0.015, 100.0: 0.03}


@pytest.mark.parametrize("kinetic, pdg", PDG_MUON_SILICON)
def test_muon_stopping_power_in_silicon_matches_pdg_table(kinetic, pdg):
    value = mass_stopping_power(SILICON, F64.Float(_momentum(kinetic)), MUON_MASS)[0]
    assert value == pytest.approx(pdg, rel=BETHE_TOLERANCE[kinetic])
    if kinetic >= 10.0:
        assert value < pdg  # the omitted terms are positive (below, smaller than the table's rounding)


def test_minimum_ionisation_in_silicon():
    p = np.geomspace(0.1, 3.0, 600)
    values = np.array(mass_stopping_power(SILICON, F64.Float(p), MUON_MASS))
    assert values.min() == pytest.approx(PDG_SILICON_MINIMUM_IONISATION, rel=0.005)
    assert 3.0 < p[values.argmin()] / MUON_MASS < 4.0           # minimum at beta gamma ~ 3.5


def test_highland_formula():
    p, path = 1.0, 0.3
    beta = p / math.hypot(p, MUON_MASS)
    x = path / 93.70
    expected = 0.0136 / (beta * p) * math.sqrt(x) * (1 + 0.038 * math.log(x / beta ** 2))
    assert highland_theta0(SILICON, F64.Float(path), F64.Float(p), MUON_MASS)[0] == pytest.approx(expected, rel=1e-12)


def test_energy_loss_straggling_width_and_its_q_over_p_variance():
    """sigma_E = 4 xi / 2.355 with xi = K/2 (Z/A) rho x / beta^2 (Landau FWHM, as ACTS), written out here with
    the PDG silicon constants; the q/p variance is (d(q/p)/dE)^2 sigma_E^2, its derivative by finite differences."""
    p, path = 2.0, 0.3
    energy = math.hypot(p, MUON_MASS)
    xi = 0.5 * 0.307075 * (14.0 / 28.0855) * (2.329 * 0.1 * path) / (p / energy) ** 2 * 1e-3    # GeV
    sigma = 4.0 * xi / 2.3548200450309493
    assert energy_loss_sigma(SILICON, F64.Float(path), F64.Float(p), MUON_MASS)[0] == pytest.approx(sigma, rel=1e-9)
    assert xi * (p / energy) ** 2 == pytest.approx(5.346e-6, rel=1e-3)   # 5.35 keV / beta^2 for 300 um of Si

    def qop(e):
        return -1.0 / math.sqrt(e * e - MUON_MASS ** 2)

    step = 1e-6
    derivative = (qop(energy + step) - qop(energy - step)) / (2 * step)
    normal = tuple(F64.Float(v) for v in (0.0, 0.0, 1.0))
    result = interact(normal, F64.Float(qop(energy)), normal, F64.Float(path), SILICON, MUON_MASS, 1.0)
    assert result.qop_variance[0] == pytest.approx((derivative * sigma) ** 2, rel=1e-6)


def _disks_in_vacuum(starts, thickness, *, scattering="none", energy_loss=True, seed=0, covariance=None):
    """Tracks along +z through a silicon disk at z = 100 to a bare disk at z = 1100 (no field)."""
    layers = [Layer(Disk(r_max=1e4), SILICON), Layer(Disk(r_max=1e4))]
    field = fields.UniformField(F64.Float(0.0), F64.Float(0.0), F64.Float(0.0))
    options = PropagationOptions(stepper=RK4(100.0), scattering=scattering, energy_loss=energy_loss)
    return propagate_layers(kernel_params(starts), field, layers, F64.Float([100.0, 1100.0]),
                            F64.Float([thickness, 0.0]), options, seed=seed, covariance=covariance)


def test_mean_energy_loss_is_applied_along_the_path_in_the_layer():
    kinetic, pdg = PDG_MUON_SILICON[1]
    p, thickness = _momentum(kinetic), 5.0
    tilt = 0.5                                             # incidence angle [rad]
    starts = [[0, 0, 0, 0, 0, 0, 1, 1 / p], [0, 0, 0, 0, math.sin(tilt), 0, math.cos(tilt), -1 / p]]
    hits = _disks_in_vacuum(starts, thickness)
    qop_after = np.array(hits.free[1][7])
    dedx = mass_stopping_power(SILICON, F64.Float(p), MUON_MASS)[0] * SILICON.density * 1e-4      # GeV/mm
    for qop, path in zip(qop_after, [thickness, thickness / math.cos(tilt)]):
        energy = math.hypot(p, MUON_MASS) - dedx * path
        assert abs(qop) == pytest.approx(1.0 / math.sqrt(energy ** 2 - MUON_MASS ** 2), rel=1e-12)
        loss = math.hypot(p, MUON_MASS) - math.hypot(1.0 / qop, MUON_MASS)
        pdg_loss = pdg * SILICON.density * 0.1 * path * 1e-3          # table value [MeV cm^2/g] -> GeV
        assert loss == pytest.approx(pdg_loss, rel=0.005)
    assert np.sign(qop_after).tolist() == [1.0, -1.0]


def test_sampled_scattering_has_highland_width_and_matches_the_transported_covariance():
    n, p, thickness = 20000, 2.0, 3.0
    starts = np.tile([0, 0, 0, 0, 0, 0, 1, 1 / p], (n, 1))
    hits = _disks_in_vacuum(starts, thickness, scattering="sample", energy_loss=False, seed=7)
    local = np.array([np.array(v) for v in hits.local[1]])             # (rho, phi) on the far disk
    x, y = local[0] * np.cos(local[1]), local[0] * np.sin(local[1])
    theta0 = highland_theta0(SILICON, F64.Float(thickness), F64.Float(p), MUON_MASS)[0]
    lever = 1000.0
    for projected in (x / lever, y / lever):
        assert np.std(projected) == pytest.approx(theta0, rel=0.03)
        assert abs(np.mean(projected)) < 4 * theta0 / math.sqrt(n)
    # the same scattering as a covariance, transported to the far disk
    zero = F64.Float(np.zeros(2))
    covariance = [[zero for _ in range(8)] for _ in range(8)]
    transported = _disks_in_vacuum(starts[:2], thickness, scattering="covariance", energy_loss=False,
                                   covariance=covariance)
    position_cov = np.array([[transported.covariance[1][i][j][0] for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(position_cov, (lever * theta0) ** 2 * np.eye(2), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.cov(np.stack([x, y])), position_cov, rtol=0.05, atol=0.05 * position_cov[0, 0])


def test_pathwise_scattering_gradient_is_unbiased():
    """d/d thickness of E[mean u^2] on a plane 1 m behind a scatterer: pathwise estimate over seeds vs
    finite differences of the expectation (common random numbers) and vs the Highland derivative."""
    n, p, lever = 4000, 1.5, 1000.0
    layers = [PlaneLayer(offset=100.0, normal=(0, 0, 1), u_axis=(1, 0, 0), thickness=2.0),
              PlaneLayer(offset=100.0 + lever, normal=(0, 0, 1), u_axis=(1, 0, 0), thickness=0.0, material=None)]
    prop = Propagator(UniformField((0.0, 0.0, 0.0)), layers, stepper=RK4(200.0), scattering="sample",
                      energy_loss=False, trainable_thickness=True)
    params = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1 / p]], dtype=torch.float64).repeat(n, 1)

    def loss(seed):
        return (prop(params, seed=seed).local[:, 1, 0] ** 2).mean()

    seeds = range(12)
    pathwise = []
    for seed in seeds:
        prop.thickness.grad = None
        loss(seed).backward()
        pathwise.append(prop.thickness.grad[0].item())
    pathwise = np.array(pathwise)
    mean, error = pathwise.mean(), pathwise.std(ddof=1) / math.sqrt(len(pathwise))
    step = 0.05
    with torch.no_grad():
        base = prop.thickness.data.clone()
        values = []
        for sign in (1, -1):
            prop.thickness.data = base + sign * torch.tensor([step, 0.0], dtype=torch.float64)
            values.append(np.mean([loss(seed).item() for seed in seeds]))
        prop.thickness.data = base
    finite_difference = (values[0] - values[1]) / (2 * step)
    assert abs(mean - finite_difference) < 4 * error + 1e-3 * abs(finite_difference)

    def expectation(t):  # E[u^2] = (lever theta0)^2 for small angles
        return (lever * highland_theta0(SILICON, F64.Float(t), F64.Float(p), MUON_MASS)[0]) ** 2

    analytic = (expectation(2.0 + 1e-4) - expectation(2.0 - 1e-4)) / 2e-4
    assert abs(mean - analytic) < 4 * error + 0.01 * analytic
    assert error < 0.05 * analytic


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, [1e-9, 1e-15, 1e-20, 1e-30]),
                                         (torch.float64, [1e-9, 1e-30, 1e-160, 1e-300])])
def test_tiny_q_over_p_tends_to_the_neutral_straight_line(dtype, tiny):
    """A tiny non-zero q/p (e.g. a network's output) behaves like q/p = 0: every layer hit, finite
    covariance and gradients (the Bethe-Bloch logarithm overflowed float32 near 5e8 GeV and stopped
    such tracks in the first layer; p^2 overflowed for the smallest values)."""
    from pyhybrid.nn.propagator import SolenoidField, barrel, free_parameters

    propagator = Propagator(SolenoidField(), barrel([32.0, 72.0, 116.0, 172.0], half_length=600.0))
    n = len(tiny) + 1
    params = free_parameters(torch.zeros(n, 3, dtype=dtype), torch.tensor([[1.0, 0.5, 0.2]] * n, dtype=dtype), 1.0)
    params[:, 7] = torch.tensor([0.0, *tiny], dtype=dtype)
    params.requires_grad_()
    out = propagator(params, 1e-4 * torch.eye(8, dtype=dtype).repeat(n, 1, 1))
    assert out.valid.all()
    torch.testing.assert_close(out.local, out.local[:1].expand_as(out.local), rtol=0, atol=1e-6)
    assert torch.isfinite(out.covariance).all()
    out.local.sum().backward()
    assert torch.isfinite(params.grad).all()
