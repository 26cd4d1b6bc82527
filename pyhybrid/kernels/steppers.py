"""Runge-Kutta steppers for charged particles in a magnetic field (Dr.Jit; no torch).

Equations of motion in the path length s [mm] (ACTS convention):

    dr/ds = T,      dT/ds = lambda T x B(r),      lambda = c q/p,

with T the unit direction, q/p in e/GeV, B in Tesla and c = B_CURVATURE =
0.299792458e-3 GeV/(T mm). Both steppers are 4-stage Runge-Kutta-Nystroem
schemes for this second-order system, written as a tableau:

    r_s = r + c_s h T + h^2 sum_j a_sj k_j,   T_s = T + h sum_j b_sj k_j,   k_s = lambda T_s x B(r_s)
    r'  = r + h T + h^2/6 (k1 + k2 + k3),     T'  = T + h/6 (k1 + 2 k2 + 2 k3 + k4)

* :data:`RK4_TABLEAU` is the classic RK4 applied to (r, T) (four field evaluations),
* :data:`RKN_TABLEAU` is the Runge-Kutta-Nystroem scheme of ACTS' EigenStepper
  (three field evaluations; stages 2 and 3 share a point), with the ACTS local
  error estimate h^2 |k1 - k2 - k3 + k4|_1 used by :class:`AdaptiveRKN`.

:func:`nystrom_step` optionally carries tangent columns (forward-mode
derivatives of r and T with respect to the start of the segment, q/p and the
field parameters) through the same stages: the exact derivative of the discrete
step, including the field gradient dB/dr; or, with ``spatial_gradient=False``, the
ACTS EigenStepper's transport, which neglects dB/dr in the stages (the field is
treated as locally uniform for the derivatives; its dependence on the field
parameters is kept). Then a variation of the position alone stays a pure
translation (d r = const, d T = 0), so those columns need not be carried at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import drjit as dr


__all__ = ["NystromTableau", "RK4_TABLEAU", "RKN_TABLEAU", "RK4", "AdaptiveRKN", "TangentColumn", "nystrom_step"]


@dataclass(frozen=True)
class NystromTableau:
    """Stage coefficients; ``a[s]``/``b[s]`` weight k_1..k_{s-1}; ``same_point[s]``: B of stage s-1 is reused."""

    name: str
    c: tuple
    a: tuple
    b: tuple
    same_point: tuple


RK4_TABLEAU = NystromTableau("rk4", c=(0.0, 0.5, 0.5, 1.0),
                             a=((), (), (0.25,), (0.0, 0.5)),
                             b=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                             same_point=(False, False, False, False))
RKN_TABLEAU = NystromTableau("rkn", c=(0.0, 0.5, 0.5, 1.0),
                             a=((), (0.125,), (0.125, 0.0), (0.0, 0.0, 0.5)),
                             b=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                             same_point=(False, False, True, False))
_WEIGHTS_T = (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0)


@dataclass(frozen=True)
class RK4:
    """Classic RK4 with a fixed step ``step_size`` [mm] (the last step before a surface is shortened)."""

    step_size: float = 10.0
    tableau = RK4_TABLEAU
    adaptive = False

    def __post_init__(self):
        if not self.step_size > 0:
            raise ValueError(f"step_size must be a positive length in mm, got {self.step_size!r}")

    @property
    def initial_step(self) -> float:
        return self.step_size


@dataclass(frozen=True)
class AdaptiveRKN:
    """ACTS-style adaptive Runge-Kutta-Nystroem stepper.

    A step of size h is accepted when the local error estimate
    h^2 |k1 - k2 - k3 + k4|_1 <= ``tolerance`` [mm]; the next trial size is
    h * clip((tolerance / error)^(1/4), 0.25, 4), limited to [min_step, max_step].
    (ACTS' current EigenStepper scales the same way but accepts errors up to 4 x its
    stepTolerance; older ACTS versions scaled with (tolerance / 2 error)^(1/4).)
    A rejected step is retried with the smaller size. Steps at ``min_step`` are
    accepted whatever their error (so a lane can never stall).
    """

    tolerance: float = 1e-4
    initial_step: float = 50.0
    min_step: float = 1e-4
    max_step: float = 1000.0
    tableau = RKN_TABLEAU
    adaptive = True

    def __post_init__(self):
        for name in ("tolerance", "initial_step", "min_step", "max_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.min_step > self.max_step:
            raise ValueError(f"min_step ({self.min_step}) must not exceed max_step ({self.max_step})")

    def next_step(self, h_abs, error):
        """Trial step size after a step of size |h| with this error estimate."""
        ratio = self.tolerance / dr.maximum(error, 1e-30)
        scale = dr.clip(dr.sqrt(dr.sqrt(ratio)), 0.25, 4.0)
        return dr.clip(h_abs * scale, self.min_step, self.max_step)


@dataclass
class TangentColumn:
    """One forward-mode column: d r / d column, d T / d column (3-tuples, None = 0).

    ``d_lambda``: d lambda / d column (a constant, B_CURVATURE for the q/p column);
    ``field_parameter``: index of the field parameter this column differentiates, or None.
    ``per_lambda``: the column is d / d(lambda theta_g) for a field proportional to theta_g
    (B = theta_g B^): the state depends on lambda and theta_g only through their product, and
    the stage term is T_s x dB/dtheta_g = T_s x B^ (without the factor lambda).
    """

    dr: tuple
    dt: tuple
    d_lambda: float | None = None
    field_parameter: int | None = None
    per_lambda: bool = False


# ---------------------------------------------------------------- None-aware small vector algebra


def _madd(acc, a, b):
    """acc + a * b where any of them may be None (zero)."""
    if a is None or b is None:
        return acc
    return a * b if acc is None else dr.fma(a, b, acc)


def _axpy(factor, x, y):
    """y + factor * x for 3-vectors (None entries and a None x allowed)."""
    if x is None:
        return y
    return tuple(_madd(yi, factor, xi) for xi, yi in zip(x, y))


def _cross(a, b):
    def term(p, q, u, v):  # p*q - u*v
        first = None if p is None or q is None else p * q
        if u is None or v is None:
            return first
        return -(u * v) if first is None else dr.fma(-u, v, first)
    return (term(a[1], b[2], a[2], b[1]), term(a[2], b[0], a[0], b[2]), term(a[0], b[1], a[1], b[0]))


# ---------------------------------------------------------------- the step


def nystrom_step(field, tableau: NystromTableau, r, t, lam, h, columns: Sequence[TangentColumn] | None = None,
                 error_estimate: bool = False, spatial_gradient: bool = True):
    """One step of size ``h`` from (r, t) with lambda = c q/p.

    Returns ``(r_new, t_new, error, new_columns)``; ``error`` is the ACTS error
    estimate (only when ``error_estimate``), ``new_columns`` the propagated
    tangent columns (only when ``columns`` is given). ``spatial_gradient``: include
    dB/dr in the tangent stages (exact); False neglects it (ACTS), and the field
    gradient is then not evaluated at all.
    """
    want_derivatives = columns is not None
    # Field derivatives needed per stage: dB/dr (exact transport) and/or dB/dparameters (field columns).
    field_derivatives = want_derivatives and (
        spatial_gradient or any(c.field_parameter is not None for c in columns))
    ks, stages = [], []
    h2 = h * h
    for s in range(4):
        r_s, t_s = r, t
        if tableau.c[s]:
            r_s = tuple(dr.fma(tableau.c[s] * h, ti, ri) for ri, ti in zip(r, t))
        for j, coefficient in enumerate(tableau.a[s]):
            if coefficient:
                r_s = tuple(dr.fma(coefficient * h2, kj, ri) for ri, kj in zip(r_s, ks[j]))
        for j, coefficient in enumerate(tableau.b[s]):
            if coefficient:
                t_s = tuple(dr.fma(coefficient * h, kj, ti) for ti, kj in zip(t_s, ks[j]))
        if not want_derivatives:
            # Values only: lambda (loop-invariant) is folded into the field's constants, k = T x (lambda B).
            if not tableau.same_point[s]:
                lam_b = field.evaluate(r_s, scale=lam)
            ks.append(_cross(t_s, lam_b))
            continue
        if tableau.same_point[s]:
            b_s, grad_s, param_s = field_s
        elif field_derivatives:
            b_s, grad_s, param_s = field_s = field.evaluate_with_derivatives(r_s, gradient=spatial_gradient)
        else:
            b_s, grad_s, param_s = field_s = field.evaluate(r_s), _NO_GRADIENT, None
        stage = _StageLinearisation.of(lam, t_s, b_s, grad_s, param_s, columns)
        ks.append(_cross(t_s, stage.lam_b))
        stages.append(stage)

    # Fused multiply-adds (the value path runs every step): the weights of the docstring's r' and T'.
    r_new = tuple(dr.fma(h2 * (1.0 / 6.0), k1 + k2 + k3, dr.fma(h, ti, ri)) for ri, ti, k1, k2, k3 in zip(r, t, *ks[:3]))
    t_new = tuple(dr.fma(h * (1.0 / 6.0), dr.fma(2.0, k2 + k3, k1 + k4), ti) for ti, k1, k2, k3, k4 in zip(t, *ks))
    error = None
    if error_estimate:
        error = h2 * sum(dr.abs(ks[0][i] - ks[1][i] - ks[2][i] + ks[3][i]) for i in range(3))
    new_columns = None
    if want_derivatives:
        new_columns = [_step_column(col, tableau, h, stages) for col in columns]
    return r_new, t_new, error, new_columns


_NO_GRADIENT = ((None,) * 3,) * 3  # dB/dr as structural zeros


@dataclass
class _StageLinearisation:
    """d k_s = dT_s x (lambda B_s) + A_s dr_s + extra, with A_s = [T_s]x (lambda dB/dr) (shared by all columns).

    lambda multiplies B and dB/dr once per stage (a solenoid's dB/dr has four distinct entries),
    not each product with T_s; T_s x B_s is formed only for a column that needs it (d lambda).
    """

    lam_b: tuple
    a_columns: tuple         # A_s[:, j] as 3-tuples (None = zero column)
    kappa: tuple | None      # T_s x B_s (for a q/p column with d_lambda; None if there is none)
    parameter_terms: dict    # (g, per_lambda) -> lambda T_s x dB/dtheta_g (T_s x dB/dtheta_g if per_lambda)

    @classmethod
    def of(cls, lam, t_s, b_s, grad_s, param_s, columns):
        lam_b = tuple(lam * b for b in b_s)
        lam_grad = tuple(tuple(None if g is None else lam * g for g in row) for row in grad_s)
        a_columns = []
        for j in range(3):
            column = _cross(t_s, (lam_grad[0][j], lam_grad[1][j], lam_grad[2][j]))
            a_columns.append(None if all(c is None for c in column) else column)
        kappa = _cross(t_s, b_s) if any(c.d_lambda is not None for c in columns) else None
        parameter_terms = {}
        for c in columns:
            if c.field_parameter is not None:
                term = _cross(t_s, param_s[c.field_parameter])
                if not c.per_lambda:
                    term = tuple(None if v is None else lam * v for v in term)
                parameter_terms[c.field_parameter, c.per_lambda] = term
        return cls(lam_b, tuple(a_columns), kappa, parameter_terms)


def _step_column(col: TangentColumn, tableau, h, stages):
    """Derivative of the step along one tangent column (same stages as the values)."""
    h2 = h * h
    dks = []
    for s, stage in enumerate(stages):
        dt_s = col.dt
        for j, coefficient in enumerate(tableau.b[s]):
            if coefficient:
                dt_s = _axpy(coefficient * h, dks[j], dt_s)
        dk = _cross(dt_s, stage.lam_b)
        if any(a is not None for a in stage.a_columns):  # dB/dr term (not in the ACTS transport)
            dr_s = col.dr
            if tableau.c[s]:
                dr_s = _axpy(tableau.c[s] * h, col.dt, dr_s)
            for j, coefficient in enumerate(tableau.a[s]):
                if coefficient:
                    dr_s = _axpy(coefficient * h2, dks[j], dr_s)
            for j in range(3):
                dk = _axpy(dr_s[j], stage.a_columns[j], dk)
        if col.d_lambda is not None:
            dk = _axpy(col.d_lambda, stage.kappa, dk)
        if col.field_parameter is not None:
            dk = _add3(dk, stage.parameter_terms[col.field_parameter, col.per_lambda])
        dks.append(dk)
    dr_new = _axpy(h, col.dt, col.dr)
    for s in range(3):
        dr_new = _axpy(h2 / 6.0, dks[s], dr_new)
    dt_new = col.dt
    for s in range(4):
        dt_new = _axpy(h * _WEIGHTS_T[s], dks[s], dt_new)
    return TangentColumn(dr_new, dt_new, col.d_lambda, col.field_parameter, col.per_lambda)


def _add3(a, b):
    return tuple(y if x is None else (x if y is None else x + y) for x, y in zip(a, b))
