"""Forward-mode derivatives with several tangent directions at once (multi-dual numbers).

A :class:`Dual` holds a value (a Dr.Jit array or a Python float) and one
tangent per differentiation *column*: ``tangents[j] = d value / d column_j``.
Arithmetic and the functions below propagate all columns together, so one
pass of generic code gives a value and its full Jacobian row -- the forward
mode ACTS uses for its transport Jacobian, with several columns per lane.

A tangent of ``None`` is a structural zero: it costs nothing, which keeps the
many columns that a given quantity does not depend on (e.g. the material
thickness before a layer is crossed) out of the generated kernel.

All helpers accept plain values as well, so code written once with them runs
on plain Dr.Jit arrays (values only) or on Duals (values and derivatives).
Dr.Jit arrays do not defer to other types in binary operators: in mixed
expressions keep the Dual on the left of a Dr.Jit array (Python floats may be
on either side), or use :func:`multiply`, :func:`add`, :func:`subtract` (``dot``/``cross`` do). No torch here.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import drjit as dr

__all__ = ["Dual", "arrays", "value", "tangent", "sqrt", "exp", "log", "atan2", "select", "absolute", "dot", "cross",
           "normalized", "perpendicular_basis", "multiply", "add", "subtract"]


def _scale(t, factor):
    return None if t is None else t * factor


def _combine(terms) -> list:
    """Tangents of a result that is linear in its operands' tangents: column j is the sum over
    ``terms`` (tangent list, factor) of factor * tangents[j], as one multiplication and fused
    multiply-adds (None = zero). Dr.Jit does not contract a * b + c into an FMA by itself."""
    n = len(terms[0][0])
    result = []
    for j in range(n):
        total = None
        for tangents, factor in terms:
            t = tangents[j]
            if t is not None:
                total = t * factor if total is None else dr.fma(t, factor, total)
        result.append(total)
    return result


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class Dual:
    """Value with forward-mode tangents ``d value / d column_j`` (None = zero)."""

    __slots__ = ("value", "tangents")

    def __init__(self, value, tangents: Sequence):
        self.value = value
        self.tangents = list(tangents)

    @classmethod
    def variable(cls, value, column: int, n_columns: int) -> "Dual":
        """An independent variable: tangent 1 in ``column``."""
        tangents = [None] * n_columns
        tangents[column] = 1.0
        return cls(value, tangents)

    @classmethod
    def constant(cls, value, n_columns: int) -> "Dual":
        return cls(value, [None] * n_columns)

    def __add__(self, other):
        if isinstance(other, Dual):
            return Dual(self.value + other.value, [_add(a, b) for a, b in zip(self.tangents, other.tangents)])
        return Dual(self.value + other, self.tangents)

    __radd__ = __add__

    def __neg__(self):
        return Dual(-self.value, [_scale(t, -1.0) for t in self.tangents])

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, Dual):
            return Dual(self.value * other.value,
                        _combine([(self.tangents, other.value), (other.tangents, self.value)]))
        return Dual(self.value * other, [_scale(t, other) for t in self.tangents])

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, Dual):
            inverse = 1.0 / other.value
            quotient = self.value * inverse
            return Dual(quotient, _combine([(self.tangents, inverse), (other.tangents, -quotient * inverse)]))
        return self * (1.0 / other)

    def __rtruediv__(self, other):
        inverse = 1.0 / self.value
        quotient = other * inverse
        factor = -quotient * inverse
        return Dual(quotient, [_scale(t, factor) for t in self.tangents])


def arrays(tree) -> list:
    """The Dr.Jit arrays in ``tree``: Duals (values and tangents), tuples, lists and dataclasses of them."""
    if isinstance(tree, Dual):
        return arrays([tree.value, *tree.tangents])
    if isinstance(tree, (tuple, list)):
        return [a for x in tree for a in arrays(x)]
    if dataclasses.is_dataclass(tree):
        return arrays([getattr(tree, f.name) for f in dataclasses.fields(tree)])
    return [tree] if dr.is_array_v(tree) else []


def value(x):
    """The value of a Dual, or ``x`` itself."""
    return x.value if isinstance(x, Dual) else x


def tangent(x, column: int):
    """``d x / d column`` (None when structurally zero or ``x`` is not a Dual)."""
    return x.tangents[column] if isinstance(x, Dual) else None


def _chain(x: Dual, result, derivative) -> Dual:
    return Dual(result, [_scale(t, derivative) for t in x.tangents])


def sqrt(x):
    if isinstance(x, Dual):
        root = dr.sqrt(x.value)
        return _chain(x, root, 0.5 / root)
    return dr.sqrt(x)


def exp(x):
    if isinstance(x, Dual):
        result = dr.exp(x.value)
        return _chain(x, result, result)
    return dr.exp(x)


def log(x):
    if isinstance(x, Dual):
        return _chain(x, dr.log(x.value), 1.0 / x.value)
    return dr.log(x)


def atan2(y, x):
    if not isinstance(y, Dual) and not isinstance(x, Dual):
        return dr.atan2(y, x)
    yv, xv = value(y), value(x)
    inverse = 1.0 / (xv * xv + yv * yv)
    n = len((y if isinstance(y, Dual) else x).tangents)
    ty = y.tangents if isinstance(y, Dual) else [None] * n
    tx = x.tangents if isinstance(x, Dual) else [None] * n
    return Dual(dr.atan2(yv, xv), _combine([(ty, xv * inverse), (tx, -yv * inverse)]))


def select(mask, a, b):
    """Lane-wise ``a if mask else b``; a NaN in the branch not taken does not leak."""
    if not isinstance(a, Dual) and not isinstance(b, Dual):
        return dr.select(mask, a, b)
    n = len((a if isinstance(a, Dual) else b).tangents)
    ta = a.tangents if isinstance(a, Dual) else [None] * n
    tb = b.tangents if isinstance(b, Dual) else [None] * n
    tangents = [None if (p is None and q is None) else dr.select(mask, 0.0 if p is None else p, 0.0 if q is None else q)
                for p, q in zip(ta, tb)]
    return Dual(dr.select(mask, value(a), value(b)), tangents)


def absolute(x):
    return x * dr.select(value(x) < 0, -1.0, 1.0)


def _dual_right(a, b) -> bool:
    return isinstance(b, Dual) and not isinstance(a, Dual)


def multiply(a, b):
    """a * b with a Dual on either side (Dr.Jit arrays do not defer to Duals)."""
    return b * a if _dual_right(a, b) else a * b


def add(a, b):
    return b + a if _dual_right(a, b) else a + b


def subtract(a, b):
    return (-b) + a if _dual_right(a, b) else a - b


def _products(pairs, signs):
    """The sum of sign * p * q over ``pairs`` (signs +-1): values as plain arithmetic gives them (the same bits with and
    without derivatives), tangents as one chain of fused multiply-adds."""
    total = None
    for (p, q), sign in zip(pairs, signs):
        term = value(p) * value(q)
        total = term if total is None else (total + term if sign > 0 else total - term)
    terms = [(x.tangents, value(y) if sign > 0 else -value(y)) for (p, q), sign in zip(pairs, signs)
             for x, y in ((p, q), (q, p)) if isinstance(x, Dual)]
    return Dual(total, _combine(terms)) if terms else total


def dot(a, b):
    if not any(isinstance(x, Dual) for x in (*a, *b)):
        return add(add(multiply(a[0], b[0]), multiply(a[1], b[1])), multiply(a[2], b[2]))
    return _products(list(zip(a, b)), (1.0, 1.0, 1.0))


def cross(a, b):
    if not any(isinstance(x, Dual) for x in (*a, *b)):
        return (subtract(multiply(a[1], b[2]), multiply(a[2], b[1])),
                subtract(multiply(a[2], b[0]), multiply(a[0], b[2])),
                subtract(multiply(a[0], b[1]), multiply(a[1], b[0])))
    return tuple(_products([(a[i], b[j]), (a[j], b[i])], (1.0, -1.0)) for i, j in ((1, 2), (2, 0), (0, 1)))


def normalized(v):
    length2 = dot(v, v)
    inverse = 1.0 / dr.sqrt(value(length2))
    if isinstance(length2, Dual):  # d |v|^-1 = -|v|^-3 (v . dv): one scaling of the tangents, no further division
        inverse = _chain(length2, inverse, -0.5 * inverse * (inverse * inverse))
    return (multiply(v[0], inverse), multiply(v[1], inverse), multiply(v[2], inverse))


def perpendicular_basis(t):
    """Unit vectors e1, e2 with (e1, e2, t) orthonormal, for a unit vector t (e1 = normalised t x axis,
    axis = z, or x where t is within ~25 degrees of z)."""
    use_z = dr.abs(value(t[2])) < 0.9
    axis = (dr.select(use_z, 0.0, 1.0), 0.0, dr.select(use_z, 1.0, 0.0))
    e1 = normalized(cross(t, axis))
    return e1, cross(t, e1)
