"""Two-loop running strong coupling with flavour thresholds (Dr.Jit, no torch).

alpha_s(t) at the scale t = mu^2 [GeV^2] in the MSbar-like two-loop form used
by parton showers (e.g. S. Hoeche, arXiv:1411.4085, "Introduction to parton-shower
event generators"): in each flavour region

    w = 1 + b0 a_ref ln(t / t_ref),
    alpha_s(t) = a_ref / w * (1 - (b1 / b0) a_ref ln(w) / w),

with b0 = (33 - 2 nf) / (12 pi), b1 = (153 - 19 nf) / (24 pi^2); nf = 5 above
t = mb^2 (reference mZ^2, alpha_s(mZ)), 4 between mc^2 and mb^2 (reference mb^2,
alpha_s(mb) from the 5-flavour formula) and 3 below mc^2 (reference mc^2).
The coupling is continuous at the thresholds.

Every function also returns the derivative with respect to alpha_s(mZ) (the
parameter that shower tunes vary), computed analytically through the chain
alpha_s(mZ) -> alpha_s(mb) -> alpha_s(mc). ``t`` may be a Python float or a
Dr.Jit array (one lane per event); the region is chosen per lane.

:func:`RunningCoupling.integral_derivative` gives d/d alpha_s(mZ) of
int_{ln t}^{ln t_top} alpha_s(t') d ln t' in closed form, with
int alpha_s dL = [ln w + (b1/b0) a_ref (ln w + 1) / w] / b0 per region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import drjit as dr

__all__ = ["MZ", "MB", "MC", "CA", "CF", "TR", "RunningCoupling", "beta0", "beta1"]

MZ = 91.1876
MB = 4.75
MC = 1.3
CA = 3.0
CF = 4.0 / 3.0
TR = 0.5


def beta0(nf: int) -> float:
    """b0 = (11/6 CA - 2/3 TR nf) / (2 pi)."""
    return (11.0 / 6.0 * CA - 2.0 / 3.0 * TR * nf) / (2.0 * math.pi)


def beta1(nf: int) -> float:
    """b1 = (17/6 CA^2 - (5/3 CA + CF) TR nf) / (2 pi)^2."""
    return (17.0 / 6.0 * CA * CA - (5.0 / 3.0 * CA + CF) * TR * nf) / (2.0 * math.pi) ** 2


def _log(x):
    return math.log(x) if isinstance(x, (int, float)) else dr.log(x)


def _two_loop(log_ratio, a, b0, c):
    """(alpha_s, d alpha_s / d a) at ln(t / t_ref) = log_ratio for alpha_s(t_ref) = a; c = b1 / b0."""
    w = 1.0 + b0 * a * log_ratio
    log_w = _log(w)
    value = a / w * (1.0 - c * a * log_w / w)
    # d(a/w)/da = 1/w^2 since w - a b0 L = 1; d(a ln w / w)/da = ln w / w + a b0 L (1 - ln w) / w^2.
    d_log_term = log_w / w + a * b0 * log_ratio * (1.0 - log_w) / (w * w)
    derivative = (1.0 - c * a * log_w / w) / (w * w) - a / w * c * d_log_term
    return value, derivative


def _two_loop_integral_derivative(log_ratio, a, b0, c):
    """d/da of int_0^L alpha_s dL' = [ln w + c a (ln w + 1) / w - c a] / b0 (one flavour region)."""
    w = 1.0 + b0 * a * log_ratio
    log_w = _log(w)
    return log_ratio / w + c / b0 * ((log_w + 1.0) / w - a * b0 * log_ratio * log_w / (w * w) - 1.0)


