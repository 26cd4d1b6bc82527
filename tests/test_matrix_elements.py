"""LO matrix elements: analytic cross sections, A_FB, t tbar textbook results, gradients, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import torch_me
from scipy.special import spence

from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.electroweak import DEFAULTS, GF, SMParameters, alpha_from_gf
from pyhybrid.kernels.hard_process import HardProcess
from pyhybrid.kernels.matrix_elements import CF, GEV2_TO_PB, get_process
from pyhybrid.nn.matrix_element import (_SUM_BLOCK, DifferentialCrossSection, MatrixElement, TwoBodyCrossSection,
                                        rambo_momenta, two_body_momenta)

T64 = kernel_types("cpu", "float64")
PARAMETER_NAMES = ("mz", "gamma_z", "alpha", "sin2_theta_w", "alpha_s", "top_mass")
SQRT_S = {"ee_mumu": 91.2, "ee_qq": 91.2, "ee_qqg": 91.2, "qq_tt": 500.0, "gg_tt": 500.0}


# ----------------------------------------------------------------- textbook formulas (independent of the kernels)


def ee_ffbar_analytic(sqrt_s, charge=-1.0, isospin=-0.5, colours=1, p=DEFAULTS):
    """sigma [pb] and A_FB of e+e- -> f fbar (massless, gamma + Z), e.g. PDG review 'Electroweak model':
    sigma = 4 pi alpha^2 / (3 s) N_c [Q_e^2 Q_f^2 + 2 Q_e Q_f v_e v_f Re chi + (v_e^2 + a_e^2)(v_f^2 + a_f^2)|chi|^2],
    A_FB = 3/4 [2 Q_e Q_f a_e a_f Re chi + 4 v_e a_e v_f a_f |chi|^2] / [...]."""
    s, sw2 = sqrt_s**2, p.sin2_theta_w
    chi = s / complex(s - p.mz**2, p.mz * p.gamma_z) / (4 * sw2 * (1 - sw2))
    qe, ve, ae = -1.0, -0.5 + 2 * sw2, -0.5
    vf, af = isospin - 2 * charge * sw2, isospin
    bracket = (qe**2 * charge**2 + 2 * qe * charge * ve * vf * chi.real
               + (ve**2 + ae**2) * (vf**2 + af**2) * abs(chi) ** 2)
    asymmetric = 2 * qe * charge * ae * af * chi.real + 4 * ve * ae * vf * af * abs(chi) ** 2
    sigma = 4 * math.pi * p.alpha**2 / (3 * s) * colours * bracket * GEV2_TO_PB
    return sigma, 0.75 * asymmetric / bracket


def ttbar_partonic_analytic(process, sqrt_s, mt=DEFAULTS.top_mass, alpha_s=DEFAULTS.alpha_s):
    """LO partonic sigma [pb] (Combridge 1979; Nason, Dawson, Ellis 1988, eq. 2.x at LO):
    q qbar: 8 pi as^2 / (27 s) beta (1 + rho / 2);
    g g: pi as^2 / (3 s) [(1 + rho + rho^2 / 16) ln((1 + beta) / (1 - beta)) - beta (7/4 + 31 rho / 16)]."""
    s = sqrt_s**2
    rho = 4 * mt**2 / s
    beta = math.sqrt(1 - rho)
    if process == "qq_tt":
        sigma = 8 * math.pi * alpha_s**2 / (27 * s) * beta * (1 + rho / 2)
    else:
        sigma = math.pi * alpha_s**2 / (3 * s) * ((1 + rho + rho**2 / 16) * math.log((1 + beta) / (1 - beta))
                                                  - beta * (7 / 4 + 31 * rho / 16))
    return sigma * GEV2_TO_PB


def three_jet_rate(y):
    """O(alpha_s) three-parton fraction with s_ij > y s for all pairs (Kramer & Lampe), per C_F alpha_s / 2 pi."""
    li2 = float(spence(1 - y / (1 - y)))
    return ((3 - 6 * y) * math.log(y / (1 - 2 * y)) + 2 * math.log(y / (1 - y)) ** 2 + 2.5 - 6 * y - 4.5 * y * y
            + 4 * li2 - math.pi**2 / 3)


# ----------------------------------------------------------------- helpers


def _momenta(process, n, dtype=torch.float64, seed=3):
    masses = torch.tensor(get_process(process).outgoing_masses(SMParameters()), dtype=torch.float64)
    momenta, _ = rambo_momenta(SQRT_S[process], masses, n, seed=seed)
    return momenta.detach().to(dtype)


def _reference_params(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ----------------------------------------------------------------- values


@pytest.mark.parametrize("process", ["ee_mumu", "ee_qq", "ee_qqg", "qq_tt", "gg_tt"])
def test_module_matches_torch_reference_formula(process):
    module = MatrixElement(process).double()
    momenta = _momenta(process, 512)
    expected = torch_me.squared_matrix_element(process, momenta, _reference_params(module))
    torch.testing.assert_close(module(momenta), expected, rtol=1e-11, atol=0)
    module32 = MatrixElement(process)
    torch.testing.assert_close(module32(momenta.float()).double(), expected, rtol=2e-4, atol=0)


@pytest.mark.parametrize("sqrt_s", [10.0, 91.2])
def test_sigma_ee_to_mumu_matches_analytic_within_mc_error(sqrt_s):
    analytic, _ = ee_ffbar_analytic(sqrt_s)
    result = HardProcess("ee_mumu", sqrt_s).cross_section(T64, n_points=40_000, adapt_iterations=2, iterations=4,
                                                          seed=11)
    assert abs(result.integral - analytic) < 4 * result.error
    assert result.error < 1e-3 * analytic
    # RAMBO mapping: independent phase space, same answer.
    rambo = HardProcess("ee_mumu", sqrt_s, mapping="rambo").cross_section(T64, n_points=40_000, adapt_iterations=1,
                                                                          iterations=3, seed=12)
    assert abs(rambo.integral - analytic) < 4 * rambo.error
    # Gauss-Legendre in cos theta is exact for this quadratic polynomial.
    module = TwoBodyCrossSection("ee_mumu").double()
    assert module.cross_section(sqrt_s, n_nodes=4).item() == pytest.approx(analytic, rel=1e-12)


@pytest.mark.parametrize("flavour, charge, isospin", [("u", 2 / 3, 0.5), ("b", -1 / 3, -0.5)])
def test_sigma_ee_to_qqbar_per_flavour(flavour, charge, isospin):
    module = TwoBodyCrossSection("ee_qq", flavour).double()
    for sqrt_s in (10.0, 91.2, 200.0):
        analytic, _ = ee_ffbar_analytic(sqrt_s, charge, isospin, colours=3)
        assert module.cross_section(sqrt_s, n_nodes=4).item() == pytest.approx(analytic, rel=1e-12)


@pytest.mark.parametrize("sqrt_s", [35.0, 91.2])
def test_forward_backward_asymmetry_of_unweighted_events(sqrt_s):
    _, analytic = ee_ffbar_analytic(sqrt_s)
    hard = HardProcess("ee_mumu", sqrt_s)
    result = hard.cross_section(T64, n_points=20_000, adapt_iterations=1, iterations=2, seed=5)
    events = hard.unweighted_events(T64, result, 100_000, seed=6)
    cos_theta = events.momenta[:, 2, 3] / np.linalg.norm(events.momenta[:, 2, 1:], axis=1)
    forward = np.count_nonzero(cos_theta > 0)
    a_fb = (2 * forward - len(cos_theta)) / len(cos_theta)
    error = math.sqrt((1 - a_fb**2) / len(cos_theta))
    assert abs(a_fb - analytic) < 4 * error
    # The exact integral of d sigma / d cos theta over the two hemispheres.
    module = TwoBodyCrossSection("ee_mumu").double()
    nodes, weights = np.polynomial.legendre.leggauss(4)
    half = torch.as_tensor((nodes + 1) / 2, dtype=torch.float64)
    w = torch.as_tensor(weights / 2, dtype=torch.float64)
    f, b = (w * module(half, sqrt_s)).sum(), (w * module(-half, sqrt_s)).sum()
    assert ((f - b) / (f + b)).item() == pytest.approx(analytic, rel=1e-10)


def test_afb_changes_sign_below_the_z_pole():
    """gamma-Z interference: A_FB < 0 below the pole (PETRA/TRISTAN), small and positive at it."""
    assert ee_ffbar_analytic(35.0)[1] < -0.05
    assert 0 < ee_ffbar_analytic(91.2)[1] < 0.05


@pytest.mark.parametrize("process", ["qq_tt", "gg_tt"])
@pytest.mark.parametrize("sqrt_s", [360.0, 500.0, 1000.0])
def test_ttbar_partonic_cross_section_matches_textbook(process, sqrt_s):
    module = TwoBodyCrossSection(process).double()
    sigma = module.cross_section(sqrt_s, n_nodes=96).item()
    assert sigma == pytest.approx(ttbar_partonic_analytic(process, sqrt_s), rel=1e-9)


def test_qqbar_to_ttbar_matches_combridge_form():
    """Combridge's t/u form: (4/9) g^4 [(m^2 - t)^2 + (m^2 - u)^2 + 2 m^2 s] / s^2."""
    momenta = _momenta("qq_tt", 64)
    p1, p2, p3, _ = momenta.unbind(1)
    m2 = DEFAULTS.top_mass**2
    s, t, u = torch_me.dot(p1 + p2, p1 + p2), torch_me.dot(p1 - p3, p1 - p3), torch_me.dot(p2 - p3, p2 - p3)
    g4 = (4 * math.pi * DEFAULTS.alpha_s) ** 2
    combridge = g4 * 4 / 9 * ((m2 - t) ** 2 + (m2 - u) ** 2 + 2 * m2 * s) / s**2
    torch.testing.assert_close(MatrixElement("qq_tt").double()(momenta), combridge, rtol=1e-10, atol=0)


