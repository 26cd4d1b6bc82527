"""Dipole parton shower kernel: coupling, kinematics, conservation, colour flow, hard process,
distributions against the independent scalar-Python reference, observables, bad input."""
import math

import drjit as dr
import numpy as np
import pytest
import torch

from pyhybrid.kernels import dual
from pyhybrid.kernels.alphas import RunningCoupling
from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.lorentz import FourVector
from pyhybrid.kernels.observables import bin_indicators, event_shapes, histogram
from pyhybrid.kernels.shower import (FIRST_COLOUR, GLUON, NO_PARTNER, ShowerSettings, cs_kinematics,
                                     hard_process_fractions, run_shower)
from pyhybrid.nn.shower import PartonShower, event_shapes as torch_event_shapes
from reference import python_shower as ref

F64 = kernel_types("cpu", "float64")
SETTINGS = ShowerSettings()
M = SETTINGS.max_particles


def _padded(array, n):
    return np.asarray(array.numpy()).reshape(n, -1)


@pytest.fixture(scope="module")
def events64():
    n = 20_000
    return n, run_shower(F64, n, SETTINGS, seed=11)


# ---------------------------------------------------------------- alpha_s

def test_alpha_s_matches_reference_and_is_continuous():
    coupling, reference = RunningCoupling(0.118), ref.AlphaS(0.118)
    assert coupling(91.1876**2) == pytest.approx(0.118, rel=1e-14)
    for t in (0.5, 1.0, 1.69, 3.0, 22.5625, 100.0, 8317.44):
        assert coupling(t) == pytest.approx(reference(t), rel=1e-13)
    for threshold in (1.3**2, 4.75**2):
        assert coupling(threshold * (1 - 1e-9)) == pytest.approx(coupling(threshold * (1 + 1e-9)), rel=1e-7)
    assert coupling(1.0) > coupling(10.0) > coupling(1000.0)
    # Dr.Jit arrays give the same values lane by lane
    t = F64.Float([1.0, 10.0, 1000.0])
    values, _ = coupling.value_and_derivative(t, coupling.constants(F64.Float))
    assert np.allclose(values.numpy(), [coupling(1.0), coupling(10.0), coupling(1000.0)], rtol=1e-14)


def test_alpha_s_derivatives_match_finite_differences():
    h = 1e-6
    up, down, coupling = RunningCoupling(0.118 + h), RunningCoupling(0.118 - h), RunningCoupling(0.118)
    top = 91.2**2
    for t in (0.7, 2.0, 30.0, 5000.0):
        _, derivative = coupling.value_and_derivative(t)
        assert derivative == pytest.approx((up(t) - down(t)) / (2 * h), rel=1e-6)

        def integral(c):  # midpoint rule in ln t
            edges = np.linspace(math.log(t), math.log(top), 4001)
            mids = 0.5 * (edges[1:] + edges[:-1])
            return sum(c(math.exp(x)) for x in mids) * (edges[1] - edges[0])

        fd = (integral(RunningCoupling(0.118 + 1e-5)) - integral(RunningCoupling(0.118 - 1e-5))) / 2e-5
        assert coupling.integral_derivative(t, top) == pytest.approx(fd, rel=1e-5)


# ---------------------------------------------------------------- kinematics