@dataclass(frozen=True)
class RunningCoupling:
    """Two-loop alpha_s with thresholds at ``mb``, ``mc`` [GeV]; ``alpha_s_mz`` at ``mz`` [GeV].

    The reference couplings of the three regions and their derivatives with
    respect to alpha_s(mZ) are plain floats computed on construction; kernels
    receive them as opaque 1-lane arrays through :meth:`constants`.
    """

    alpha_s_mz: float
    mz: float = MZ
    mb: float = MB
    mc: float = MC

    def __post_init__(self):
        if not (isinstance(self.alpha_s_mz, (int, float)) and 0.0 < self.alpha_s_mz < 1.0):
            raise ValueError(f"alpha_s(mZ) must be a float in (0, 1), got {self.alpha_s_mz!r}")
        if not 0.0 < self.mc < self.mb < self.mz:
            raise ValueError(f"need 0 < mc < mb < mz, got mc={self.mc}, mb={self.mb}, mz={self.mz}")

    # ------------------------------------------------------------ region constants

    def references(self) -> tuple[tuple[float, float, float, int], ...]:
        """(t_ref [GeV^2], a_ref, d a_ref / d alpha_s(mZ), nf) of the 5-, 4- and 3-flavour regions."""
        return self._references

    @cached_property
    def _references(self):
        mz2, mb2, mc2 = self.mz**2, self.mb**2, self.mc**2
        a_b, da_b = _two_loop(math.log(mb2 / mz2), self.alpha_s_mz, beta0(5), beta1(5) / beta0(5))
        a_c, da_c_db = _two_loop(math.log(mc2 / mb2), a_b, beta0(4), beta1(4) / beta0(4))
        return ((mz2, self.alpha_s_mz, 1.0, 5), (mb2, a_b, da_b, 4), (mc2, a_c, da_c_db * da_b, 3))

    def lowest_valid_scale(self) -> float:
        """Smallest t [GeV^2] at which alpha_s <= 1 (the two-loop formula is used only above it)."""
        low, high = 1e-6, self.mc**2
        if self(high) > 1.0:
            raise ValueError(f"alpha_s(mc) > 1 for alpha_s(mZ) = {self.alpha_s_mz}")
        for _ in range(60):  # bisection in ln t; alpha_s decreases with t above the Landau pole
            middle = math.sqrt(low * high)
            w_ok = 1.0 + beta0(3) * self.references()[2][1] * math.log(middle / self.mc**2) > 0.0
            if w_ok and self(middle) <= 1.0:
                high = middle
            else:
                low = middle
        return high

    # ------------------------------------------------------------ evaluation

    def __call__(self, t):
        """alpha_s(t) for t [GeV^2] (float or Dr.Jit array)."""
        return self.value_and_derivative(t)[0]

    def value_and_derivative(self, t, constants: dict | None = None):
        """(alpha_s(t), d alpha_s(t) / d alpha_s(mZ)); ``constants`` from :meth:`constants` (kernels)."""
        c = constants or self.float_constants()
        log_t = _log(t)
        log_t_ref, a_ref, da_ref, b0, ratio = _region(log_t, c)
        value, derivative = _two_loop(log_t - log_t_ref, a_ref, b0, ratio)
        return value, derivative * da_ref

    def integral_derivative(self, t, t_top, constants: dict | None = None):
        """d/d alpha_s(mZ) of int_{ln t}^{ln t_top} alpha_s d ln t' (t <= t_top, both [GeV^2]).

        Used for the pathwise ("time-change") derivative of emission scales at
        fixed coupling-weighted evolution time.
        """
        c = constants or self.float_constants()
        return _primitive_derivative(_log(t_top), c) - _primitive_derivative(_log(t), c)

    def float_constants(self) -> dict:
        """Region constants as Python floats."""
        refs = self.references()
        return {"log_t_ref": [math.log(r[0]) for r in refs], "a_ref": [r[1] for r in refs],
                "da_ref": [r[2] for r in refs], "b0": [beta0(r[3]) for r in refs],
                "ratio": [beta1(r[3]) / beta0(r[3]) for r in refs]}

    def constants(self, Float) -> dict:
        """Region constants with a_ref and its derivative as opaque 1-lane arrays of type
        ``Float`` (a new alpha_s(mZ) then reuses the compiled kernels); the rest stay literals."""
        c = self.float_constants()
        return {**c, "a_ref": [dr.opaque(Float, a) for a in c["a_ref"]],
                "da_ref": [dr.opaque(Float, d) for d in c["da_ref"]]}


def _region(log_t, c):
    """Per-lane constants (log t_ref, a_ref, da_ref, b0, b1/b0) of the flavour region of ln t."""
    names = ("log_t_ref", "a_ref", "da_ref", "b0", "ratio")
    if isinstance(log_t, float):
        k = 0 if log_t >= c["log_t_ref"][1] else 1 if log_t >= c["log_t_ref"][2] else 2
        return tuple(c[name][k] for name in names)
    above_b = log_t >= c["log_t_ref"][1]
    above_c = log_t >= c["log_t_ref"][2]
    return tuple(dr.select(above_b, c[name][0], dr.select(above_c, c[name][1], c[name][2])) for name in names)


def _primitive_derivative(log_t, c):
    """d/d alpha_s(mZ) of P(ln t), the primitive of alpha_s that vanishes at the mb^2 threshold."""
    def integral(k, log_to):
        return _two_loop_integral_derivative(log_to - c["log_t_ref"][k], c["a_ref"][k], c["b0"][k],
                                             c["ratio"][k]) * c["da_ref"][k]

    # Region pieces: above mb^2 the 5-flavour integral from mb^2; below, the 4-flavour one from mb^2
    # down to max(t, mc^2) plus the 3-flavour one from mc^2 to t.
    log_mb2, log_mc2 = c["log_t_ref"][1], c["log_t_ref"][2]
    if isinstance(log_t, float):
        if log_t >= log_mb2:
            return integral(0, log_t) - integral(0, log_mb2)
        if log_t >= log_mc2:
            return integral(1, log_t)
        return integral(1, log_mc2) + integral(2, log_t)
    above_b = log_t >= log_mb2
    above_c = log_t >= log_mc2
    five = integral(0, dr.maximum(log_t, log_mb2)) - integral(0, log_mb2)
    four = integral(1, dr.clip(log_t, log_mc2, log_mb2))
    three = integral(2, dr.minimum(log_t, log_mc2))
    return dr.select(above_b, five, dr.select(above_c, four, four + three))
