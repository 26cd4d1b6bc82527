"""Torch-eager reference of the LO matrix elements (test reference and benchmark baseline).

Deliberately straightforward: one torch expression per formula, autograd for
gradients. The e+e- matrix elements use the textbook vector/axial form with
chi(s) = s / (s - mZ^2 + i mZ GammaZ) / (4 sin^2 cos^2) (e.g. PDG review
"Electroweak model", LEP line-shape papers) rather than the chiral amplitudes
of the kernels, so agreement also checks the algebra; t tbar uses ESW eq. (10.12).

Momenta: (N, n, 4) tensors (E, px, py, pz), incoming first; parameters: 0-d tensors.
"""
from __future__ import annotations

import math

GEV2_TO_PB = 0.3893793721e9
CHARGE = {"e": -1.0, "mu": -1.0, "d": -1 / 3, "u": 2 / 3, "s": -1 / 3, "c": 2 / 3, "b": -1 / 3}
ISOSPIN = {"e": -0.5, "mu": -0.5, "d": -0.5, "u": 0.5, "s": -0.5, "c": 0.5, "b": -0.5}
COLOURS = {"mu": 1}


def dot(p, q):
    return p[..., 0] * q[..., 0] - (p[..., 1:] * q[..., 1:]).sum(-1)


def _flavours(flavour):
    return ["d", "u", "s", "c", "b"] if flavour == "all" else [flavour]


def _vector_axial_factors(s, params, f):
    """(symmetric, antisymmetric) combinations |A_LL|^2 + ... as functions of v, a and chi.

    symmetric = S_same + S_opp = 4 e^4 / s^2 [Q_e^2 Q_f^2 + 2 Q_e Q_f v_e v_f Re chi
                                            + (v_e^2 + a_e^2)(v_f^2 + a_f^2) |chi|^2]
    antisym.  = S_same - S_opp = 4 e^4 / s^2 [2 Q_e Q_f a_e a_f Re chi + 4 v_e a_e v_f a_f |chi|^2]
    with v = T3 - 2 Q sin^2, a = T3.
    """
    mz, gamma_z, alpha, sw2 = params["mz"], params["gamma_z"], params["alpha"], params["sin2_theta_w"]
    kappa = 1.0 / (4.0 * sw2 * (1.0 - sw2))
    denominator = (s - mz**2) ** 2 + (mz * gamma_z) ** 2
    re_chi = kappa * s * (s - mz**2) / denominator
    abs_chi2 = kappa**2 * s**2 / denominator
    qe, qf = CHARGE["e"], CHARGE[f]
    ve, ae = ISOSPIN["e"] - 2 * qe * sw2, ISOSPIN["e"]
    vf, af = ISOSPIN[f] - 2 * qf * sw2, ISOSPIN[f]
    e4 = (4 * math.pi * alpha) ** 2
    symmetric = 4 * e4 / s**2 * (qe**2 * qf**2 + 2 * qe * qf * ve * vf * re_chi
                                 + (ve**2 + ae**2) * (vf**2 + af**2) * abs_chi2)
    antisymmetric = 4 * e4 / s**2 * (2 * qe * qf * ae * af * re_chi + 4 * ve * ae * vf * af * abs_chi2)
    return symmetric, antisymmetric


def ee_to_ffbar(p, params, flavour="mu"):
    p1, p2, p3, p4 = p.unbind(1)
    s, t, u = 2 * dot(p1, p2), -2 * dot(p1, p3), -2 * dot(p1, p4)
    total = 0.0
    for f in _flavours(flavour):
        symmetric, antisymmetric = _vector_axial_factors(s, params, f)
        total = total + COLOURS.get(f, 3) * 0.5 * (symmetric * (u**2 + t**2) + antisymmetric * (u**2 - t**2))
    return total


def ee_to_qqbarg(p, params, flavour="all"):
    p1, p2, p3, p4, p5 = p.unbind(1)
    s12 = 2 * dot(p1, p2)
    same = (2 * dot(p1, p4)) ** 2 + (2 * dot(p2, p3)) ** 2
    opposite = (2 * dot(p1, p3)) ** 2 + (2 * dot(p2, p4)) ** 2
    eikonal = 2 * 4 * math.pi * params["alpha_s"] * (4 / 3) * s12 / (2 * dot(p3, p5) * 2 * dot(p4, p5))
    total = 0.0
    for f in _flavours(flavour):
        symmetric, antisymmetric = _vector_axial_factors(s12, params, f)
        total = total + 3 * 0.5 * (symmetric * (same + opposite) + antisymmetric * (same - opposite))
    return eikonal * total


def _taus(p, params):
    p1, p2, p3, _ = p.unbind(1)
    s = 2 * dot(p1, p2)
    return 2 * dot(p1, p3) / s, 2 * dot(p2, p3) / s, 4 * params["top_mass"] ** 2 / s


def qqbar_to_ttbar(p, params, flavour="u"):
    tau1, tau2, rho = _taus(p, params)
    g4 = (4 * math.pi * params["alpha_s"]) ** 2
    return g4 * 4 / 9 * (tau1**2 + tau2**2 + rho / 2)


def gg_to_ttbar(p, params, flavour=None):
    tau1, tau2, rho = _taus(p, params)
    g4 = (4 * math.pi * params["alpha_s"]) ** 2
    return g4 * (1 / (6 * tau1 * tau2) - 3 / 8) * (tau1**2 + tau2**2 + rho - rho**2 / (4 * tau1 * tau2))


FUNCTIONS = {"ee_mumu": ee_to_ffbar, "ee_qq": ee_to_ffbar, "ee_qqg": ee_to_qqbarg, "qq_tt": qqbar_to_ttbar,
             "gg_tt": gg_to_ttbar}
DEFAULT_FLAVOUR = {"ee_mumu": "mu", "ee_qq": "all", "ee_qqg": "all", "qq_tt": "u", "gg_tt": None}


def squared_matrix_element(process, momenta, params, flavour=None):
    """<|M|^2> of ``process`` for momenta (N, n, 4); params: dict of 0-d tensors
    (mz, gamma_z, alpha, sin2_theta_w, alpha_s, top_mass)."""
    flavour = DEFAULT_FLAVOUR[process] if flavour is None else flavour
    return FUNCTIONS[process](momenta, params, flavour)


def dsigma(process, momenta, params, flavour=None):
    """d sigma / d Phi_n [pb]."""
    s = 2 * dot(momenta[:, 0], momenta[:, 1])
    return GEV2_TO_PB * squared_matrix_element(process, momenta, params, flavour) / (2 * s)