def test_three_jet_rate_matches_kramer_lampe():
    """sigma(q qbar g, s_ij > y s) / sigma(q qbar) = C_F alpha_s / (2 pi) R(y), for gamma + Z alike."""
    y = 0.05
    sigma_2 = TwoBodyCrossSection("ee_qq").double().cross_section(91.2, n_nodes=4).item()
    result = HardProcess("ee_qqg", 91.2, y_cut=y).cross_section(T64, n_points=50_000, adapt_iterations=3,
                                                                 iterations=4, seed=2)
    expected = sigma_2 * CF * DEFAULTS.alpha_s / (2 * math.pi) * three_jet_rate(y)
    assert abs(result.integral - expected) < 4 * result.error
    assert result.error < 3e-3 * expected


def test_differential_cross_section_normalisation():
    """d sigma / d Phi_n times RAMBO weights integrates to the analytic sigma."""
    masses = torch.zeros(2, dtype=torch.float64)
    momenta, weight = rambo_momenta(10.0, masses, 200_000, seed=4)
    values = DifferentialCrossSection("ee_mumu").double()(momenta.detach()) * weight
    mean, error = values.mean().item(), values.std().item() / math.sqrt(len(values))
    assert abs(mean - ee_ffbar_analytic(10.0)[0]) < 4 * error


