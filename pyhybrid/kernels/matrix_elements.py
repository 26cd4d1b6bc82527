"""Leading-order squared matrix elements (Dr.Jit, no torch).

All functions return |M|^2 summed over final-state spins and colours and
averaged over initial ones (dimensionless for 2 -> 2, GeV^-2 for 2 -> 3), one
lane per event, as differentiable Dr.Jit expressions of the momenta and of the
:class:`~pyhybrid.kernels.electroweak.SMParameters` (mZ, GammaZ, alpha,
sin^2 thetaW, alpha_s, m_top).

Momenta are :class:`~pyhybrid.kernels.lorentz.FourVector` objects [GeV] in the
order of :attr:`Process.particles`: the two incoming particles first
(particle 1 is the e-, quark or first gluon), then the outgoing ones.
Incoming particles are massless; invariants are s_ij = 2 p_i.p_j.

Processes (see :data:`PROCESSES`)
---------------------------------
``ee_mumu``  e- e+ -> mu- mu+          gamma/Z, full interference, massless muons
``ee_qq``    e- e+ -> q qbar           one of d u s c b, or ``all`` (sum of the five); N_c = 3
``ee_qqg``   e- e+ -> q qbar g         gamma/Z at O(alpha_s), massless quarks
``qq_tt``    q qbar -> t tbar          s-channel gluon (Combridge 1979; ESW eq. 10.12)
``gg_tt``    g g -> t tbar             s, t, u channels (Combridge 1979; ESW eq. 10.12)

e+e- -> f fbar is written with chiral amplitudes (i, j = L, R for e-, f):
A_ij(s) = e^2 [Q_e Q_f / s + g_i^e g_j^f / (s - mZ^2 + i mZ GammaZ)],
<|M|^2> = N_c [(|A_LL|^2 + |A_RR|^2) u^2 + (|A_LR|^2 + |A_RL|^2) t^2].
The gluon-emission matrix element keeps the same chiral structure:
<|M|^2> = 2 g_s^2 C_F N_c s [(|A_LL|^2 + |A_RR|^2)(s14^2 + s23^2)
                           + (|A_LR|^2 + |A_RL|^2)(s13^2 + s24^2)] / (s35 s45),
with 1 = e-, 2 = e+, 3 = q, 4 = qbar, 5 = g. It reduces to the textbook
(x1^2 + x2^2) / ((1 - x1)(1 - x2)) after integration over the event orientation
and factorises into eikonal factor x e+e- -> q qbar in the soft limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pyhybrid.kernels.electroweak import FERMIONS, QUARKS, Fermion, SMParameters, fermion, z_couplings
from pyhybrid.kernels.lorentz import FourVector

__all__ = ["GEV2_TO_PB", "CF", "NC", "Process", "PROCESSES", "get_process", "squared_matrix_element",
           "ee_to_ffbar", "ee_to_qqbarg", "qqbar_to_ttbar", "gg_to_ttbar", "gg_to_ttbar_colour_weights",
           "ChiralCoefficients", "chiral_coefficients", "chiral_sums_at", "chiral_sums", "summed_chiral_sums"]

#: 1 GeV^-2 in picobarn (hbar c)^2.
GEV2_TO_PB = 0.3893793721e9
NC = 3.0
CF = 4.0 / 3.0
_ELECTRON = FERMIONS["e"]


@dataclass(frozen=True)
class ChiralCoefficients:
    """Parameter-only factors of the e+e- -> f fbar chiral sums (see :func:`summed_chiral_sums`).

    ``photon`` = e^4 sum_f 2 w_f (Q_e Q_f)^2; ``interference[i]``, ``z[i]``: e^4 times the photon-Z
    interference and |Z|^2 coupling sums for i = 0 (LL + RR) and 1 (LR + RL); ``mz2`` = mZ^2
    [GeV^2]; ``mz_gamma2`` = (mZ GammaZ)^2 [GeV^4]. Floats, Dr.Jit arrays or
    :class:`~pyhybrid.kernels.dual.Dual` numbers (forward-mode parameter derivatives).
    """

    photon: Any
    interference: tuple
    z: tuple
    mz2: Any
    mz_gamma2: Any


def chiral_coefficients(params: SMParameters, weighted_fermions) -> ChiralCoefficients:
    """The :class:`ChiralCoefficients` of the sum over (fermion f, weight w_f)."""
    gl_e, gr_e = z_couplings(_ELECTRON, params.sin2_theta_w)
    photon2, same, opposite = 0.0, [0.0, 0.0], [0.0, 0.0]
    for f, weight in weighted_fermions:
        gl_f, gr_f = z_couplings(f, params.sin2_theta_w)
        charge = _ELECTRON.charge * f.charge
        photon2 = photon2 + 2.0 * weight * charge * charge
        for sums, (c1, c2) in ((same, (gl_e * gl_f, gr_e * gr_f)), (opposite, (gl_e * gr_f, gr_e * gl_f))):
            sums[0] = sums[0] + (2.0 * weight * charge) * (c1 + c2)  # photon-Z interference
            sums[1] = sums[1] + weight * (c1 * c1 + c2 * c2)  # |Z|^2
    e2 = 4.0 * math.pi * params.alpha
    e4 = e2 * e2
    mz_gamma = params.mz * params.gamma_z
    return ChiralCoefficients(photon=e4 * photon2, interference=(e4 * same[0], e4 * opposite[0]),
                              z=(e4 * same[1], e4 * opposite[1]), mz2=params.mz * params.mz,
                              mz_gamma2=mz_gamma * mz_gamma)


def chiral_sums_at(s, c: ChiralCoefficients):
    """(sum_f w_f (|A_LL|^2 + |A_RR|^2), sum_f w_f (|A_LR|^2 + |A_RL|^2)) [GeV^-4] at invariant mass^2
    ``s`` [GeV^2]. Written with the coefficients on the left of each operation, so that it runs on
    Duals of them as well."""
    inverse_s = 1.0 / s
    off_peak = -c.mz2 + s
    abs_p2 = 1.0 / (off_peak * off_peak + c.mz_gamma2)
    re_p_over_s = off_peak * abs_p2 * inverse_s
    photon_term = c.photon * (inverse_s * inverse_s)
    return tuple(photon_term + c.interference[i] * re_p_over_s + c.z[i] * abs_p2 for i in range(2))


def chiral_sums(s, params: SMParameters, f: Fermion):
    """(|A_LL|^2 + |A_RR|^2, |A_LR|^2 + |A_RL|^2) of e- e+ -> f fbar at invariant mass^2 ``s`` [GeV^-4]."""
    return summed_chiral_sums(s, params, [(f, 1.0)])


def summed_chiral_sums(s, params: SMParameters, weighted_fermions):
    """Sum over (fermion f, weight w_f) of w_f (|A_LL|^2 + |A_RR|^2, |A_LR|^2 + |A_RL|^2) [GeV^-4].

    Expanded in the event's invariants, with P = 1 / (s - mZ^2 + i mZ GammaZ):
    |A_ij|^2 = e^4 [(Q_e Q_f / s)^2 + 2 (Q_e Q_f / s) g_i^e g_j^f Re P + (g_i^e g_j^f)^2 |P|^2],
    so the sum over flavours and chiralities collapses into coefficients that depend on
    the parameters only (:func:`chiral_coefficients`), and the work per event does not grow
    with the number of flavours.
    """
    return chiral_sums_at(s, chiral_coefficients(params, weighted_fermions))


def _flavours(flavour: str) -> list[tuple[Fermion, float]]:
    """(fermion, N_c x multiplicity) pairs; 'all' groups the massless quarks with equal couplings (d s b, u c)."""
    if flavour != "all":
        f = fermion(flavour)
        return [(f, float(f.colours))]
    groups: dict[tuple[float, float], list] = {}
    for q in QUARKS:
        f = fermion(q)
        groups.setdefault((f.charge, f.isospin), [f, 0.0])[1] += f.colours
    return [(f, weight) for f, weight in groups.values()]


# Each process is a parameter-only part (coefficients: a few numbers, or Duals of them) and a
# per-event part written with the coefficients on the left of each operation (see dual.py).


def _ee_coefficients(params: SMParameters, flavour: str) -> ChiralCoefficients:
    return chiral_coefficients(params, _flavours(flavour))


def _ee_qqg_coefficients(params: SMParameters, flavour: str):
    """(chiral coefficients, 2 g_s^2 C_F)."""
    return _ee_coefficients(params, flavour), params.alpha_s * (8.0 * math.pi * CF)


def _top_coefficients(params: SMParameters, flavour=None):
    """(g_s^4, 4 m_t^2 [GeV^2]); the same for every flavour (``flavour``: the Process.coefficients signature)."""
    gs2 = params.alpha_s * (4.0 * math.pi)
    return gs2 * gs2, params.top_mass * params.top_mass * 4.0


def _ee_to_ffbar_events(p: Sequence[FourVector], c: ChiralCoefficients):
    s = 2.0 * p[0].dot(p[1])
    t = -2.0 * p[0].dot(p[2])
    u = -2.0 * p[0].dot(p[3])
    same, opposite = chiral_sums_at(s, c)
    return same * (u * u) + opposite * (t * t)


def _ee_to_qqbarg_events(p: Sequence[FourVector], coefficients):
    chiral, emission = coefficients
    s12 = 2.0 * p[0].dot(p[1])
    s13, s14 = 2.0 * p[0].dot(p[2]), 2.0 * p[0].dot(p[3])
    s23, s24 = 2.0 * p[1].dot(p[2]), 2.0 * p[1].dot(p[3])
    s35, s45 = 2.0 * p[2].dot(p[4]), 2.0 * p[3].dot(p[4])
    same, opposite = chiral_sums_at(s12, chiral)
    return emission * (s12 / (s35 * s45)) * (same * (s14 * s14 + s23 * s23) + opposite * (s13 * s13 + s24 * s24))


def _top_invariants(p: Sequence[FourVector]):
    """s, tau1 = 2 p1.p3 / s, tau2 = 2 p2.p3 / s (ESW notation; rho = 4 m_t^2 / s)."""
    s = 2.0 * p[0].dot(p[1])
    inverse_s = 1.0 / s
    return inverse_s, 2.0 * p[0].dot(p[2]) * inverse_s, 2.0 * p[1].dot(p[2]) * inverse_s


def _qqbar_to_ttbar_events(p: Sequence[FourVector], coefficients):
    gs4, four_mt2 = coefficients
    inverse_s, tau1, tau2 = _top_invariants(p)
    rho = four_mt2 * inverse_s
    return gs4 * (4.0 / 9.0) * (rho * 0.5 + (tau1 * tau1 + tau2 * tau2))


def _gg_to_ttbar_events(p: Sequence[FourVector], coefficients):
    gs4, four_mt2 = coefficients
    inverse_s, tau1, tau2 = _top_invariants(p)
    rho = four_mt2 * inverse_s
    product = tau1 * tau2
    return gs4 * (1.0 / (6.0 * product) - 0.375) * (rho - rho * rho * (0.25 / product) + (tau1 * tau1 + tau2 * tau2))


def ee_to_ffbar(p: Sequence[FourVector], params: SMParameters, flavour: str = "mu"):
    """<|M|^2> of e-(p1) e+(p2) -> f(p3) fbar(p4), gamma + Z; ``flavour`` 'mu', a quark or 'all' quarks."""
    return _ee_to_ffbar_events(p, _ee_coefficients(params, flavour))


def ee_to_qqbarg(p: Sequence[FourVector], params: SMParameters, flavour: str = "all"):
    """<|M|^2> [GeV^-2] of e-(p1) e+(p2) -> q(p3) qbar(p4) g(p5) at O(alpha_s), gamma + Z."""
    return _ee_to_qqbarg_events(p, _ee_qqg_coefficients(params, flavour))


def qqbar_to_ttbar(p: Sequence[FourVector], params: SMParameters, flavour: str = "u"):
    """<|M|^2> of q(p1) qbar(p2) -> t(p3) tbar(p4): g^4 (4/9)(tau1^2 + tau2^2 + rho/2)."""
    return _qqbar_to_ttbar_events(p, _top_coefficients(params))


def gg_to_ttbar(p: Sequence[FourVector], params: SMParameters, flavour: str | None = None):
    """<|M|^2> of g(p1) g(p2) -> t(p3) tbar(p4):
    g^4 (1/(6 tau1 tau2) - 3/8)(tau1^2 + tau2^2 + rho - rho^2/(4 tau1 tau2))."""
    return _gg_to_ttbar_events(p, _top_coefficients(params))


def gg_to_ttbar_colour_weights(p: Sequence[FourVector]):
    """Leading-colour weights (w13, w23) of the two colour flows of g g -> t tbar.

    w13 ~ tau2 / tau1: the top is colour-connected to gluon 1 (dominant when the
    top is collinear to gluon 1); w23 ~ tau1 / tau2: connected to gluon 2.
    Returned normalised, w13 + w23 = 1 (for LHE colour tags).
    """
    _, tau1, tau2 = _top_invariants(p)
    w13 = tau2 * tau2
    w23 = tau1 * tau1
    norm = 1.0 / (w13 + w23)
    return w13 * norm, w23 * norm


@dataclass(frozen=True)
class Process:
    """A 2 -> n process: names, flavours, particle content and its |M|^2 as a parameter-only part
    (``coefficients(params, flavour)``) and a per-event part (``events(momenta, coefficients)``)."""

    name: str
    description: str
    n_out: int
    flavours: tuple[str, ...]
    default_flavour: str | None
    massive_top: bool
    coefficients: Callable
    events: Callable

    @property
    def n_particles(self) -> int:
        return 2 + self.n_out

    def check_flavour(self, flavour: str | None) -> str | None:
        """Return the flavour to use (default when None); unknown flavours raise ValueError."""
        if flavour is None:
            return self.default_flavour
        if not self.flavours:
            raise ValueError(f"process {self.name!r} takes no flavour, got {flavour!r}")
        if flavour not in self.flavours:
            raise ValueError(f"unknown flavour {flavour!r} for process {self.name!r}; "
                             f"choose one of {', '.join(self.flavours)}")
        return flavour

    def pdg_ids(self, flavour: str | None) -> tuple[int, ...]:
        """PDG ids of all particles (incoming first); for flavour 'all' the quark entries are 0."""
        flavour = self.check_flavour(flavour)
        q = 0 if flavour == "all" else FERMIONS[flavour].pdg if flavour else 0
        return {
            "ee_mumu": (11, -11, 13, -13),
            "ee_qq": (11, -11, q, -q),
            "ee_qqg": (11, -11, q, -q, 21),
            "qq_tt": (q, -q, 6, -6),
            "gg_tt": (21, 21, 6, -6),
        }[self.name]

    def outgoing_masses(self, params: SMParameters) -> list:
        """Masses [GeV] of the outgoing particles (floats or Dr.Jit arrays)."""
        return [params.top_mass] * 2 if self.massive_top else [0.0] * self.n_out

    def squared(self, momenta: Sequence[FourVector], params: SMParameters, flavour: str | None = None):
        """<|M|^2> for ``momenta`` (incoming first) [dimensionless for 2->2, GeV^-2 for 2->3]."""
        if len(momenta) != self.n_particles:
            raise ValueError(f"process {self.name!r} needs {self.n_particles} momenta, got {len(momenta)}")
        return self.events(momenta, self.coefficients_of(params, flavour))

    def coefficients_of(self, params: SMParameters, flavour: str | None = None):
        """The parameter-only coefficients of ``params`` (floats, Dr.Jit arrays or Duals) for ``flavour``
        (the default one when None; unknown flavours raise ValueError)."""
        return self.coefficients(params, self.check_flavour(flavour))


_QUARK_CHOICES = QUARKS + ("all",)
PROCESSES = {
    p.name: p
    for p in (
        Process("ee_mumu", "e- e+ -> mu- mu+ (gamma/Z)", 2, ("mu",), "mu", False, _ee_coefficients,
                _ee_to_ffbar_events),
        Process("ee_qq", "e- e+ -> q qbar (gamma/Z)", 2, _QUARK_CHOICES, "all", False, _ee_coefficients,
                _ee_to_ffbar_events),
        Process("ee_qqg", "e- e+ -> q qbar g (gamma/Z, O(alpha_s))", 3, _QUARK_CHOICES, "all", False,
                _ee_qqg_coefficients, _ee_to_qqbarg_events),
        Process("qq_tt", "q qbar -> t tbar (QCD)", 2, QUARKS, "u", True, _top_coefficients, _qqbar_to_ttbar_events),
        Process("gg_tt", "g g -> t tbar (QCD)", 2, (), None, True, _top_coefficients, _gg_to_ttbar_events),
    )
}


def get_process(name: str) -> Process:
    """Process by name; unknown names raise a ValueError listing the known ones."""
    try:
        return PROCESSES[name]
    except KeyError:
        raise ValueError(f"unknown process {name!r}; known: {', '.join(PROCESSES)}") from None


def squared_matrix_element(process: str, momenta: Sequence[FourVector], params: SMParameters,
                           flavour: str | None = None):
    """<|M|^2> of process ``process`` (see :data:`PROCESSES`)."""
    return get_process(process).squared(momenta, params, flavour)
