"""Four-vectors, phase space (two-body, three-body, RAMBO), VEGAS and unweighted events."""
from __future__ import annotations

import math

import drjit as dr
import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.hard_process import HardProcess
from pyhybrid.kernels.lorentz import FourVector, total
from pyhybrid.kernels.phase_space import kallen, massless_volume, rambo, three_body_massless, two_body
from pyhybrid.kernels.vegas import VegasGrid, integrate as vegas_integrate, uniform_points
from pyhybrid.nn.matrix_element import TwoBodyCrossSection, rambo_momenta, two_body_momenta

T64 = kernel_types("cpu", "float64")
T32 = kernel_types("cpu", "float32")


def _array(values):
    return T64.Float(np.asarray(values, dtype=np.float64))


def _numpy(vector: FourVector, n: int) -> np.ndarray:
    return np.stack([np.broadcast_to(np.asarray(dr.ravel(c + dr.zeros(T64.Float, n)).numpy()), n)
                     for c in vector.columns()], axis=1)


def _uniforms(n, k, seed):
    return [1.0 - u for u in uniform_points(T64, n, k, seed)]


# ----------------------------------------------------------------- Lorentz helpers


def test_boosts_and_rotations_preserve_invariants():
    rng = np.random.default_rng(1)
    n = 64
    p = FourVector.from_mass(_array(rng.uniform(0, 5, n)), *(_array(rng.normal(0, 20, n)) for _ in range(3)))
    q = FourVector.from_mass(_array(rng.uniform(1, 5, n)), *(_array(rng.normal(0, 20, n)) for _ in range(3)))
    in_rest = p.boost_to_rest_frame_of(q)
    np.testing.assert_allclose(in_rest.dot(q.boost_to_rest_frame_of(q)).numpy(), p.dot(q).numpy(), rtol=1e-10)
    rest_of_q = q.boost_to_rest_frame_of(q)
    np.testing.assert_allclose(np.abs(rest_of_q.p().numpy()), 0, atol=1e-10)
    np.testing.assert_allclose(rest_of_q.E.numpy(), q.mass().numpy(), rtol=1e-12)
    back = in_rest.boost_from_rest_frame_of(q)
    np.testing.assert_allclose(_numpy(back, n), _numpy(p, n), rtol=1e-9, atol=1e-9)
    u = rng.normal(size=(3, n))
    u /= np.linalg.norm(u, axis=0)
    u[:, 0] = (0, 0, -1)  # the special case of a rotation by pi
    rotated = p.rotate_z_to(*(_array(c) for c in u))
    np.testing.assert_allclose(rotated.mass2().numpy(), p.mass2().numpy(), rtol=1e-9, atol=1e-9)
    along_z = FourVector(_array(np.ones(n)), *(_array(np.zeros(n)) for _ in range(2)), _array(np.ones(n)))
    np.testing.assert_allclose(_numpy(along_z.rotate_z_to(*(_array(c) for c in u)), n)[:, 1:], u.T, atol=1e-12)


def test_observables_of_a_known_vector():
    p = FourVector(_array([5.0]), _array([3.0]), _array([0.0]), _array([0.0]))
    assert p.mass()[0] == pytest.approx(4.0)
    assert p.pt()[0] == pytest.approx(3.0)
    assert p.eta()[0] == pytest.approx(0.0)
    assert p.phi()[0] == pytest.approx(0.0)
    assert total([p, p, p]).E[0] == pytest.approx(15.0)


# ----------------------------------------------------------------- two- and three-body


def test_two_body_kinematics_and_density():
    n = 50
    rng = np.random.default_rng(2)
    cos_theta, phi = _array(rng.uniform(-1, 1, n)), _array(rng.uniform(0, 2 * math.pi, n))
    sqrt_s, ma, mb = 300.0, 80.4, 91.19
    pa, pb, density = two_body(_array(np.full(n, sqrt_s)), ma, mb, cos_theta, phi)
    np.testing.assert_allclose((pa + pb).E.numpy(), sqrt_s, rtol=1e-14)
    np.testing.assert_allclose(np.abs((pa + pb).p().numpy()), 0, atol=1e-12)
    np.testing.assert_allclose(pa.mass().numpy(), ma, rtol=1e-12)
    np.testing.assert_allclose(pb.mass().numpy(), mb, rtol=1e-12)
    np.testing.assert_allclose(pa.cos_theta().numpy(), cos_theta.numpy(), atol=1e-14)
    s = sqrt_s**2
    np.testing.assert_allclose(density.numpy(), math.sqrt(kallen(s, ma**2, mb**2)) / (32 * math.pi**2 * s))


