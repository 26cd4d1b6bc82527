"""Final-state dipole parton shower for e+e- -> q qbar (Dr.Jit, no torch).

Physics (the algorithm of S. Hoeche, "Introduction to parton-shower event
generators", arXiv:1411.4085, with Catani-Seymour final-state dipoles):

* Hard process: e+e- -> gamma/Z -> q qbar at ``sqrt_s`` with the five light
  flavours chosen by their LO weights and the angular distribution
  A_f (1 + cos)^2 + B_f (1 - cos)^2, both from the chiral amplitudes of
  :func:`pyhybrid.kernels.matrix_elements.chiral_sums`. Massless quarks.
* Evolution variable t = kT^2 = y z (1 - z) m_ij,k^2 [GeV^2], starting at t = s
  and ending at the cutoff ``t0``; every colour-connected (emitter, spectator)
  pair is a dipole end.
* Splitting functions (per dipole end, leading colour):
  q -> q g:     CF [2 / (1 - z (1 - y)) - (1 + z)]
  g -> g g:     CA / 2 [2 / (1 - z (1 - y)) - 2 + z (1 - z)]
  g -> q qbar:  TR / 2 [1 - 2 z (1 - z)]  per flavour, flavours with m_q^2 < t only
  (md = mu = ms = 0, mc = 1.3, mb = 4.75 GeV), with the coupling
  alpha_s(t) / (2 pi) at two loops (:mod:`pyhybrid.kernels.alphas`) and the
  phase-space factor (1 - y).
* Sudakov veto algorithm: trial emissions from the overestimate
  alpha_max / (2 pi) * {2 CF, CA} / (1 - z) (+ 5 TR / 2 for g -> q qbar) dt / t
  over z in [1 - z+, z+], z+ = (1 + sqrt(1 - 4 t0 / m^2)) / 2, alpha_max = alpha_s(t0);
  a trial is accepted with probability p = f / g (the ratio of true to
  overestimated rate). Competition between dipole ends: one trial from the sum
  of all overestimates, the end chosen with probability g_end / g_total.
* Catani-Seymour final-state kinematics (exact momentum conservation):
  p_i = z p_ij + (1 - z) y p_k + kT, p_j = (1 - z) p_ij + z y p_k - kT,
  p_k -> (1 - y) p_k, kT^2 = -t, azimuth uniform.
* Colour flow: leading-colour tags (col, acol) as in LHE files (first tag 501)
  and, for speed, the slot index of each particle's colour partner on its colour
  and anticolour side.

Vectorisation: one Dr.Jit lane per event; a particle record of ``max_particles``
slots per event stored event-major (index = event * max_particles + slot): each
lane's particles share a few cache lines, which on the CPU beats the slot-major
layout (lanes there touch far-apart slots of a ~0.5 GB record) by ~3x. The only
loop is the Sudakov loop (one trial per iteration) with an inner scan that
selects the dipole end.
Overestimated rates are cached per dipole end and updated locally after each
emission.

Gradient support (see :mod:`pyhybrid.estimators`), computed in the same kernel:

* ``score_alpha``: d log P(trials) / d alpha_s(mZ) summed over accepted trials
  (d ln alpha_s(t)) and vetoed trials (-p d ln alpha_s / (1 - p)); the
  overestimate is held fixed, so this is the exact likelihood-ratio score.
* Stochastic AD (Arya et al. 2022): each trial's Bernoulli decision has the
  alternative "flip" with weight |dp| / (1 - p) (veto -> accept) or |dp| / p;
  one alternative per event is kept by weighted reservoir sampling
  (``sad_trial``, total weight ``sad_weight``) and replayed with ``flip_trial``.
* ``tangents=True``: forward-mode tangents d p / d alpha_s(mZ) of all momenta
  for the pathwise estimator at fixed coupling-weighted evolution time
  tau = int_t^s alpha_s dt'/t' (emission scales move), and ``score_fixed_tau``, the
  likelihood ratio of the acceptance decisions that this motion changes.
* ``cutoff_width > 0``: the relaxed model, the cutoff theta(t - t0) replaced by
  a sigmoid in ln t of that width, with the score ``score_t0`` of its factors.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import drjit as dr

from pyhybrid.kernels import dual
from pyhybrid.kernels.alphas import CA, CF, MB, MC, TR, RunningCoupling
from pyhybrid.kernels.backend import KernelTypes, check_integer
from pyhybrid.kernels.electroweak import QUARKS, SMParameters, fermion
from pyhybrid.kernels.lorentz import FourVector
from pyhybrid.kernels.matrix_elements import chiral_sums
from pyhybrid.kernels.observables import private_buffer

__all__ = ["GLUON", "NO_PARTNER", "FIRST_COLOUR", "SQRT_S_RANGE", "ALPHA_S_RANGE",
           "CUTOFF_SPAN", "ShowerSettings", "ParticleRecord", "MomentumTangents", "ShowerResult",
           "BoundaryEmission", "run_shower", "boundary_emission", "hard_process_fractions",
           "cs_kinematics"]

GLUON = 21
NO_PARTNER = 0xFFFFFFFF
FIRST_COLOUR = 501
N_FLAVOURS = 5
#: Allowed centre-of-mass energies [GeV]: five massless flavours, below t tbar threshold.
SQRT_S_RANGE = (10.0, 340.0)
#: Allowed alpha_s(mZ): above 0.1447 the two-loop coupling exceeds 1 at the charm threshold (its
#: Landau pole lies above mc), where the three-flavour running starts.
ALPHA_S_RANGE = (0.05, 0.14)
#: The relaxed (sigmoid) cutoff is truncated CUTOFF_SPAN widths below t0 (sigmoid(-8) = 3e-4).
CUTOFF_SPAN = 8.0


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class ShowerSettings:
    """Shower parameters (validated floats).

    alpha_s_mz: alpha_s(mZ); t0: cutoff in kT^2 [GeV^2]; sqrt_s [GeV];
    max_particles: slots per event (final partons, quarks included);
    cutoff_width: 0 for the hard cutoff, else the sigmoid width in ln t (relaxed model).
    """

    alpha_s_mz: float = 0.118
    t0: float = 1.0
    sqrt_s: float = 91.2
    max_particles: int = 64
    cutoff_width: float = 0.0

    def __post_init__(self):
        for name in ("alpha_s_mz", "t0", "sqrt_s", "cutoff_width"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                shown = "alpha_s" if name == "alpha_s_mz" else name  # the name users pass (alpha_s(mZ))
                raise ValueError(f"{shown} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        low, high = ALPHA_S_RANGE
        if not low <= self.alpha_s_mz <= high:
            raise ValueError(f"alpha_s must lie in [{low}, {high}] (alpha_s(mZ)), got {self.alpha_s_mz}")
        low, high = SQRT_S_RANGE
        if not low <= self.sqrt_s <= high:
            raise ValueError(f"sqrt_s must lie in [{low}, {high}] GeV (five massless flavours, below the "
                             f"t tbar threshold), got {self.sqrt_s}")
        object.__setattr__(self, "max_particles", check_integer(self.max_particles, "max_particles", 4, 1024))
        if self.cutoff_width < 0.0 or self.cutoff_width > 1.0:
            raise ValueError(f"cutoff_width must lie in [0, 1] (ln t units), got {self.cutoff_width}")
        s = self.sqrt_s**2
        lowest = self.coupling.lowest_valid_scale()
        if not self.t0 * math.exp(-CUTOFF_SPAN * self.cutoff_width) > lowest:
            what = "t0" if self.cutoff_width == 0 else f"t0 exp(-{CUTOFF_SPAN:g} cutoff_width)"
            raise ValueError(f"{what} must exceed {lowest:.3g} GeV^2, where alpha_s reaches 1 for alpha_s(mZ) = "
                             f"{self.alpha_s_mz} (perturbative shower), got t0 = {self.t0}")
        if not self.t0 < s / 4.0:
            raise ValueError(f"t0 must be below s / 4 = {s / 4.0:.6g} GeV^2 (no emission is possible "
                             f"otherwise), got {self.t0}")

    @property
    def s(self) -> float:
        return self.sqrt_s**2

    @property
    def t_low(self) -> float:
        """Lowest trial scale [GeV^2]: t0, or the truncation of the sigmoid cutoff."""
        return self.t0 * math.exp(-CUTOFF_SPAN * self.cutoff_width)

    @property
    def coupling(self) -> RunningCoupling:
        return RunningCoupling(float(self.alpha_s_mz))

    @property
    def alpha_max(self) -> float:
        """Overestimate of alpha_s on [t_low, s]: alpha_s(t_low) (alpha_s falls with t)."""
        return self.coupling(self.t_low)


def hard_process_fractions(sqrt_s: float, params: SMParameters | None = None):
    """Per flavour (d, u, s, c, b): (probability, probability of the (1 + cos theta)^2 component).

    sigma_f ~ N_c (A_f + B_f), where A_f = |A_LL|^2 + |A_RR|^2 multiplies (1 + cos)^2 and
    B_f = |A_LR|^2 + |A_RL|^2 multiplies (1 - cos)^2 (theta: quark vs e-, e- along +z).
    """
    params = params or SMParameters()
    sums = [chiral_sums(sqrt_s * sqrt_s, params, fermion(q)) for q in QUARKS]
    weights = [fermion(q).colours * (a + b) for q, (a, b) in zip(QUARKS, sums)]
    total = sum(weights)
    return [(w / total, a / (a + b)) for w, (a, b) in zip(weights, sums)]


# ---------------------------------------------------------------- records


@dataclass
class ParticleRecord:
    """Particles of all events, event-major (index = event * max_particles + slot).

    E, px, py, pz [GeV]; pid (PDG: +-1..5 quarks, 21 gluon); col, acol (LHE
    colour tags, 0 = none); partner_c / partner_a: slot of the particle whose
    acol equals this col / whose col equals this acol (NO_PARTNER if none);
    rate_c / rate_a: overestimated emission rate [1] of the dipole end towards
    that partner (alpha_max / 2 pi times the z-integral of the overestimate).
    """

    E: Any
    px: Any
    py: Any
    pz: Any
    pid: Any
    col: Any
    acol: Any
    partner_c: Any
    partner_a: Any
    rate_c: Any
    rate_a: Any


@dataclass
class MomentumTangents:
    """d(E, px, py, pz) / d alpha_s(mZ) [GeV] per slot, same layout as :class:`ParticleRecord`."""

    E: Any
    px: Any
    py: Any
    pz: Any


@dataclass
class ShowerResult:
    """Showered events (Dr.Jit arrays) and per-event estimator ingredients.

    record/tangents: N * M event-major arrays; per event (N lanes): n_particles,
    n_emissions, n_trials, overflow (ran out of slots; the event stopped early),
    score_alpha [1] = d log P / d alpha_s(mZ), score_t0 [GeV^-2] = d log P / d t0 of the
    sigmoid cutoff factors (relaxed model), score_fixed_tau [1] (tangent mode): d log P /
    d alpha_s(mZ) of the acceptance decisions (phase-space factor, splitting-function ratio,
    sigmoid cutoff) as the trial scales and dipole masses move at fixed coupling-weighted time,
    sad_weight [1] and sad_trial (Stochastic-AD alternative), total_rate
    (overestimate rate of the final configuration, for the cutoff boundary term),
    next_colour (first unused colour tag).
    """

    settings: ShowerSettings
    n_events: int
    seed: int
    record: ParticleRecord
    tangents: MomentumTangents | None
    n_particles: Any
    n_emissions: Any
    n_trials: Any
    overflow: Any
    score_alpha: Any
    score_t0: Any
    score_fixed_tau: Any
    sad_weight: Any
    sad_trial: Any
    total_rate: Any
    next_colour: Any


@dataclass
class _Lanes:
    """Per-event loop state of the Sudakov loop."""

    active: Any
    t: Any
    total_rate: Any
    n: Any
    next_colour: Any
    trials: Any
    emissions: Any
    overflow: Any
    score_alpha: Any
    score_t0: Any
    score_fixed_tau: Any
    sad_weight: Any
    sad_trial: Any
    rng: Any
    rng_sad: Any


# ---------------------------------------------------------------- kinematics


def _epsilon(a: FourVector, b: FourVector, c: FourVector) -> FourVector:
    """v^mu = eps^{mu nu rho sigma} a_nu b_rho c_sigma (up to sign): orthogonal to a, b and c."""
    def det3(x0, x1, x2, y0, y1, y2, w0, w1, w2):
        return x0 * (y1 * w2 - y2 * w1) - x1 * (y0 * w2 - y2 * w0) + x2 * (y0 * w1 - y1 * w0)

    v0 = det3(a.px, a.py, a.pz, b.px, b.py, b.pz, c.px, c.py, c.pz)
    v1 = det3(a.E, a.py, a.pz, b.E, b.py, b.pz, c.E, c.py, c.pz)
    v2 = det3(a.E, a.px, a.pz, b.E, b.px, b.pz, c.E, c.px, c.pz)
    v3 = det3(a.E, a.px, a.py, b.E, b.px, b.py, c.E, c.px, c.py)
    # Lower-index components are (v0, -v1, v2, -v3); raising the spatial ones flips their sign.
    return FourVector(v0, v1, -v2, v3)


def cs_kinematics(p_ij: FourVector, p_k: FourVector, t, z, phi):
    """Catani-Seymour final-state map: (p_i, p_j, p_k') from the emitter p_ij and spectator p_k.

    t = kT^2 [GeV^2], z the momentum fraction of i, phi the azimuth of kT.
    Massless partons: p_i^2 = p_j^2 = 0 and p_i + p_j + p_k' = p_ij + p_k exactly.
    Works with Dr.Jit arrays or :class:`pyhybrid.kernels.dual.Dual` components (then t may be
    a Dual too) for forward-mode tangents.
    """
    m2 = p_ij.dot(p_k) * 2.0
    one_minus_z = 1.0 - z
    y = t / (m2 * (z * one_minus_z))
    # First transverse direction: (0, p_ij x p_k); for collinear (e.g. back-to-back) pairs
    # use p_ij x e, with e the x axis, or the y axis when p_ij points close to x.
    cx = p_ij.py * p_k.pz - p_ij.pz * p_k.py
    cy = p_ij.pz * p_k.px - p_ij.px * p_k.pz
    cz = p_ij.px * p_k.py - p_ij.py * p_k.px
    c2 = dual.value(cx * cx + cy * cy + cz * cz)
    scale = dual.value(p_ij.p2() * p_k.p2())
    collinear = c2 < 1e-10 * scale
    near_x = dr.abs(dual.value(p_ij.px)) > 0.9 * dual.value(p_ij.E)
    zero = p_ij.px * 0.0
    fx = dual.select(near_x, p_ij.pz * -1.0, zero)      # p_ij x e_y = (-pz, 0, px)
    fy = dual.select(near_x, zero, p_ij.pz)             # p_ij x e_x = (0, pz, -py)
    fz = dual.select(near_x, p_ij.px, p_ij.py * -1.0)
    cx, cy, cz = (dual.select(collinear, f, c) for f, c in ((fx, cx), (fy, cy), (fz, cz)))
    norm = 1.0 / dual.sqrt(cx * cx + cy * cy + cz * cz)
    n1 = FourVector(zero, cx * norm, cy * norm, cz * norm)
    v = _epsilon(p_ij, p_k, n1)
    n2 = v * (1.0 / dual.sqrt(v.dot(v) * -1.0))
    kt = dual.sqrt(t)
    k_perp = n1 * (kt * dr.cos(phi)) + n2 * (kt * dr.sin(phi))
    p_i = p_ij * z + p_k * (y * one_minus_z) + k_perp
    p_j = p_ij * one_minus_z + p_k * (y * z) - k_perp
    p_k_new = p_k * (1.0 - y)
    return p_i, p_j, p_k_new


# ---------------------------------------------------------------- kernel context


@dataclass
class _Context:
    """Constants of one kernel launch (not loop state)."""

    types: KernelTypes
    n_lanes: int
    lane: Any
    max_particles: int
    alpha: dict
    coupling: RunningCoupling
    alpha_max: Any
    t0: Any
    t_low: Any
    log_t0: Any
    inverse_width: Any
    soft_cutoff: bool
    s: Any

    def index(self, slot):
        return self.lane * self.max_particles + slot

    def uniform(self, rng, mask=True):
        return rng.next_float64(mask) if self.types.is_double else rng.next_float32(mask)

    def momentum(self, record, index, mask) -> FourVector:
        F = self.types.Float
        return FourVector(*(dr.gather(F, a, index, mask) for a in (record.E, record.px, record.py, record.pz)))

    def tangent(self, tangents, index, mask) -> FourVector:
        F = self.types.Float
        return FourVector(*(dr.gather(F, a, index, mask) for a in (tangents.E, tangents.px, tangents.py,
                                                                    tangents.pz)))


def _context(types: KernelTypes, n: int, settings: ShowerSettings) -> _Context:
    F = types.Float
    coupling = settings.coupling
    width = settings.cutoff_width
    return _Context(
        types=types, n_lanes=n, lane=dr.arange(types.UInt32, n),
        max_particles=settings.max_particles, alpha=coupling.constants(F), coupling=coupling,
        alpha_max=dr.opaque(F, settings.alpha_max), t0=dr.opaque(F, settings.t0),
        t_low=dr.opaque(F, settings.t_low), log_t0=dr.opaque(F, math.log(settings.t0)),
        inverse_width=dr.opaque(F, 1.0 / width if width > 0 else 0.0), soft_cutoff=width > 0,
        s=dr.opaque(F, settings.s))


def _scatter_momentum(record, p: FourVector, index, mask) -> None:
    for buffer, value in zip((record.E, record.px, record.py, record.pz), p.columns()):
        dr.scatter(buffer, value, index, mask)


def _partner(ctx: _Context, record, index, colour_side, mask):
    """Slot of the colour partner on the colour side (True) or anticolour side (False, per lane)."""
    U = ctx.types.UInt32
    if isinstance(colour_side, bool):
        return dr.gather(U, record.partner_c if colour_side else record.partner_a, index, mask)
    on_c = dr.gather(U, record.partner_c, index, mask & colour_side)
    on_a = dr.gather(U, record.partner_a, index, mask & ~colour_side)
    return dr.select(colour_side, on_c, on_a)


def _z_limit(ctx: _Context, m2):
    """(z+, ln(z+ / (1 - z+)), open) of a dipole of mass^2 m2 for trial scales >= t_low."""
    is_open = m2 > 4.0 * ctx.t_low
    root = dr.sqrt(dr.maximum(1.0 - 4.0 * ctx.t_low / dr.maximum(m2, 1e-30), 0.0))
    z_plus = 0.5 * (1.0 + root)
    log_ratio = dr.log(dr.select(is_open, z_plus / (1.0 - z_plus), 1.0))
    return z_plus, log_ratio, is_open


def _overestimate_parts(z_plus, log_ratio, gluon):
    """z-integrals of the overestimates: (soft part, g -> q qbar part summed over flavours)."""
    F = type(z_plus)  # typed constants: a select of two Python floats would be float32
    soft = dr.select(gluon, F(CA), F(2.0 * CF)) * log_ratio
    split = dr.select(gluon, N_FLAVOURS * 0.5 * TR * (2.0 * z_plus - 1.0), 0.0)
    return soft, split


def _rate(ctx: _Context, p: FourVector, q: FourVector, gluon, ok):
    """Overestimated emission rate of a dipole end with emitter momentum p and spectator q."""
    z_plus, log_ratio, is_open = _z_limit(ctx, 2.0 * p.dot(q))
    soft, split = _overestimate_parts(z_plus, log_ratio, gluon)
    return dr.select(ok & is_open, ctx.alpha_max / (2.0 * math.pi) * (soft + split), 0.0)


def _choose_end(ctx: _Context, record, n, target, mask):
    """First dipole end (slot, colour_side) whose cumulative rate exceeds ``target``.

    Rounding can leave the cached total a hair above the sum; the last end with a
    positive rate is then taken.
    """
    U, F, B = ctx.types.UInt32, ctx.types.Float, ctx.types.Bool
    zero_u = dr.zeros(U, ctx.n_lanes)

    def cond(j, cumulative, found, slot, side, last_slot, last_side):
        return ~found & (j < n)

    def body(j, cumulative, found, slot, side, last_slot, last_side):
        index = ctx.index(j)
        rate_c = dr.gather(F, record.rate_c, index)
        rate_a = dr.gather(F, record.rate_a, index)
        hit_c = cumulative + rate_c > target
        hit_a = ~hit_c & (cumulative + rate_c + rate_a > target)
        slot = dr.select(hit_c | hit_a, j, slot)
        side = dr.select(hit_c, True, dr.select(hit_a, False, side))
        last_slot = dr.select((rate_c > 0) | (rate_a > 0), j, last_slot)
        last_side = dr.select(rate_a > 0, False, dr.select(rate_c > 0, True, last_side))
        return j + 1, cumulative + rate_c + rate_a, hit_c | hit_a, slot, side, last_slot, last_side

    state = (zero_u, dr.zeros(F, ctx.n_lanes), ~mask, zero_u, dr.full(B, True, ctx.n_lanes), zero_u,
             dr.full(B, True, ctx.n_lanes))
    _, _, found, slot, side, last_slot, last_side = dr.while_loop(state, cond, body, label="choose_dipole_end")
    return dr.select(found, slot, last_slot), dr.select(found, side, last_side)


@dataclass
class _Trial:
    """A trial emission on dipole end (i, colour_side) with spectator k."""

    i: Any
    colour_side: Any
    k: Any
    p_i: FourVector
    p_k: FourVector
    split: Any
    flavour: Any
    z: Any
    y: Any
    phi: Any
    valid: Any
    alpha: Any
    d_alpha: Any
    acceptance: Any
    d_log_acceptance_dy: Any

    @property
    def m2(self):
        return 2.0 * self.p_i.dot(self.p_k)


def _trial(ctx: _Context, record, n, t, total_rate, u, mask) -> _Trial:
    """Pick the dipole end, splitting and (z, phi) of a trial at scale t.

    The acceptance probability is f / g = (alpha_s(t) / alpha_max) * acceptance, with
    acceptance = (1 - y) * (splitting function / its overestimate), 0 where not ``valid``.
    """
    F, I = ctx.types.Float, ctx.types.Int32
    u_select, u_kernel, u_z, u_phi = u
    i, colour_side = _choose_end(ctx, record, n, u_select * total_rate, mask)
    index_i = ctx.index(i)
    k = _partner(ctx, record, index_i, colour_side, mask)
    has_k = mask & (k != NO_PARTNER)
    p_i = ctx.momentum(record, index_i, has_k)
    p_k = ctx.momentum(record, ctx.index(k), has_k)
    gluon = dr.gather(I, record.pid, index_i, has_k) == GLUON
    m2 = 2.0 * p_i.dot(p_k)
    z_plus, log_ratio, is_open = _z_limit(ctx, m2)
    soft, split_rate = _overestimate_parts(z_plus, log_ratio, gluon)
    kernel_point = u_kernel * (soft + split_rate)
    split = gluon & (kernel_point < split_rate)
    # Flavour of g -> q qbar uniform among the five (the overestimate counts all five).
    flavour = I(dr.minimum(dr.floor(kernel_point / dr.maximum(split_rate, 1e-30) * N_FLAVOURS),
                           N_FLAVOURS - 1)) + 1
    z_minus = 1.0 - z_plus
    z_soft = 1.0 - z_minus * dr.exp(u_z * log_ratio)    # density ~ 1 / (1 - z) on [z-, z+]
    z_flat = z_minus + (z_plus - z_minus) * u_z
    z = dr.select(split, z_flat, z_soft)
    y = t / (m2 * z * (1.0 - z))
    flavour_mass2 = dr.select(flavour == 5, F(MB * MB), dr.select(flavour == 4, F(MC * MC), F(0.0)))
    valid = has_k & is_open & (y < 1.0) & (y > 0.0) & (~split | (t > flavour_mass2))
    # Ratio of the true splitting function to its overestimate (both per dipole end).
    denominator = 1.0 / (1.0 - z * (1.0 - y))
    soft_bracket = 2.0 * denominator - dr.select(gluon, 2.0 - z * (1.0 - z), 1.0 + z)
    kernel_ratio = dr.select(split, 1.0 - 2.0 * z * (1.0 - z), soft_bracket * 0.5 * (1.0 - z))
    acceptance = dr.select(valid, (1.0 - y) * kernel_ratio, 0.0)
    # d ln acceptance / dy: -1 / (1 - y) from the phase-space factor, plus the eikonal's y dependence
    d_log_acceptance_dy = -1.0 / (1.0 - y) + dr.select(split, 0.0, -2.0 * z * denominator * denominator
                                                       / soft_bracket)
    alpha, d_alpha = ctx.coupling.value_and_derivative(t, ctx.alpha)
    phi = 2.0 * math.pi * u_phi
    return _Trial(i, colour_side, k, p_i, p_k, split, flavour, z, y, phi, valid, alpha, d_alpha, acceptance,
                  d_log_acceptance_dy)


def _emit(ctx: _Context, record, tangents, n, next_colour, trial: _Trial, t, t_dot, mask):
    """Apply an accepted trial: kinematics, flavours, colour flow and cached rates.

    Returns the change of the total overestimated rate. The new particle goes to slot n.
    Inside the symbolic loop a buffer may not be read after it was written in the same
    iteration, so all gathers come first, then the arithmetic, then all scatters.
    """
    F, U, I = ctx.types.Float, ctx.types.UInt32, ctx.types.Int32
    i, k, j, side, split = trial.i, trial.k, n, trial.colour_side, trial.split
    index_i, index_j, index_k = ctx.index(i), ctx.index(j), ctx.index(k)

    # ---- reads
    pc_i = dr.gather(U, record.partner_c, index_i, mask)
    pa_i = dr.gather(U, record.partner_a, index_i, mask)
    pc_k = dr.gather(U, record.partner_c, index_k, mask)
    pa_k = dr.gather(U, record.partner_a, index_k, mask)
    col_i = dr.gather(U, record.col, index_i, mask)
    acol_i = dr.gather(U, record.acol, index_i, mask)
    pid_i = dr.gather(I, record.pid, index_i, mask)
    pid_k = dr.gather(I, record.pid, index_k, mask)
    # l: partner of i away from k; m: partner of k away from i. Colour chains are open strings,
    # so every dipole end touched by the emission has its partner among i, j, k, l, m.
    l = dr.select(side, pa_i, pc_i)
    m = dr.select(side, pc_k, pa_k)
    has_l, has_m = mask & (l != NO_PARTNER), mask & (m != NO_PARTNER)
    p_l, p_m = ctx.momentum(record, ctx.index(l), has_l), ctx.momentum(record, ctx.index(m), has_m)
    gluon_l = dr.gather(I, record.pid, ctx.index(l), has_l) == GLUON
    gluon_m = dr.gather(I, record.pid, ctx.index(m), has_m) == GLUON
    old_rates = {
        "i": (dr.gather(F, record.rate_c, index_i, mask), dr.gather(F, record.rate_a, index_i, mask)),
        "k": (dr.gather(F, record.rate_c, index_k, mask), dr.gather(F, record.rate_a, index_k, mask)),
        "l": dr.select(side, dr.gather(F, record.rate_c, ctx.index(l), has_l & side),
                       dr.gather(F, record.rate_a, ctx.index(l), has_l & ~side)),
        "m": dr.select(side, dr.gather(F, record.rate_a, ctx.index(m), has_m & side),
                       dr.gather(F, record.rate_c, ctx.index(m), has_m & ~side)),
    }
    if tangents is not None:
        tangent_i = ctx.tangent(tangents, index_i, mask)
        tangent_k = ctx.tangent(tangents, index_k, mask)

    # ---- kinematics
    if tangents is None:
        p_i, p_j, p_k = cs_kinematics(trial.p_i, trial.p_k, t, trial.z, trial.phi)
        new_tangents = None
    else:
        def with_tangent(p, dp):
            return FourVector(*(dual.Dual(a, [b]) for a, b in zip(p.columns(), dp.columns())))
        duals = cs_kinematics(with_tangent(trial.p_i, tangent_i), with_tangent(trial.p_k, tangent_k),
                              dual.Dual(t, [t_dot]), trial.z, trial.phi)
        p_i, p_j, p_k = (FourVector(*(c.value for c in d.columns())) for d in duals)
        new_tangents = [FourVector(*(c.tangents[0] for c in d.columns())) for d in duals]

    # ---- colour flow: q -> q g and g -> g g put j between i and k on side `side` with a new
    # tag; g -> q qbar: i keeps the colour (quark), j takes the anticolour (antiquark).
    none = U(NO_PARTNER)
    partner_c_i = dr.select(split | ~side, pc_i, j)
    partner_a_i = dr.select(split, none, dr.select(side, pa_i, j))
    partner_c_j = dr.select(split, none, dr.select(side, k, i))
    partner_a_j = dr.select(split, pa_i, dr.select(side, i, k))
    partner_c_k = dr.select(side, pc_k, j)
    partner_a_k = dr.select(side & ~split, j, pa_k)

    # ---- rates of the touched dipole ends
    def momentum_of(slot):
        found = p_m
        for candidate, p in ((l, p_l), (k, p_k), (j, p_j), (i, p_i)):
            found = dr.select(slot == candidate, p, found)
        return found

    def rate(p, gluon, partner, active):
        return _rate(ctx, p, momentum_of(partner), gluon, active & (partner != NO_PARTNER))

    gluon_i = ~split & (pid_i == GLUON)
    gluon_k = pid_k == GLUON
    rate_i = (rate(p_i, gluon_i, partner_c_i, mask), rate(p_i, gluon_i, partner_a_i, mask))
    rate_j = (rate(p_j, ~split, partner_c_j, mask), rate(p_j, ~split, partner_a_j, mask))
    rate_k = (rate(p_k, gluon_k, partner_c_k, mask), rate(p_k, gluon_k, partner_a_k, mask))
    rate_l = rate(p_l, gluon_l, dr.select(split & side, j, i), has_l)
    rate_m = rate(p_m, gluon_m, k, has_m)
    delta = (rate_i[0] + rate_i[1] - old_rates["i"][0] - old_rates["i"][1] + rate_j[0] + rate_j[1]
             + rate_k[0] + rate_k[1] - old_rates["k"][0] - old_rates["k"][1]
             + dr.select(has_l, rate_l - old_rates["l"], 0.0) + dr.select(has_m, rate_m - old_rates["m"], 0.0))

    # ---- writes
    for index, p in ((index_i, p_i), (index_j, p_j), (index_k, p_k)):
        _scatter_momentum(record, p, index, mask)
    if new_tangents is not None:
        for index, dp in zip((index_i, index_j, index_k), new_tangents):
            _scatter_momentum(tangents, dp, index, mask)
    dr.scatter(record.pid, dr.select(split, trial.flavour, pid_i), index_i, mask)
    dr.scatter(record.pid, dr.select(split, -trial.flavour, GLUON), index_j, mask)
    dr.scatter(record.col, dr.select(split | ~side, col_i, next_colour), index_i, mask)
    dr.scatter(record.acol, dr.select(split, 0, dr.select(side, acol_i, next_colour)), index_i, mask)
    dr.scatter(record.col, dr.select(split, 0, dr.select(side, col_i, next_colour)), index_j, mask)
    dr.scatter(record.acol, dr.select(split, acol_i, dr.select(side, next_colour, acol_i)), index_j, mask)
    for buffer, values in ((record.partner_c, (partner_c_i, partner_c_j, partner_c_k)),
                           (record.partner_a, (partner_a_i, partner_a_j, partner_a_k)),
                           (record.rate_c, (rate_i[0], rate_j[0], rate_k[0])),
                           (record.rate_a, (rate_i[1], rate_j[1], rate_k[1]))):
        for index, value in zip((index_i, index_j, index_k), values):
            dr.scatter(buffer, value, index, mask)
    # l's end towards the emission is on side `side`, m's end towards k on the other side.
    dr.scatter(record.partner_c, j, ctx.index(l), has_l & split & side)
    dr.scatter(record.rate_c, rate_l, ctx.index(l), has_l & side)
    dr.scatter(record.rate_a, rate_l, ctx.index(l), has_l & ~side)
    dr.scatter(record.rate_a, rate_m, ctx.index(m), has_m & side)
    dr.scatter(record.rate_c, rate_m, ctx.index(m), has_m & ~side)
    return delta


# ---------------------------------------------------------------- hard process


def _hard_process(ctx: _Context, record, tangents, rng, sqrt_s: float):
    """q qbar in slots 0 and 1: flavour, angles, colours 501; returns the total overestimate rate."""
    F, I, U = ctx.types.Float, ctx.types.Int32, ctx.types.UInt32
    u_flavour, u_component, u_cos, u_phi = (ctx.uniform(rng) for _ in range(4))
    flavour = dr.zeros(I, ctx.n_lanes) + 1
    forward_probability = dr.zeros(F, ctx.n_lanes)
    cumulative = 0.0
    for q, (fraction, forward) in zip(QUARKS, hard_process_fractions(sqrt_s)):
        chosen = (u_flavour >= cumulative) & (u_flavour < cumulative + fraction)
        flavour = dr.select(chosen, fermion(q).pdg, flavour)
        forward_probability = dr.select(chosen, forward, forward_probability)
        cumulative += fraction
    root = dr.cbrt(u_cos)
    cos_theta = dr.select(u_component < forward_probability, 2.0 * root - 1.0, 1.0 - 2.0 * root)
    sin_theta = dr.sqrt(dr.maximum(1.0 - cos_theta * cos_theta, 0.0))
    phi = 2.0 * math.pi * u_phi
    half = 0.5 * sqrt_s
    direction = FourVector(F(half), half * sin_theta * dr.cos(phi), half * sin_theta * dr.sin(phi),
                           half * cos_theta)
    anti = FourVector(direction.E, -direction.px, -direction.py, -direction.pz)
    quark, antiquark = ctx.index(U(0)), ctx.index(U(1))
    _scatter_momentum(record, direction, quark, True)
    _scatter_momentum(record, anti, antiquark, True)
    dr.scatter(record.pid, flavour, quark)
    dr.scatter(record.pid, -flavour, antiquark)
    dr.scatter(record.col, U(FIRST_COLOUR), quark)
    dr.scatter(record.acol, U(FIRST_COLOUR), antiquark)
    dr.scatter(record.partner_c, U(1), quark)
    dr.scatter(record.partner_a, U(0), antiquark)
    ok = dr.full(ctx.types.Bool, True, ctx.n_lanes)
    rate_q = _rate(ctx, direction, anti, False, ok)
    rate_qbar = _rate(ctx, anti, direction, False, ok)
    dr.scatter(record.rate_c, rate_q, quark)
    dr.scatter(record.rate_a, rate_qbar, antiquark)
    return rate_q + rate_qbar


def _new_record(ctx: _Context) -> ParticleRecord:
    size = ctx.n_lanes * ctx.max_particles
    F, I, U = ctx.types.Float, ctx.types.Int32, ctx.types.UInt32

    def buffer(dtype, value=0):
        return private_buffer(dr.full(dtype, value, size))

    return ParticleRecord(buffer(F), buffer(F), buffer(F), buffer(F), buffer(I), buffer(U), buffer(U),
                          buffer(U, NO_PARTNER), buffer(U, NO_PARTNER), buffer(F), buffer(F))


# ---------------------------------------------------------------- the shower


def run_shower(types: KernelTypes, n_events: int, settings: ShowerSettings, seed: int, *,
               flip_trial=None, tangents: bool = False, stochastic_ad: bool = False) -> ShowerResult:
    """Shower ``n_events`` e+e- -> q qbar events; one lane per event.

    flip_trial: UInt32 per event, the trial whose accept/veto decision is
        inverted (Stochastic-AD alternative path; same seed as the primal run).
    tangents: carry d momenta / d alpha_s(mZ) at fixed coupling-weighted time.
    stochastic_ad: choose each event's Stochastic-AD alternative trial.
    All arrays of the result are evaluated.
    """
    n_events = check_integer(n_events, "n_events", 1)
    if tangents and (flip_trial is not None or stochastic_ad):
        raise ValueError("tangents (relaxed estimator) cannot be combined with Stochastic-AD options")
    if n_events * settings.max_particles >= 2**32:
        raise ValueError("n_events * max_particles must stay below 2^32")
    ctx = _context(types, n_events, settings)
    F, U, B = types.Float, types.UInt32, types.Bool
    record = _new_record(ctx)
    tangent_buffers = None
    if tangents:
        size = n_events * settings.max_particles
        tangent_buffers = MomentumTangents(*(private_buffer(dr.zeros(F, size)) for _ in range(4)))
    rng = types.rng(n_events, seed, 0)
    total_rate = _hard_process(ctx, record, tangent_buffers, rng, settings.sqrt_s)
    dr.eval(record, total_rate, rng)  # scatters must land before the symbolic loop reads the buffers
    # Separate objects: `+=` on Dr.Jit arrays updates the Python object in place.
    lanes = _Lanes(active=dr.full(B, True, n_events), t=dr.full(F, settings.s, n_events), total_rate=total_rate,
                   n=dr.full(U, 2, n_events), next_colour=dr.full(U, FIRST_COLOUR + 1, n_events),
                   trials=dr.zeros(U, n_events), emissions=dr.zeros(U, n_events),
                   overflow=dr.full(B, False, n_events), score_alpha=dr.zeros(F, n_events),
                   score_t0=dr.zeros(F, n_events), score_fixed_tau=dr.zeros(F, n_events),
                   sad_weight=dr.zeros(F, n_events), sad_trial=dr.full(U, NO_PARTNER, n_events),
                   rng=rng, rng_sad=types.rng(n_events, seed, 1))
    flip = None if flip_trial is None else U(flip_trial)

    def cond(lanes, record, tangent_buffers):
        return lanes.active

    def body(lanes, record, tangent_buffers):
        u_t, u_select, u_kernel, u_z, u_accept, u_phi = (ctx.uniform(lanes.rng) for _ in range(6))
        rate = lanes.total_rate
        t = dr.select(rate > 0.0, lanes.t * dr.exp(dr.log(u_t) / rate), 0.0)
        going = t > ctx.t_low
        trial = _trial(ctx, record, lanes.n, t, rate, (u_select, u_kernel, u_z, u_phi), going)
        coupling_ratio = trial.alpha / ctx.alpha_max
        d_log_alpha = trial.d_alpha / trial.alpha
        acceptance = trial.acceptance
        if ctx.soft_cutoff:
            cut = dr.rcp(1.0 + dr.exp((ctx.log_t0 - dr.log(t)) * ctx.inverse_width))
            d_log_cut_d_log_t = (1.0 - cut) * ctx.inverse_width
            acceptance = acceptance * cut
        t_dot = None
        if tangent_buffers is None:
            # One Bernoulli decision u < p, p = (alpha_s / alpha_max) * acceptance; its score is
            # d ln p (accept) or d ln(1 - p) = -p d ln p / (1 - p) (veto).
            p = coupling_ratio * acceptance
            accept = trial.valid & (u_accept < p)
            if flip is not None:
                accept = trial.valid & (accept ^ (lanes.trials == flip))
            decision = dr.select(accept, 1.0, -p / (1.0 - p))
            # select, not multiply: alpha_s at the final (sub-cutoff) trial scale may be NaN
            lanes.score_alpha += dr.select(trial.valid, decision * d_log_alpha, 0.0)
            if ctx.soft_cutoff:
                lanes.score_t0 += dr.select(trial.valid, decision * (-d_log_cut_d_log_t / ctx.t0), 0.0)
            if stochastic_ad:
                dp = p * d_log_alpha
                weight = dr.select(accept, dr.select(dp < 0.0, -dp / p, 0.0),
                                   dr.select(dp > 0.0, dp / (1.0 - p), 0.0))
                weight = dr.select(trial.valid, weight, 0.0)
                lanes.sad_weight += weight
                u_reservoir = ctx.uniform(lanes.rng_sad)
                take = (weight > 0.0) & (u_reservoir * lanes.sad_weight < weight)
                lanes.sad_trial = dr.select(take, lanes.trials, lanes.sad_trial)
        else:
            # Two stages with the same law: thinning by alpha_s / alpha_max leaves the trials of
            # the evolution in tau = int alpha_s dt / t, which then pass the acceptance. At fixed
            # tau the scales move (t_dot) and the acceptance changes through y and the cutoff:
            # the likelihood ratio of the second stage accumulates in score_fixed_tau.
            u_thin = ctx.uniform(lanes.rng)
            thinned = trial.valid & (u_thin < coupling_ratio)
            accept = thinned & (u_accept < acceptance)
            lanes.score_alpha += dr.select(trial.valid, dr.select(
                thinned, 1.0, -coupling_ratio / (1.0 - coupling_ratio)) * d_log_alpha, 0.0)
            t_dot = t * ctx.coupling.integral_derivative(t, ctx.s, ctx.alpha) / trial.alpha
            dp_i = ctx.tangent(tangent_buffers, ctx.index(trial.i), trial.valid)
            dp_k = ctx.tangent(tangent_buffers, ctx.index(trial.k), trial.valid)
            m2 = trial.m2
            m2_dot = 2.0 * (dp_i.dot(trial.p_k) + trial.p_i.dot(dp_k))
            y_dot = trial.y * (t_dot / t - m2_dot / m2)
            d_log_acceptance = trial.d_log_acceptance_dy * y_dot
            decision = dr.select(accept, 1.0, -acceptance / (1.0 - acceptance))
            if ctx.soft_cutoff:
                d_log_acceptance += d_log_cut_d_log_t * t_dot / t
                lanes.score_t0 += dr.select(thinned, decision * (-d_log_cut_d_log_t / ctx.t0), 0.0)
            lanes.score_fixed_tau += dr.select(thinned, decision * d_log_acceptance, 0.0)
        room = lanes.n < ctx.max_particles
        emit = accept & room
        # A symbolic if: packets in which no lane emits skip the (gather/scatter-heavy) emission.
        lanes.total_rate += dr.if_stmt(
            (record, tangent_buffers, lanes.n, lanes.next_colour, trial, t, t_dot, emit), emit,
            lambda *args: _emit(ctx, *args), lambda *args: dr.zeros(F, n_events))
        lanes.n = dr.select(emit, lanes.n + 1, lanes.n)
        lanes.next_colour = dr.select(emit & ~trial.split, lanes.next_colour + 1, lanes.next_colour)
        lanes.emissions = dr.select(emit, lanes.emissions + 1, lanes.emissions)
        lanes.overflow |= accept & ~room
        lanes.trials += 1
        lanes.t = t
        lanes.active = going & ~lanes.overflow
        return lanes, record, tangent_buffers

    lanes, record, tangent_buffers = dr.while_loop((lanes, record, tangent_buffers), cond, body,
                                                   label="sudakov_veto_loop")
    result = ShowerResult(settings, n_events, seed, record, tangent_buffers, lanes.n, lanes.emissions,
                          lanes.trials, lanes.overflow, lanes.score_alpha, lanes.score_t0, lanes.score_fixed_tau,
                          lanes.sad_weight, lanes.sad_trial, lanes.total_rate, lanes.next_colour)
    # One evaluation for everything: the loop's side effects and outputs must land together.
    dr.eval(result.record, result.tangents, result.n_particles, result.n_emissions, result.n_trials,
            result.overflow, result.score_alpha, result.score_t0, result.score_fixed_tau, result.sad_weight,
            result.sad_trial, result.total_rate, result.next_colour)
    return result


# ---------------------------------------------------------------- cutoff boundary


@dataclass
class BoundaryEmission:
    """One extra emission at t = t0 from each event's final configuration.

    record/n_particles: the events with that emission (where it is allowed);
    rate [GeV^-2]: density of accepted emissions in t at t0,
    (total overestimate / t0) * p_accept. d E[F] / d t0 = -E[rate (F(with) - F(without))].
    """

    record: ParticleRecord
    n_particles: Any
    rate: Any


def boundary_emission(types: KernelTypes, result: ShowerResult, seed: int) -> BoundaryEmission:
    """Extra emission at the cutoff for the t0 derivative (hard cutoff only)."""
    settings = result.settings
    if settings.cutoff_width > 0:
        raise ValueError("boundary_emission applies to the hard cutoff (cutoff_width = 0)")
    n = result.n_events
    ctx = _context(types, n, settings)
    rng = types.rng(n, seed, 2)
    u = [ctx.uniform(rng) for _ in range(4)]
    mask = (result.total_rate > 0.0) & ~result.overflow
    record = replace(result.record)  # scatters copy shared buffers, the primal record stays intact
    t = ctx.t0 + dr.zeros(types.Float, n)
    trial = _trial(ctx, record, result.n_particles, t, result.total_rate, u, mask)
    emit = trial.valid & (result.n_particles < settings.max_particles)
    _emit(ctx, record, None, result.n_particles, result.next_colour, trial, t, None, emit)
    n_particles = dr.select(emit, result.n_particles + 1, result.n_particles)
    p_accept = trial.alpha / ctx.alpha_max * trial.acceptance
    rate = dr.select(emit, result.total_rate / ctx.t0 * p_accept, 0.0)
    dr.eval(record, n_particles, rate)
    return BoundaryEmission(record, n_particles, rate)