def test_cs_kinematics_conserves_momentum_and_its_tangent_matches_finite_differences():
    rng = np.random.default_rng(3)
    n = 64
    F = F64.Float

    def massless(v):
        return FourVector(F(np.linalg.norm(v, axis=1)), F(v[:, 0]), F(v[:, 1]), F(v[:, 2]))

    a, b = rng.normal(size=(n, 3)) * 10, rng.normal(size=(n, 3)) * 10
    b[:4] = -a[:4] * 0.7  # back-to-back (collinear) pairs take the fallback transverse axis
    p_ij, p_k = massless(a), massless(b)
    m2 = 2.0 * p_ij.dot(p_k).numpy()
    z = F(rng.uniform(0.2, 0.8, n))
    t = F(m2 * 0.2 * rng.uniform(0.05, 0.2, n))
    phi = F(rng.uniform(0, 2 * math.pi, n))
    p_i, p_j, p_k_new = cs_kinematics(p_ij, p_k, t, z, phi)
    total_before, total_after = p_ij + p_k, p_i + p_j + p_k_new
    for before, after in zip(total_before.columns(), total_after.columns()):
        assert np.allclose(before.numpy(), after.numpy(), atol=1e-12 * 20)
    for p in (p_i, p_j, p_k_new):
        assert np.abs(p.mass2().numpy()).max() < 1e-10 * m2.max()
    # the Catani-Seymour variables come back: y = s_ij / (s_ij + s_ik + s_jk), z = s_ik / (s_ik + s_jk)
    s_ij = 2 * p_i.dot(p_j).numpy()
    s_ik = 2 * p_i.dot(p_k_new).numpy()
    s_jk = 2 * p_j.dot(p_k_new).numpy()
    y = t.numpy() / (m2 * z.numpy() * (1 - z.numpy()))
    assert np.allclose(s_ij / (s_ij + s_ik + s_jk), y, rtol=1e-9)
    assert np.allclose(s_ik / (s_ik + s_jk), z.numpy(), rtol=1e-9)
    # forward-mode tangent along a random direction vs central differences
    da, db, dt = rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), m2 * 1e-3

    def at(eps):
        pa, pb = massless(a + eps * da), massless(b + eps * db)
        return cs_kinematics(pa, pb, t + eps * F(dt), z, phi)

    def tangent_of(v, dv):
        norm = np.linalg.norm(v, axis=1)
        return [(v * dv).sum(1) / norm, dv[:, 0], dv[:, 1], dv[:, 2]]

    duals = cs_kinematics(
        FourVector(*(dual.Dual(c, [F(d)]) for c, d in zip(p_ij.columns(), tangent_of(a, da)))),
        FourVector(*(dual.Dual(c, [F(d)]) for c, d in zip(p_k.columns(), tangent_of(b, db)))),
        dual.Dual(t, [F(dt)]), z, phi)
    h = 1e-6
    plus, minus = at(h), at(-h)
    for d, up, down in zip(duals, plus, minus):
        for column, c_up, c_down in zip(d.columns(), up.columns(), down.columns()):
            fd = (c_up.numpy() - c_down.numpy()) / (2 * h)
            assert np.allclose(column.tangents[0].numpy(), fd, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- conservation, colour flow

def test_energy_momentum_conservation_float64(events64):
    n, result = events64
    assert not dr.any(result.overflow)[0]
    counts = result.n_particles.numpy()
    assert counts.min() >= 2 and counts.max() < M
    record = result.record
    p = np.stack([_padded(c, n) for c in (record.E, record.px, record.py, record.pz)], axis=-1)
    slots = np.arange(M)[None, :] < counts[:, None]
    assert np.all(p[~slots] == 0.0)
    total = p.sum(1)
    total[:, 0] -= SETTINGS.sqrt_s
    assert np.abs(total).max() < 1e-10 * SETTINGS.sqrt_s
    mass2 = p[..., 0] ** 2 - (p[..., 1:] ** 2).sum(-1)
    assert np.abs(mass2).max() < 1e-10 * SETTINGS.s
    assert np.all(p[slots][:, 0] > 0)
    assert np.all(result.n_emissions.numpy() == counts - 2)


def test_colour_flow_is_consistent(events64):
    n, result = events64
    record = result.record
    pid, col, acol, pc, pa = (_padded(a, n) for a in (record.pid, record.col, record.acol, record.partner_c,
                                                      record.partner_a))
    counts = result.n_particles.numpy()
    n_split = 0
    for e in range(2000):
        k = counts[e]
        ids, c, a = pid[e, :k], col[e, :k], acol[e, :k]
        quark, antiquark, gluon = ids > 0, ids < 0, ids == GLUON
        quark &= ~gluon
        assert np.all((c > 0) == (quark | gluon)) and np.all((a > 0) == (antiquark | gluon))
        tags_c, tags_a = c[c > 0], a[a > 0]
        # every colour line starts at one colour and ends at one anticolour
        assert sorted(tags_c) == sorted(tags_a) and len(set(tags_c)) == len(tags_c)
        assert FIRST_COLOUR <= min(tags_c)
        for i in range(k):
            assert (pc[e, i] == NO_PARTNER) == (c[i] == 0) and (pa[e, i] == NO_PARTNER) == (a[i] == 0)
            if c[i]:
                assert a[pc[e, i]] == c[i]
            if a[i]:
                assert c[pa[e, i]] == a[i]
        # flavour conservation: per flavour as many quarks as antiquarks
        for flavour in range(1, 6):
            assert np.count_nonzero(ids == flavour) == np.count_nonzero(ids == -flavour)
        n_split += np.count_nonzero(quark) - 1
    assert n_split > 20  # g -> q qbar does happen


def test_same_seed_reproduces_and_flip_of_nothing_is_the_primal(events64):
    n, result = events64
    again = run_shower(F64, n, SETTINGS, seed=11, flip_trial=F64.UInt32(np.full(n, NO_PARTNER, np.uint32)))
    for name in ("E", "px", "pid", "col"):
        assert np.array_equal(getattr(result.record, name).numpy(), getattr(again.record, name).numpy())
    assert not np.array_equal(run_shower(F64, n, SETTINGS, seed=12).record.E.numpy(), result.record.E.numpy())


def test_hard_process_matches_textbook_gamma_z_formula():
    terms = ref.flavour_terms(91.2)
    total = sum(a0 for _, a0, _ in terms)
    for (pdg, a0, a1), (fraction, forward) in zip(terms, hard_process_fractions(91.2)):
        assert fraction == pytest.approx(a0 / total, rel=1e-12)
        assert forward == pytest.approx(0.5 * (1.0 + 0.5 * a1 / a0), rel=1e-12)
    # sampled flavours and forward-backward asymmetry of the quark
    n = 100_000
    result = run_shower(F64, n, ShowerSettings(t0=1000.0), seed=5)  # t0 near s/4: (almost) no emissions
    pid = _padded(result.record.pid, n)[:, 0]
    pz = _padded(result.record.pz, n)[:, 0]
    for pdg, a0, a1 in terms:
        chosen = pid == pdg
        assert chosen.mean() == pytest.approx(a0 / total, abs=4 * math.sqrt(0.25 / n))
        afb = (np.count_nonzero(pz[chosen] > 0) - np.count_nonzero(pz[chosen] < 0)) / chosen.sum()
        assert afb == pytest.approx(3.0 / 8.0 * a1 / a0, abs=4 / math.sqrt(chosen.sum()))


# ---------------------------------------------------------------- observables

def test_event_shapes_match_reference_event_by_event(events64):
    n, result = events64
    record = result.record
    shapes = event_shapes([record.E, record.px, record.py, record.pz], result.n_particles, SETTINGS.s)
    p = np.stack([_padded(c, n) for c in (record.E, record.px, record.py, record.pz)], axis=-1)
    y = np.stack([v.numpy() for v in shapes.y], axis=1)
    thrust = shapes.thrust.numpy()
    counts = result.n_particles.numpy()
    for e in range(300):
        momenta = [list(p[e, i]) for i in range(counts[e])]
        assert np.allclose(y[e], ref.durham_resolutions(momenta, SETTINGS.s), rtol=1e-9, atol=1e-15)
        assert thrust[e] == pytest.approx(ref.thrust(momenta), rel=1e-12)


def test_event_shapes_take_plain_and_ad_arrays_alike():
    """A Dr.Jit user's plain drjit.llvm arrays give the results of the AD arrays (the kernels' own):
    the symmetric three-parton event (thrust 2/3)."""
    import drjit.llvm as plain

    half = 15.0 * math.sqrt(3.0)
    columns = ([30.0, 30.0, 30.0], [30.0, -15.0, -15.0], [0.0, half, -half], [0.0, 0.0, 0.0])
    for Float, ad_float in ((plain.Float64, F64.Float), (plain.Float, kernel_types("cpu", "float32").Float)):
        shapes = event_shapes([Float(c) for c in columns], plain.UInt32([3]), 8100.0)
        reference = event_shapes([ad_float(c) for c in columns], plain.UInt32([3]), 8100.0)
        assert shapes.thrust.numpy().tolist() == reference.thrust.numpy().tolist()
        assert shapes.y[0].numpy().tolist() == reference.y[0].numpy().tolist()
        assert shapes.thrust.numpy()[0] == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_event_shapes_of_three_partons_are_analytic():
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(50):  # massless 3-body configurations from energy fractions
        x1, x2 = rng.uniform(0.5, 1.0, 2)
        x3 = 2.0 - x1 - x2
        if not 0 < x3 < 1 or x1 + x2 < 1:
            continue
        e = np.array([x1, x2, x3]) * 45.6
        cos12 = 1 - 2 * (1 - x3) / (x1 * x2)
        v1 = np.array([0, 0, 1.0]) * e[0]
        v2 = np.array([math.sqrt(1 - cos12**2), 0, cos12]) * e[1]
        rows.append(np.stack([np.r_[e[0], v1], np.r_[e[1], v2], np.r_[e[2], -(v1 + v2)]]))
    events = torch.tensor(np.array(rows))
    shapes = torch_event_shapes(events, torch.full((len(rows),), 3), 91.2, tolerance=1e-9)
    energies = events[..., 0].numpy()
    assert np.allclose(shapes["thrust"].numpy(), 2 * energies.max(1) / 91.2, rtol=1e-12)
    p = events.numpy()
    expected = []
    for event in p:
        y = [2 * min(a[0], b[0]) ** 2 * (1 - a[1:] @ b[1:] / np.linalg.norm(a[1:]) / np.linalg.norm(b[1:])) / 91.2**2
             for a, b in ((event[0], event[1]), (event[0], event[2]), (event[1], event[2]))]
        expected.append(min(y))
    assert np.allclose(shapes["y23"].numpy(), expected, rtol=1e-10)
    assert np.all(shapes["y34"].numpy() == 0)


def test_event_shape_tangents_match_finite_differences(events64):
    n, result = events64
    record = result.record
    columns = [record.E, record.px, record.py, record.pz]
    rng = np.random.default_rng(2)
    counts = result.n_particles.numpy()
    # a momentum-conserving, mass-preserving direction: rotate every event about its own axis
    p = np.stack([_padded(c, n) for c in columns], axis=-1)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    direction = np.zeros_like(p)
    direction[..., 1:] = np.cross(axis[:, None, :], p[..., 1:])
    direction += 0.01 * rng.normal(size=p.shape) * (np.arange(M)[None, :, None] < counts[:, None, None])
    tangents = [F64.Float(direction[..., k].reshape(-1)) for k in range(4)]
    shapes = event_shapes(columns, result.n_particles, SETTINGS.s, tangents=tangents)
    h = 1e-6  # central differences: error ~ 1e-16 / h absolute, h^2 relative

    def shifted(sign):
        return event_shapes([F64.Float((p[..., k] + sign * h * direction[..., k]).reshape(-1)) for k in range(4)],
                            result.n_particles, SETTINGS.s)

    up, down = shifted(1), shifted(-1)
    for k in range(4):
        fd = (up.y[k].numpy() - down.y[k].numpy()) / (2 * h)
        d = shapes.dy[k].numpy()
        close = np.isclose(d, fd, rtol=1e-4, atol=1e-8)
        assert close.mean() > 0.995  # the rest: clustering-history changes within +-h (kinks)
    fd = (up.thrust.numpy() - down.thrust.numpy()) / (2 * h)
    assert np.isclose(shapes.dthrust.numpy(), fd, rtol=1e-4, atol=1e-8).mean() > 0.995


def test_histogram_and_bin_indicators_count_like_numpy_including_the_last_edge():
    """Bins [lo, hi), the last [lo, hi]: values on the last edge (thrust = 1 of events without
    emission) are counted, values on inner edges go to the upper bin, outside ones nowhere."""
    edges = [-2.0, -1.0, 0.0, 0.5, 3.0]
    values = np.concatenate([np.random.default_rng(0).normal(size=10_000), edges, [-2.5, 3.5, 3.0]])
    x = F64.Float(values)
    expected = np.histogram(values, edges)[0]
    assert np.array_equal(histogram(x, edges).numpy(), expected)
    indicators = np.stack([b.numpy() for b in bin_indicators(x, edges)], axis=1)
    assert np.array_equal(indicators.sum(0), expected) and indicators.sum(1).max() == 1


# ---------------------------------------------------------------- distributions vs the reference

def _two_sample_chi2(a, b, edges):
    """Chi2 of two unequal-size histograms (sum of ((k1 h_a - k2 h_b)^2 / (h_a + h_b))) and its ndf."""
    ha, _ = np.histogram(a, edges)
    hb, _ = np.histogram(b, edges)
    used = (ha + hb) > 0
    k1, k2 = math.sqrt(len(b) / len(a)), math.sqrt(len(a) / len(b))
    return float((((k1 * ha - k2 * hb) ** 2)[used] / (ha + hb)[used]).sum()), int(used.sum())


@pytest.fixture(scope="module")
def reference_sample():
    events = ref.generate(2000, seed=17)
    y = np.array([ref.durham_resolutions([p.mom for p in ev], SETTINGS.s) for ev in events])
    thrust = np.array([ref.thrust([p.mom for p in ev]) for ev in events])
    return y, thrust, np.array([len(ev) for ev in events])


def _kernel_sample(alpha_s, precision="float64", n=60_000):
    settings = ShowerSettings(alpha_s_mz=alpha_s)
    result = run_shower(kernel_types("cpu", precision), n, settings, seed=23)
    record = result.record
    shapes = event_shapes([record.E, record.px, record.py, record.pz], result.n_particles, settings.s)
    y = np.stack([v.numpy() for v in shapes.y], axis=1).astype(np.float64)
    return y, shapes.thrust.numpy().astype(np.float64), result.n_particles.numpy()


HISTOGRAMS = (("log10 y23", 0, np.linspace(-4.5, -0.5, 17)), ("log10 y34", 1, np.linspace(-4.5, -1.0, 15)),
              ("1 - T", None, np.linspace(0.0, 0.35, 15)))


def _chi2s(kernel, reference):
    out = {}
    with np.errstate(divide="ignore"):
        for name, k, edges in HISTOGRAMS:
            a = np.log10(kernel[0][:, k]) if k is not None else 1 - kernel[1]
            b = np.log10(reference[0][:, k]) if k is not None else 1 - reference[1]
            out[name] = _two_sample_chi2(a, b, edges)
    return out


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_distributions_agree_with_scalar_python_reference(reference_sample, precision):
    kernel = _kernel_sample(0.118, precision)
    for name, (chi2, ndf) in _chi2s(kernel, reference_sample).items():
        # p-value > ~1e-3 for ndf ~ 15
        assert chi2 / ndf < 2.6, (name, chi2, ndf)
    mean_ref, error = reference_sample[2].mean(), reference_sample[2].std() / math.sqrt(len(reference_sample[2]))
    assert kernel[2].mean() == pytest.approx(mean_ref, abs=4 * error)


def _no_emission_probability(alpha_s, t0, sqrt_s, n_nodes=400):
    """Sudakov factor of the q qbar pair: the probability that neither end emits above t0, by quadrature
    of the documented q -> q g dipole kernel (docs/shower.md) over ln t in [ln t0, ln(s/4)] and
    w = ln(z / (1 - z)) over z (1 - z) >= t / s (Gauss-Legendre in both)."""
    s = sqrt_s**2
    coupling = RunningCoupling(alpha_s)
    nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
    low, high = math.log(t0), math.log(s / 4.0)
    exponent = 0.0
    for x, weight in zip(nodes, weights):
        t = math.exp(0.5 * (high - low) * x + 0.5 * (high + low))
        z_plus = 0.5 * (1.0 + math.sqrt(1.0 - 4.0 * t / s))
        half_range = math.log(z_plus / (1.0 - z_plus))
        z = 1.0 / (1.0 + np.exp(-half_range * nodes))
        y = t / (z * (1.0 - z) * s)
        kernel = ref.CF * (2.0 / (1.0 - z * (1.0 - y)) - (1.0 + z)) * (1.0 - y)
        z_integral = half_range * np.sum(weights * z * (1.0 - z) * kernel)
        exponent += 0.5 * (high - low) * weight * coupling(t) / (2.0 * math.pi) * z_integral
    return math.exp(-2.0 * exponent)  # two dipole ends


@pytest.mark.parametrize("t0", [1.0, 10.0, 100.0])
def test_fraction_without_emission_is_the_analytic_sudakov_factor(t0):
    """Events that keep the two quarks (no emission above t0) vs the quadrature: tests the veto algorithm,
    the overestimate's z range, the (1 - y) factor and the kernel together, independently of the reference."""
    n = 100_000
    result = run_shower(kernel_types("cpu", "float64"), n, ShowerSettings(t0=t0), seed=11)
    fraction = float(np.mean(result.n_particles.numpy() == 2))
    expected = _no_emission_probability(0.118, t0, 91.2)
    assert 0.04 < expected < 0.8                     # 0.047, 0.356, 0.795
    assert fraction == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))