def test_three_body_kinematics_invariants_and_volume():
    n = 200_000
    u = uniform_points(T64, n, 5, seed=3)
    sqrt_s = 91.2
    x1, x2 = u[0], 1.0 - u[0] * u[1]  # the triangle x1, x2 <= 1 <= x1 + x2, Jacobian x1
    p1, p2, p3, density = three_body_massless(sqrt_s, x1, x2, 2 * u[2] - 1, 2 * math.pi * u[3], 2 * math.pi * u[4])
    s = sqrt_s**2
    for p in (p1, p2, p3):
        assert np.max(np.abs(p.mass2().numpy())) < 1e-9 * s
    total_p = p1 + p2 + p3
    assert np.max(np.abs(total_p.E.numpy() - sqrt_s)) < 1e-10
    assert np.max(np.abs(total_p.p().numpy())) < 1e-10
    np.testing.assert_allclose((2 * p2.dot(p3)).numpy(), s * (1 - x1.numpy()), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose((2 * p1.dot(p3)).numpy(), s * (1 - x2.numpy()), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p1.cos_theta().numpy(), (2 * u[2] - 1).numpy(), atol=1e-12)
    weights = (density * x1 * 8 * math.pi**2).numpy()
    volume = massless_volume(3, sqrt_s)
    assert volume == pytest.approx(s / (256 * math.pi**3), rel=1e-14)
    assert weights.mean() == pytest.approx(volume, rel=4 * weights.std() / math.sqrt(n) / volume + 1e-12)


# ----------------------------------------------------------------- RAMBO


@pytest.mark.parametrize("n_out", [2, 3, 5])
def test_rambo_massless_conserves_momentum_with_constant_weight(n_out):
    n = 1000
    momenta, weight = rambo(91.2, [0.0] * n_out, _uniforms(n, 4 * n_out, seed=n_out))
    total_p = total(momenta)
    assert np.max(np.abs(total_p.E.numpy() - 91.2)) < 1e-11
    assert np.max(np.abs(total_p.p().numpy())) < 1e-11
    for p in momenta:
        assert np.max(np.abs(p.mass2().numpy())) < 1e-12 * 91.2**2
    assert weight == pytest.approx(massless_volume(n_out, 91.2))
    if n_out == 2:
        assert weight == pytest.approx(1 / (8 * math.pi))


def test_rambo_massless_angles_are_isotropic():
    momenta, _ = rambo(500.0, [0.0, 0.0, 0.0], _uniforms(20_000, 12, seed=9))
    cos_theta = momenta[0].cos_theta().numpy()
    assert stats.kstest(cos_theta, "uniform", args=(-1, 2)).pvalue > 1e-3


def test_rambo_massive_two_body_weight_is_exact():
    mt = 172.5
    momenta, weight = rambo(500.0, [mt, mt], _uniforms(100, 8, seed=1))
    beta = math.sqrt(1 - 4 * mt**2 / 500.0**2)
    np.testing.assert_allclose(weight.numpy(), beta / (8 * math.pi), rtol=1e-12)
    for p in momenta:
        np.testing.assert_allclose(p.mass().numpy(), mt, rtol=1e-12)


def test_rambo_massive_three_body_volume_matches_quadrature():
    """<weight> = Phi_3(s; m1, m2, m3) = integral ds23 / (2 pi) Phi_2(s; m1, sqrt(s23)) Phi_2(s23; m2, m3)."""
    sqrt_s, masses = 100.0, [10.0, 20.0, 30.0]
    n = 200_000
    momenta, weight = rambo(sqrt_s, masses, _uniforms(n, 12, seed=4))
    for p, m in zip(momenta, masses):
        np.testing.assert_allclose(p.mass().numpy(), m, rtol=1e-9)
    total_p = total(momenta)
    assert np.max(np.abs(total_p.E.numpy() - sqrt_s)) < 1e-9
    assert np.max(np.abs(total_p.p().numpy())) < 1e-9

    def phi2(s, ma, mb):
        return math.sqrt(max(kallen(s, ma**2, mb**2), 0.0)) / (8 * math.pi * s)

    s = sqrt_s**2
    volume, _ = integrate.quad(lambda s23: phi2(s, masses[0], math.sqrt(s23)) * phi2(s23, masses[1], masses[2])
                               / (2 * math.pi), (masses[1] + masses[2]) ** 2, (sqrt_s - masses[0]) ** 2,
                               epsrel=1e-10)
    w = weight.numpy()
    assert abs(w.mean() - volume) < 4 * w.std() / math.sqrt(n)


def _rambo_sums(mass, sqrt_s):
    """(sum of p_z of particle 1, sum of weights) of 50 fixed-random RAMBO points, with AD leaves."""
    mass_array, sqrt_array = T64.Float(mass), T64.Float(sqrt_s)
    dr.enable_grad(mass_array, sqrt_array)
    momenta, weight = rambo(sqrt_array, [mass_array, 5.0, 0.0], _uniforms(50, 12, seed=8))
    return (dr.sum(momenta[0].pz), dr.sum(weight)), (mass_array, sqrt_array)


def test_rambo_gradients_match_finite_differences():
    """Implicit-function gradient of the massive rescaling vs central differences (common random numbers)."""
    mass, sqrt_s, step = 40.0, 120.0, 1e-5
    for k in range(2):
        for j, (dm, ds) in enumerate(((step, 0.0), (0.0, step))):
            outputs, leaves = _rambo_sums(mass, sqrt_s)
            dr.backward(outputs[k])
            gradient = dr.grad(leaves[j])[0]
            plus = _rambo_sums(mass + dm, sqrt_s + ds)[0][k][0]
            minus = _rambo_sums(mass - dm, sqrt_s - ds)[0][k][0]
            assert gradient == pytest.approx((plus - minus) / (2 * step), rel=1e-6, abs=1e-9)


def test_torch_phase_space_functions_gradcheck():
    sqrt_s = torch.tensor(400.0, dtype=torch.float64, requires_grad=True)
    masses = torch.tensor([80.4, 91.19, 10.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, m: rambo_momenta(r, m, 4, seed=2), (sqrt_s, masses), eps=1e-6,
                                    atol=1e-7)
    cos_theta = torch.tensor([-0.3, 0.5], dtype=torch.float64, requires_grad=True)
    phi = torch.tensor([0.2, 4.0], dtype=torch.float64, requires_grad=True)
    mass = torch.tensor(172.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, m, c, f: two_body_momenta(r, m, m, c, f),
                                    (sqrt_s.detach().requires_grad_(), mass, cos_theta, phi), eps=1e-6, atol=1e-7)


def test_torch_phase_space_rejects_bad_input():
    with pytest.raises(ValueError, match="masses must be non-negative"):
        rambo_momenta(100.0, torch.tensor([-1.0, 2.0], dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="at least 2 outgoing"):
        rambo_momenta(100.0, torch.tensor([1.0], dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="cos_theta must lie in"):
        two_body_momenta(100.0, 0.0, 0.0, torch.tensor([1.5], dtype=torch.float64),
                         torch.tensor([0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="below threshold"):
        two_body_momenta(100.0, 60.0, 60.0, torch.tensor([0.5], dtype=torch.float64),
                         torch.tensor([0.0], dtype=torch.float64))


# ----------------------------------------------------------------- VEGAS


def test_vegas_adapts_to_a_narrow_peak():
    width = 0.02

    def peak(x):
        value = 1.0
        for xi in x:
            value = value * dr.exp(-(((xi - 0.3) / width) ** 2)) / (width * math.sqrt(math.pi))
        return value

    exact = (0.5 * (math.erf(0.7 / width) + math.erf(0.3 / width))) ** 3
    plain = vegas_integrate(peak, 3, T64, n_points=20_000, adapt_iterations=0, iterations=4, seed=1)
    adapted = vegas_integrate(peak, 3, T64, n_points=20_000, adapt_iterations=6, iterations=4, seed=1)
    assert abs(adapted.integral - exact) < 4 * adapted.error
    assert adapted.error < plain.error / 20
    assert adapted.chi2_per_dof < 5
    again = vegas_integrate(peak, 3, T64, n_points=20_000, adapt_iterations=6, iterations=4, seed=1)
    assert again.integral == adapted.integral  # reproducible from the seed


def test_vegas_estimate_is_unbiased_on_any_grid_float32():
    grid = VegasGrid(2, n_bins=8)
    grid.edges[0] = np.array([0, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
    result = vegas_integrate(lambda x: x[0] * x[1], 2, T32, n_points=50_000, adapt_iterations=0, iterations=3,
                             grid=grid)
    assert abs(result.integral - 0.25) < 4 * result.error


def test_vegas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_points"):
        vegas_integrate(lambda x: x[0], 1, T64, n_points=1)
    with pytest.raises(ValueError, match="edges must increase"):
        VegasGrid(1, 2, edges=np.array([[0.0, 0.7, 0.5]]))
    with pytest.raises(FloatingPointError, match="NaN"):
        vegas_integrate(lambda x: dr.log(x[0] - 2.0), 1, T64, n_points=100, adapt_iterations=0, iterations=1)


# ----------------------------------------------------------------- unweighted events


@pytest.mark.parametrize("process, sqrt_s", [("ee_mumu", 91.2), ("gg_tt", 500.0)])
def test_unweighted_events_follow_the_differential_cross_section(process, sqrt_s):
    hard = HardProcess(process, sqrt_s)
    result = hard.cross_section(T64, n_points=20_000, adapt_iterations=2, iterations=2, seed=3)
    events = hard.unweighted_events(T64, result, 40_000, seed=4)
    momenta = events.momenta
    assert np.max(np.abs(momenta[:, :2].sum(1) - momenta[:, 2:].sum(1))) < 1e-9 * sqrt_s
    cos_theta = momenta[:, 2, 3] / np.linalg.norm(momenta[:, 2, 1:], axis=1)
    edges = np.linspace(-1, 1, 21)
    counts, _ = np.histogram(cos_theta, edges)
    module = TwoBodyCrossSection(process)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    expected = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        x = torch.as_tensor(lo + (hi - lo) * (nodes + 1) / 2, dtype=torch.float64)
        with torch.no_grad():
            expected.append(float((torch.as_tensor(weights) * module(x, sqrt_s)).sum()) * (hi - lo) / 2)
    expected = np.array(expected) / sum(expected) * len(cos_theta)
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert stats.chi2.sf(chi2, len(counts) - 1) > 1e-3
    assert events.n_overweight == 0


@pytest.mark.parametrize("sqrt_s, masses", [(91.2, [0.0, 0.0]), (500.0, [172.5, 172.5])])
def test_float32_rambo_points_conserve_momentum_and_stay_on_shell(sqrt_s, masses):
    """Computed in float64 and rounded: in float32 arithmetic ~1 % of the points were off by up to 1e-2."""
    momenta, weight = rambo_momenta(torch.tensor(sqrt_s), torch.tensor(masses), 100_000, seed=4)
    assert momenta.dtype == weight.dtype == torch.float32
    p = momenta.double()
    imbalance = (p[:, :2].sum(1) - p[:, 2:].sum(1)).abs().amax()
    assert imbalance < 1e-5 * sqrt_s
    mass2 = p[:, 2:, 0] ** 2 - (p[:, 2:, 1:] ** 2).sum(-1)
    assert (mass2 - torch.tensor(masses, dtype=torch.float64) ** 2).abs().max() < 1e-5 * sqrt_s ** 2