def test_gmu_scheme_alpha_and_gradient():
    module = MatrixElement("ee_mumu", gf=GF).double()
    alpha = float(module.effective_alpha().detach())
    assert alpha == pytest.approx(alpha_from_gf(GF, DEFAULTS.mz, DEFAULTS.sin2_theta_w))
    momenta = _momenta("ee_mumu", 8)
    reference = MatrixElement("ee_mumu", alpha=alpha).double()
    torch.testing.assert_close(module(momenta), reference(momenta), rtol=1e-12, atol=0)
    module(momenta).sum().backward()
    assert module.gf.grad is not None and module.gf.grad.item() > 0


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("process", ["ee_mumu", "ee_qqg", "qq_tt", "gg_tt"])
@pytest.mark.parametrize("module_type", [MatrixElement, DifferentialCrossSection])
def test_gradcheck_through_matrix_element(process, module_type):
    module = module_type(process, tolerance=1e-4).double()
    momenta = _momenta(process, 3).requires_grad_()
    params = [getattr(module, name) for name in PARAMETER_NAMES]

    def function(momenta, *values):
        return torch.func.functional_call(module, dict(zip(PARAMETER_NAMES, values)), (momenta,))

    inputs = (momenta, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("process", ["ee_qq", "ee_qqg"])
def test_gradcheck_momenta_only_in_the_gmu_scheme(process):
    """Frozen parameters: the backward pass carries no parameter columns."""
    module = MatrixElement(process, gf=GF, tolerance=1e-4).double().requires_grad_(False)
    momenta = _momenta(process, 3).requires_grad_()
    assert torch.autograd.gradcheck(module, (momenta,), eps=1e-6, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("process", ["ee_mumu", "ee_qq", "ee_qqg", "qq_tt", "gg_tt"])
@pytest.mark.parametrize("scheme", ["gf", "alpha"])
@pytest.mark.parametrize("module_type", [MatrixElement, DifferentialCrossSection])
def test_gradcheck_parameters_only(process, scheme, module_type):
    """Fixed data momenta: the backward pass takes forward-mode parameter derivatives (another path)."""
    # G_mu scheme: alpha depends on mz and sin^2 too.
    module = (module_type(process, gf=GF) if scheme == "gf" else module_type(process)).double()
    momenta = _momenta(process, 3)
    names = ("mz", "gamma_z", scheme, "sin2_theta_w", "alpha_s", "top_mass")

    def function(*values):
        return torch.func.functional_call(module, dict(zip(names, values)), (momenta,))

    inputs = tuple(getattr(module, name).detach().clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("process", ["ee_mumu", "gg_tt"])
@pytest.mark.parametrize("momenta_grad", [False, True], ids=["params", "params+momenta"])
def test_gradients_on_a_large_batch_match_torch_autograd(process, momenta_grad):
    """Several partial-sum blocks (N not a multiple of the block), a non-uniform upstream gradient,
    a frozen parameter, and a repeated backward pass."""
    n = 3 * _SUM_BLOCK + 5
    module = MatrixElement(process).double()
    module.mz.requires_grad_(False)
    momenta = _momenta(process, n).requires_grad_(momenta_grad)
    weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = (weights * module(momenta)).sum()
    loss.backward(retain_graph=True)
    loss.backward()  # gradients accumulate: twice the single-pass value
    params = {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    reference_momenta = momenta.detach().clone().requires_grad_(momenta_grad)
    (2 * weights * torch_me.squared_matrix_element(process, reference_momenta, params)).sum().backward()
    assert module.mz.grad is None
    for name, p in params.items():
        if p.requires_grad:
            expected = p.grad if p.grad is not None else torch.zeros((), dtype=torch.float64)
            torch.testing.assert_close(getattr(module, name).grad, expected, rtol=1e-10, atol=0)
    if momenta_grad:
        scale = reference_momenta.grad.abs().max()
        torch.testing.assert_close(momenta.grad, reference_momenta.grad, rtol=1e-10, atol=1e-13 * scale)


def test_replayed_gradients_follow_the_batch_size_and_match_traced_ones():
    """Both passes' kernels are recorded per configuration and batch size (dr.freeze) and replayed:
    alternating batch sizes (one event included) give what tracing every call gives, bit for bit."""
    import drjit as dr

    from pyhybrid.nn import matrix_element

    module = MatrixElement("ee_qqg").double()
    matrix_element._FROZEN.clear()
    for n in (40, 1, 40, 7):
        momenta = _momenta("ee_qqg", n, seed=n)
        weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        results = []
        for freezing in (True, False):
            dr.set_flag(dr.JitFlag.KernelFreezing, freezing)
            try:
                module.zero_grad(set_to_none=True)
                leaf = momenta.clone().requires_grad_()
                value = module(leaf)
                (weights * value).sum().backward()
                results.append([value.detach(), leaf.grad] + [p.grad for p in module.parameters()])
            finally:
                dr.set_flag(dr.JitFlag.KernelFreezing, True)
        for frozen, traced in zip(*results):
            torch.testing.assert_close(frozen, traced, rtol=0, atol=0)
    # One recording per pass and batch size: the second call with 40 events replayed the first one's.
    recordings = sorted((key[0].__name__, key[1][0][1] // 20, frozen.run.n_recordings)  # key[1]: (type, width)
                        for key, frozen in matrix_element._FROZEN.items())
    assert recordings == sorted((name, n, 1) for name in ("_checked_value", "_matrix_element_gradients")
                                for n in (40, 1, 7))
    # The replayed validation still names a bad event.
    momenta = _momenta("ee_qqg", 40, seed=40)
    momenta[17, 2, 1] += 1.0
    with pytest.raises(ValueError, match="event 17 violates energy-momentum conservation"):
        module(momenta)


@pytest.mark.parametrize("freezing", [True, False], ids=["recorded", "traced"])
def test_a_broadcast_incoming_gradient_stays_one_lane_with_the_same_gradients(freezing):
    """out.sum().backward() hands the VJP one lane for the gradient of every event (no N-lane copy
    written by a kernel of its own); the gradients equal those of the same gradient given per event."""
    import drjit as dr

    module, two_body = MatrixElement("ee_qqg").double(), TwoBodyCrossSection("ee_mumu").double()
    momenta, cos_theta = _momenta("ee_qqg", 50, seed=3), torch.linspace(-0.9, 0.8, 50, dtype=torch.float64)
    dr.set_flag(dr.JitFlag.KernelFreezing, freezing)
    dr.set_flag(dr.JitFlag.KernelHistory, True)
    try:
        for m, x in ((module, momenta), (two_body, cos_theta)):
            results = []
            for broadcast in (True, False):
                m.zero_grad(set_to_none=True)
                leaf = x.clone().requires_grad_()
                value = m(leaf) if m is module else m(leaf, 91.0)
                dr.kernel_history()
                if broadcast:
                    (2.5 * value.sum()).backward()
                else:
                    value.backward(torch.full_like(value, 2.5))
                n_lane_kernels = sum(k["type"] == dr.KernelType.JIT and k["size"] == 50 for k in dr.kernel_history())
                results.append([leaf.grad] + [p.grad for p in m.parameters() if p.grad is not None])
                if broadcast:
                    assert n_lane_kernels == 1  # the gradient kernel only
            for one_lane, per_event in zip(*results):
                torch.testing.assert_close(one_lane, per_event, rtol=0, atol=0)
            # A gradient that varies per event is used per event: each event's row scales with it.
            weights = torch.linspace(0.5, 3.0, 50, dtype=torch.float64)
            leaf = x.clone().requires_grad_()
            (m(leaf) if m is module else m(leaf, 91.0)).backward(weights)
            rows = weights.reshape(-1, *[1] * (x.dim() - 1))
            torch.testing.assert_close(leaf.grad, rows * results[1][0] / 2.5, rtol=1e-12, atol=0)
    finally:
        dr.set_flag(dr.JitFlag.KernelHistory, False)
        dr.set_flag(dr.JitFlag.KernelFreezing, True)


def test_parameter_gradients_match_finite_differences_of_sigma():
    """d sigma / d theta of the exact (Gauss-Legendre) sigma(e+e- -> mu+mu-) vs central differences."""
    module = TwoBodyCrossSection("ee_mumu").double()
    for sqrt_s in (88.0, 91.2, 95.0):
        module.zero_grad()
        module.cross_section(sqrt_s, n_nodes=4).backward()
        for name in ("mz", "gamma_z", "alpha", "sin2_theta_w"):
            value = getattr(DEFAULTS, name)
            step = 1e-6 * value
            plus = ee_ffbar_analytic(sqrt_s, p=SMParameters(**{name: value + step}))[0]
            minus = ee_ffbar_analytic(sqrt_s, p=SMParameters(**{name: value - step}))[0]
            assert getattr(module, name).grad.item() == pytest.approx((plus - minus) / (2 * step), rel=1e-6)


def test_top_mass_gradient_of_ttbar_sigma():
    module = TwoBodyCrossSection("gg_tt").double()
    module.cross_section(500.0, n_nodes=96).backward()
    mt, step = DEFAULTS.top_mass, 1e-4
    finite = (ttbar_partonic_analytic("gg_tt", 500.0, mt + step) - ttbar_partonic_analytic("gg_tt", 500.0, mt - step))
    assert module.top_mass.grad.item() == pytest.approx(finite / (2 * step), rel=1e-6)
    assert module.alpha_s.grad.item() == pytest.approx(2 * ttbar_partonic_analytic("gg_tt", 500.0) / DEFAULTS.alpha_s,
                                                       rel=1e-9)


def test_gradcheck_two_body_cross_section():
    module = TwoBodyCrossSection("gg_tt").double()
    cos_theta = torch.tensor([-0.8, 0.1, 0.7], dtype=torch.float64, requires_grad=True)
    sqrt_s = torch.tensor(420.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: module(c, r), (cos_theta, sqrt_s), eps=1e-6, atol=1e-9)


@pytest.mark.parametrize("broadcast_energy", [True, False], ids=["one sqrt_s", "sqrt_s per point"])
def test_two_body_cross_section_replays_match_traced_calls(broadcast_energy):
    """TwoBodyCrossSection's recorded kernels (keyed by the input widths, one-lane inputs broadcast)
    give the traced values and gradients bit for bit, for a repeated size and a new one."""
    import drjit as dr

    from pyhybrid.nn import matrix_element

    module = TwoBodyCrossSection("ee_mumu").double()
    matrix_element._FROZEN.clear()
    for n in (5, 5, 9):
        cos_theta = torch.linspace(-0.9, 0.8, n, dtype=torch.float64)
        energy = torch.tensor(91.0, dtype=torch.float64) if broadcast_energy else torch.linspace(88, 95, n).double()
        results = []
        for freezing in (True, False):
            dr.set_flag(dr.JitFlag.KernelFreezing, freezing)
            try:
                module.zero_grad(set_to_none=True)
                leaves = cos_theta.clone().requires_grad_(), energy.clone().requires_grad_()
                value = module(*leaves)
                torch.log(value).sum().backward()
                results.append([value.detach(), *(leaf.grad for leaf in leaves), module.mz.grad, module.alpha.grad])
            finally:
                dr.set_flag(dr.JitFlag.KernelFreezing, True)
        for frozen, traced in zip(*results):
            torch.testing.assert_close(frozen, traced, rtol=0, atol=0)
    # Forward and backward recorded once per size: the second call with 5 points replayed them.
    assert sorted(f.run.n_recordings for f in matrix_element._FROZEN.values()) == [1, 1, 1, 1]


def test_float32_gradients_agree_with_float64():
    momenta = _momenta("ee_qqg", 64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        module = MatrixElement("ee_qqg").to(dtype)
        p = momenta.to(dtype).requires_grad_()
        module(p).sum().backward()
        grads.append((p.grad.double(), module.alpha_s.grad.double()))
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=0)
    scale = grads[1][0].abs().max()
    assert (grads[0][0] - grads[1][0]).abs().max() < 1e-3 * scale


def test_forward_without_autograd_matches_and_validates():
    """Under no_grad, or with every input frozen, the module skips the autograd bridge: the same
    values and the same input checks as the differentiable call, and a result of torch's own."""
    module = MatrixElement("gg_tt").double()
    momenta = _momenta("gg_tt", 64)
    differentiable = module(momenta)
    assert differentiable.requires_grad
    with torch.no_grad():
        plain = module(momenta)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, differentiable.detach(), rtol=1e-15, atol=0)
    frozen = MatrixElement("gg_tt").double().requires_grad_(False)
    torch.testing.assert_close(frozen(momenta), plain, rtol=0, atol=0)
    plain.zero_()  # torch owns the result: the next call is unaffected
    with torch.no_grad():
        torch.testing.assert_close(module(momenta), differentiable.detach(), rtol=1e-15, atol=0)
    unbalanced = momenta.clone()
    unbalanced[5, 2, 1] += 0.01
    with torch.no_grad(), pytest.raises(ValueError, match="event 5 violates energy-momentum conservation"):
        module(unbalanced)
    not_finite = momenta.clone()
    not_finite[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="event 1"):
        frozen(not_finite)


# ----------------------------------------------------------------- bad input


def test_rejects_momenta_violating_conservation():
    momenta = _momenta("ee_mumu", 16)
    momenta[5, 2, 1] += 0.01
    with pytest.raises(ValueError, match="event 5 violates energy-momentum conservation"):
        MatrixElement("ee_mumu").double()(momenta)


def test_rejects_wrong_on_shell_mass():
    masses = torch.full((2,), 170.0, dtype=torch.float64)
    momenta, _ = rambo_momenta(500.0, masses, 4, seed=1)
    with pytest.raises(ValueError, match=r"particle 2 of event 0 .* on shell with mass 172.5"):
        MatrixElement("gg_tt").double()(momenta.detach())


def test_rejects_energy_below_threshold():
    momenta = _momenta("ee_mumu", 2)  # sqrt(s) = 91.2 GeV, far below 2 m_top
    with pytest.raises(ValueError, match="threshold"):
        MatrixElement("gg_tt").double()(momenta)
    with pytest.raises(ValueError, match="below the gg_tt threshold"):
        TwoBodyCrossSection("gg_tt").double()(torch.zeros(3, dtype=torch.float64), 300.0)
    with pytest.raises(ValueError, match="sqrt_s must exceed"):
        HardProcess("qq_tt", 340.0)
    with pytest.raises(ValueError, match="below threshold"):
        rambo_momenta(300.0, torch.full((2,), 172.5, dtype=torch.float64), 4)


def test_rejects_non_finite_momenta_and_bad_shapes():
    momenta = _momenta("ee_mumu", 4)
    momenta[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="event 1"):
        MatrixElement("ee_mumu").double()(momenta)
    for particle in range(4):  # an infinity in any component of any particle
        for component in range(4):
            for sign in (1.0, -1.0):
                momenta = _momenta("ee_mumu", 4)
                momenta[2, particle, component] = sign * float("inf")
                with pytest.raises(ValueError, match="event 2"):
                    MatrixElement("ee_mumu").double()(momenta)
    with pytest.raises(ValueError, match=r"momenta must have shape \(N, 4, 4\)"):
        MatrixElement("ee_mumu").double()(torch.zeros(4, 5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="momenta must be a torch.Tensor"):
        MatrixElement("ee_mumu")(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match=r"sqrt_s must be a number or a 0-d tensor, got shape \(2,\)"):
        TwoBodyCrossSection("ee_mumu").double().cross_section(torch.tensor([91.0, 92.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="n_nodes must be a positive integer"):
        TwoBodyCrossSection("ee_mumu").double().cross_section(91.0, n_nodes=0)


def test_rejects_unknown_flavour_and_process():
    with pytest.raises(ValueError, match="unknown flavour 't' for process 'ee_qq'"):
        MatrixElement("ee_qq", "t")
    with pytest.raises(ValueError, match="takes no flavour"):
        MatrixElement("gg_tt", "u")
    with pytest.raises(ValueError, match="unknown process 'ee_tautau'"):
        MatrixElement("ee_tautau")
    with pytest.raises(ValueError, match="unknown flavour"):
        HardProcess("ee_qqg", 91.2, flavour="top")


@pytest.mark.parametrize("values, message", [({"gamma_z": -2.5}, "parameter gamma_z must be positive"),
                                             ({"sin2_theta_w": 1.0}, r"sin2_theta_w must lie in \(0, 1\)"),
                                             ({"mz": float("nan")}, "parameter mz must be finite")])
def test_hard_process_rejects_invalid_sm_parameters(values, message):
    with pytest.raises(ValueError, match=message):
        HardProcess("ee_mumu", 91.2, params=SMParameters(**values))


def test_rejects_bad_parameter_values():
    with pytest.raises(ValueError, match="sin2_theta_w must lie in"):
        MatrixElement("ee_mumu", sin2_theta_w=1.2)
    with pytest.raises(ValueError, match="either alpha or gf"):
        MatrixElement("ee_mumu", alpha=0.0078, gf=GF)
    with pytest.raises(TypeError, match=r"MatrixElement: unknown parameter\(s\) \['m_z'\]; the Standard-Model inputs are mz,"):
        MatrixElement("ee_mumu", m_z=91.0)
    module = MatrixElement("ee_mumu").double()
    with torch.no_grad():
        module.gamma_z.fill_(-1.0)
    with pytest.raises(ValueError, match="gamma_z must be positive"):
        module(_momenta("ee_mumu", 2))


def test_empty_batches_give_empty_results_with_zero_gradients():
    """A selection that kept no event: an empty result, no kernel call, and zero (not missing)
    gradients of the inputs and parameters, as for any other batch."""
    for module, inputs in ((MatrixElement("gg_tt").double(), (torch.zeros(0, 4, 4, dtype=torch.float64),)),
                           (DifferentialCrossSection("ee_mumu").double(), (torch.zeros(0, 4, 4, dtype=torch.float64),)),
                           (TwoBodyCrossSection("ee_mumu").double(), (torch.zeros(0, dtype=torch.float64), 91.0))):
        module.requires_grad_(True)
        first = inputs[0].requires_grad_()
        out = module(*inputs)
        assert out.shape == (0,)
        out.sum().backward()
        assert first.grad is not None and first.grad.shape == first.shape
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad == 0, name


def test_two_body_momenta_empty_batch_and_dtype_errors():
    empty = torch.zeros(0, dtype=torch.float64)
    momenta, density = two_body_momenta(100.0, 1.0, 2.0, empty, empty)
    assert momenta.shape == (0, 4, 4) and density.shape == (0,)
    with pytest.raises(TypeError, match="cos_theta must have dtype torch.float32 or torch.float64"):
        two_body_momenta(100.0, 1.0, 2.0, torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16))


@pytest.mark.parametrize("process, scheme", [("qq_tt", "alpha"), ("ee_mumu", "gf"), ("ee_qq", "alpha")])
def test_gradcheck_two_body_cross_section_parameters(process, scheme):
    """d sigma / d cos theta with respect to the angles, a per-event sqrt(s) and all six parameters."""
    options = {"gf": GF} if scheme == "gf" else {}
    module = TwoBodyCrossSection(process, **options).double()
    names = [name for name, _ in module.named_parameters()]
    assert len(names) == 6
    top = process == "qq_tt"
    cos_theta = torch.tensor([-0.8, 0.1, 0.7], dtype=torch.float64, requires_grad=True)
    sqrt_s = torch.tensor([420.0, 500.0, 900.0] if top else [60.0, 91.0, 120.0], dtype=torch.float64,
                          requires_grad=True)

    def sigma(c, r, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (c, r))

    values = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(sigma, (cos_theta, sqrt_s, *values), eps=1e-7, atol=1e-10, rtol=1e-5)