def test_distribution_test_detects_a_different_alpha_s(reference_sample):
    chi2, ndf = _chi2s(_kernel_sample(0.135), reference_sample)["log10 y23"]
    assert chi2 / ndf > 4.0


# ---------------------------------------------------------------- module, bad input

def test_module_generates_padded_events():
    shower = PartonShower(dtype=torch.float32)
    events = shower(500, seed=1)
    assert events.momenta.shape == (500, 64, 4) and events.momenta.dtype == torch.float32
    assert events.pid.dtype == torch.int32 and events.colour.shape == (500, 64, 2)
    assert torch.all(events.mask.sum(1) == events.n_particles)
    shapes = events.event_shapes()
    assert set(shapes) == {"y23", "y34", "y45", "y56", "thrust"}
    assert torch.all((shapes["thrust"] >= 0.5) & (shapes["thrust"] <= 1.0 + 1e-6))


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha_s_mz": 0.5}, "alpha_s must lie"),
    ({"alpha_s_mz": 0.15, "t0": 50.0}, r"alpha_s must lie in \[0.05, 0.14\]"),
    ({"alpha_s_mz": "0.1"}, "alpha_s must be a finite number"),
    ({"alpha_s_mz": float("nan")}, "alpha_s must be a finite number"),
    ({"t0": 0.1}, "t0 must exceed"),
    ({"t0": 3000.0}, "t0 must be below s / 4"),
    ({"sqrt_s": 5.0}, "sqrt_s must lie"),
    ({"sqrt_s": 1000.0}, "sqrt_s must lie"),
    ({"max_particles": 2}, "max_particles"),
    ({"cutoff_width": -1.0}, "cutoff_width"),
    ({"cutoff_width": 0.5}, "t0 exp"),
])
def test_settings_reject_out_of_range_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShowerSettings(**kwargs)


