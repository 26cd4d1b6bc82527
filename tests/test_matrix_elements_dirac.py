"""The closed-form |M|^2 of the kernels against an independent Feynman-diagram evaluation.

The reference below builds each amplitude from explicit Dirac spinors, gamma
matrices and gluon polarisation vectors (chiral representation, Peskin &
Schroeder conventions) and sums |M|^2 numerically over all helicities, with the
colour factors done by hand. It shares no formula with the kernels, so it checks
the chiral structure of the gamma/Z interference, the gluon-emission matrix
element and the triple-gluon diagram of g g -> t tbar.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.electroweak import FERMIONS, SMParameters
from pyhybrid.kernels.matrix_elements import get_process
from pyhybrid.kernels.phase_space import incoming_momenta, rambo, two_body

# ----------------------------------------------------------------- Dirac algebra (chiral representation)
I2 = np.eye(2)
PAULI = [np.array([[0, 1], [1, 0]], complex), np.array([[0, -1j], [1j, 0]]), np.array([[1, 0], [0, -1]], complex)]
Z2 = np.zeros((2, 2))
GAMMA = [np.block([[Z2, I2], [I2, Z2]]).astype(complex)] + [np.block([[Z2, s], [-s, Z2]]) for s in PAULI]
GAMMA5 = np.block([[-I2, Z2], [Z2, I2]]).astype(complex)
P_LEFT, P_RIGHT = (np.eye(4) - GAMMA5) / 2, (np.eye(4) + GAMMA5) / 2
METRIC = np.array([1.0, -1.0, -1.0, -1.0])
BASIS = [np.array([1, 0], complex), np.array([0, 1], complex)]


def slash(p):
    return sum(METRIC[mu] * p[mu] * GAMMA[mu] for mu in range(4))


def mdot(a, b):
    return a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3]


def _roots(p, m):
    """sqrt(p.sigma), sqrt(p.sigmabar) = (p.sigma + m) / sqrt(2 (E + m)) (valid for m >= 0)."""
    p_sigma = p[0] * I2 - sum(p[i + 1] * PAULI[i] for i in range(3))
    p_sigmabar = p[0] * I2 + sum(p[i + 1] * PAULI[i] for i in range(3))
    norm = math.sqrt(2 * (p[0] + m))
    return (p_sigma + m * I2) / norm, (p_sigmabar + m * I2) / norm


def u_spinor(p, m, s):
    a, b = _roots(p, m)
    return np.concatenate([a @ BASIS[s], b @ BASIS[s]])


def v_spinor(p, m, s):
    a, b = _roots(p, m)
    return np.concatenate([a @ BASIS[s], -b @ BASIS[s]])


def bar(spinor):
    return spinor.conj() @ GAMMA[0]


def polarisations(k):
    """Two real transverse polarisation vectors of a massless vector boson with momentum k."""
    direction = np.asarray(k[1:]) / np.linalg.norm(k[1:])
    helper = np.array([1.0, 0, 0]) if abs(direction[0]) < 0.9 else np.array([0, 1.0, 0])
    e1 = np.cross(direction, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(direction, e1)
    return [np.concatenate([[0.0], e1]), np.concatenate([[0.0], e2])]


def current(left, right, couplings):
    """J^mu = left gamma^mu (cL P_L + cR P_R) right (index up)."""
    c_left, c_right = couplings
    vertex = c_left * P_LEFT + c_right * P_RIGHT
    return np.array([left @ GAMMA[mu] @ vertex @ right for mu in range(4)])


def contract(a, b):
    return sum(METRIC[mu] * a[mu] * b[mu] for mu in range(4))


def z_couplings(f, sw2):
    norm = 1 / math.sqrt(sw2 * (1 - sw2))
    return (f.isospin - f.charge * sw2) * norm, -f.charge * sw2 * norm


def electroweak_exchanges(s, f, params):
    """[(electron couplings, fermion couplings, propagator)] for photon and Z, in units of e."""
    e, p = FERMIONS["e"], params
    z = 1 / complex(s - p.mz**2, p.mz * p.gamma_z)
    return [((e.charge, e.charge), (f.charge, f.charge), 1 / s),
            (z_couplings(e, p.sin2_theta_w), z_couplings(f, p.sin2_theta_w), z)]


def reference_ee_ffbar(p, f, params):
    p1, p2, p3, p4 = p
    e2 = 4 * math.pi * params.alpha
    total = 0.0
    for h1, h2, h3, h4 in itertools.product(range(2), repeat=4):
        lepton_in = (bar(v_spinor(p2, 0, h2)), u_spinor(p1, 0, h1))
        fermion_out = (bar(u_spinor(p3, 0, h3)), v_spinor(p4, 0, h4))
        amplitude = sum(prop * contract(current(*lepton_in, ce), current(*fermion_out, cf))
                        for ce, cf, prop in electroweak_exchanges(mdot(p1 + p2, p1 + p2), f, params))
        total += abs(e2 * amplitude) ** 2
    return total * f.colours / 4


def reference_ee_qqg(p, f, params):
    p1, p2, p3, p4, p5 = p
    e2, gs = 4 * math.pi * params.alpha, math.sqrt(4 * math.pi * params.alpha_s)
    s35, s45 = mdot(p3 + p5, p3 + p5), mdot(p4 + p5, p4 + p5)
    total = 0.0
    for h1, h2, h3, h4 in itertools.product(range(2), repeat=4):
        lepton = (bar(v_spinor(p2, 0, h2)), u_spinor(p1, 0, h1))
        ubar3, v4 = bar(u_spinor(p3, 0, h3)), v_spinor(p4, 0, h4)
        for eps in polarisations(p5):
            amplitude = 0.0
            for ce, (cl, cr), prop in electroweak_exchanges(mdot(p1 + p2, p1 + p2), f, params):
                leptonic = current(*lepton, ce)
                vertex = cl * P_LEFT + cr * P_RIGHT
                for mu in range(4):
                    gamma_mu = GAMMA[mu] @ vertex
                    line = (slash(eps) @ slash(p3 + p5) @ gamma_mu / s35
                            - gamma_mu @ slash(p4 + p5) @ slash(eps) / s45)
                    amplitude += prop * METRIC[mu] * leptonic[mu] * (ubar3 @ line @ v4)
            total += abs(e2 * gs * amplitude) ** 2
    return total * f.colours * (4.0 / 3.0) / 4  # sum_a |T^a_ij|^2 = N_c C_F


def reference_qq_tt(p, mt, alpha_s):
    p1, p2, p3, p4 = p
    gs2 = 4 * math.pi * alpha_s
    total = 0.0
    for h1, h2, h3, h4 in itertools.product(range(2), repeat=4):
        quarks = current(bar(v_spinor(p2, 0, h2)), u_spinor(p1, 0, h1), (1, 1))
        tops = current(bar(u_spinor(p3, mt, h3)), v_spinor(p4, mt, h4), (1, 1))
        total += abs(gs2 * contract(quarks, tops) / mdot(p1 + p2, p1 + p2)) ** 2
    return total * 2 / 36  # colour: Tr(T^a T^b) Tr(T^a T^b) = 2; average 1/(4 * 9)


def gg_tt_colour_ordered(p, mt, eps1, eps2, h3, h4):
    """(A1, A2) multiplying T^a T^b and T^b T^a (gluon a = particle 1, b = particle 2)."""
    p1, p2, p3, p4 = p
    ubar3, v4 = bar(u_spinor(p3, mt, h3)), v_spinor(p4, mt, h4)
    mass = mt * np.eye(4)
    t_channel = ubar3 @ slash(eps1) @ (slash(p3 - p1) + mass) @ slash(eps2) @ v4 / (mdot(p3 - p1, p3 - p1) - mt**2)
    u_channel = ubar3 @ slash(eps2) @ (slash(p3 - p2) + mass) @ slash(eps1) @ v4 / (mdot(p3 - p2, p3 - p2) - mt**2)
    vertex = mdot(eps1, eps2) * (p1 - p2) + 2 * mdot(p2, eps1) * eps2 - 2 * mdot(p1, eps2) * eps1
    s_channel = ubar3 @ slash(vertex) @ v4 / mdot(p1 + p2, p1 + p2)
    return t_channel + s_channel, u_channel - s_channel


def reference_gg_tt(p, mt, alpha_s):
    gs2 = 4 * math.pi * alpha_s
    total = 0.0
    for h3, h4 in itertools.product(range(2), repeat=2):
        for eps1 in polarisations(p[0]):
            for eps2 in polarisations(p[1]):
                a1, a2 = gg_tt_colour_ordered(p, mt, eps1, eps2, h3, h4)
                # Tr(T^a T^b T^b T^a) = 16/3, Tr(T^a T^b T^a T^b) = -2/3
                total += gs2**2 * (16 / 3 * (abs(a1) ** 2 + abs(a2) ** 2) - 4 / 3 * (a1 * np.conj(a2)).real)
    return total / 256


# ----------------------------------------------------------------- phase-space points for the comparison
T64 = kernel_types("cpu", "float64")
PARAMS = SMParameters()


def _numpy_momenta(vectors):
    return np.stack([np.stack([np.asarray(c.numpy(), float) for c in v.columns()], axis=1) for v in vectors], axis=1)


def _points(sqrt_s, masses, n, seed):
    rng = np.random.default_rng(seed)
    sqrt_s = T64.Float(np.full(n, sqrt_s))
    beams = incoming_momenta(sqrt_s)
    if len(masses) == 2:
        out_a, out_b, _ = two_body(sqrt_s, masses[0], masses[1], T64.Float(rng.uniform(-1, 1, n)),
                                   T64.Float(rng.uniform(0, 2 * math.pi, n)))
        outgoing = [out_a, out_b]
    else:
        outgoing, _ = rambo(sqrt_s, masses, [T64.Float(rng.uniform(0.05, 1, n)) for _ in range(4 * len(masses))])
    vectors = list(beams) + outgoing
    return vectors, _numpy_momenta(vectors)


def _kernel(process, vectors, flavour=None, params=PARAMS):
    return np.asarray(get_process(process).squared(vectors, params, flavour).numpy(), float)


@pytest.mark.parametrize("sqrt_s", [10.0, 91.2, 200.0])
@pytest.mark.parametrize("flavour", ["mu", "u", "d"])
def test_ee_to_ffbar_matches_diagrams(sqrt_s, flavour):
    vectors, momenta = _points(sqrt_s, [0.0, 0.0], 4, seed=1)
    process = "ee_mumu" if flavour == "mu" else "ee_qq"
    kernel = _kernel(process, vectors, flavour)
    reference = [reference_ee_ffbar(p, FERMIONS[flavour], PARAMS) for p in momenta]
    np.testing.assert_allclose(kernel, reference, rtol=1e-10)


@pytest.mark.parametrize("flavour", ["u", "b"])
def test_ee_to_qqbarg_matches_diagrams(flavour):
    vectors, momenta = _points(91.2, [0.0, 0.0, 0.0], 4, seed=2)
    kernel = _kernel("ee_qqg", vectors, flavour)
    reference = [reference_ee_qqg(p, FERMIONS[flavour], PARAMS) for p in momenta]
    np.testing.assert_allclose(kernel, reference, rtol=1e-9)


def test_ee_to_qqbarg_all_flavours_is_the_sum():
    vectors, _ = _points(91.2, [0.0, 0.0, 0.0], 3, seed=3)
    total = sum(_kernel("ee_qqg", vectors, q) for q in "dusc") + _kernel("ee_qqg", vectors, "b")
    np.testing.assert_allclose(_kernel("ee_qqg", vectors, "all"), total, rtol=1e-12)


@pytest.mark.parametrize("sqrt_s", [400.0, 1000.0])
@pytest.mark.parametrize("process, reference_me, seed", [("qq_tt", reference_qq_tt, 4), ("gg_tt", reference_gg_tt, 5)])
def test_ttbar_matches_diagrams(process, reference_me, seed, sqrt_s):
    mt = PARAMS.top_mass
    vectors, momenta = _points(sqrt_s, [mt, mt], 4, seed=seed)
    reference = [reference_me(p, mt, PARAMS.alpha_s) for p in momenta]
    np.testing.assert_allclose(_kernel(process, vectors), reference, rtol=1e-10)


def test_reference_gg_tt_is_gauge_invariant():
    """The reference itself: each colour-ordered amplitude vanishes for eps_1 -> p_1 (Ward identity)."""
    mt = PARAMS.top_mass
    _, momenta = _points(500.0, [mt, mt], 2, seed=6)
    for p in momenta:
        for eps2 in polarisations(p[1]):
            scale = max(abs(x) for x in gg_tt_colour_ordered(p, mt, polarisations(p[0])[0], eps2, 0, 1))
            for h3, h4 in itertools.product(range(2), repeat=2):
                a1, a2 = gg_tt_colour_ordered(p, mt, p[0] / p[0][0], eps2, h3, h4)
                assert abs(a1) < 1e-12 * scale and abs(a2) < 1e-12 * scale