def test_every_alpha_s_of_the_range_runs_with_a_valid_t0_and_project_moves_back_into_it():
    """The whole ALPHA_S_RANGE works (t0 above the scale where alpha_s = 1, which grows with alpha_s);
    after an optimiser step out of the valid region, project() makes the module usable again."""
    for alpha_s in (0.05, 0.118, 0.14):
        lowest = RunningCoupling(alpha_s).lowest_valid_scale()
        PartonShower(alpha_s=alpha_s, t0=1.05 * max(lowest, 0.5))(20, seed=1)
    shower = PartonShower(alpha_s=0.125, t0=1.0)
    for alpha_s, t0, expected_alpha_s in [(0.2, 0.5, 0.14), (0.137, 1.0, 0.137), (0.01, 3000.0, 0.05)]:
        with torch.no_grad():
            shower.alpha_s.fill_(alpha_s)
            shower.t0.fill_(t0)
        with pytest.raises(ValueError):
            shower.settings()
        shower.project()
        assert shower.alpha_s.item() == pytest.approx(expected_alpha_s)
        shower(20, seed=2)  # valid again
    for margin in (1.0, -0.5, float("nan")):  # t0 would leave the valid range (margin 1: t0 = 0)
        with pytest.raises(ValueError, match="margin must be a number in"):
            shower.project(margin)
    assert PartonShower(alpha_s=torch.tensor(0.12)).alpha_s.item() == pytest.approx(0.12)  # a 0-d tensor is a number
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        PartonShower(dtype=torch.float16)


def test_module_rejects_bad_parameters_and_overflow():
    shower = PartonShower()
    with torch.no_grad():
        shower.alpha_s.fill_(float("nan"))
    with pytest.raises(ValueError, match="alpha_s contains NaN"):
        shower(10)
    with pytest.raises(ValueError, match="t0 must exceed"):
        PartonShower(t0=0.01)
    with pytest.raises(ValueError, match="n_events"):
        PartonShower()(0)
    with pytest.raises(RuntimeError, match="max_particles"):
        PartonShower(max_particles=4)(2000, seed=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: this torch build has no CUDA"):
            PartonShower(device="cuda")


def test_event_shapes_reject_malformed_events():
    good = PartonShower()(20, seed=2)
    momenta, counts = good.momenta, good.n_particles
    as_tensor = torch_event_shapes(momenta, counts, torch.tensor(91.2))  # sqrt_s also as a 0-d tensor
    assert torch.equal(as_tensor["thrust"], good.event_shapes()["thrust"])
    with pytest.raises(ValueError, match="momenta must have shape"):
        torch_event_shapes(momenta[..., :3], counts, 91.2)
    with pytest.raises(ValueError, match="n_particles must lie"):
        torch_event_shapes(momenta, torch.ones_like(counts), 91.2)
    with pytest.raises(TypeError, match="n_particles must be an integer"):
        torch_event_shapes(momenta, counts.double(), 91.2)
    bad = momenta.clone()
    bad[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="massless|sum to"):
        torch_event_shapes(bad, counts, 91.2)
    bad = momenta.clone()
    bad[3, 0] *= 2.0
    with pytest.raises(ValueError, match="event 3 does not sum"):
        torch_event_shapes(bad, counts, 91.2)
    bad = momenta.clone()
    bad[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        torch_event_shapes(bad, counts, 91.2)
    with pytest.raises(ValueError, match="sqrt_s"):
        torch_event_shapes(momenta, counts, -1.0)
    with pytest.raises(ValueError, match="sqrt_s must be a positive finite"):
        torch_event_shapes(momenta, counts, float("inf"))
