"""Multi-dual numbers (pyhybrid.kernels.dual): tangents against central finite differences in float64,
and values bit-equal to the same expression on plain arrays (the propagation relies on it: its outputs
are the same with and without Jacobians)."""
import numpy as np
import pytest

import drjit as dr
from drjit.llvm.ad import Float64

from pyhybrid.kernels import dual as dm

rng = np.random.default_rng(7)
N_COLUMNS = 3
# Each input depends on the columns through a random linear map; one input is constant in column 1
# (a structural zero) and column 2 has a constant (Python float) tangent in the first input.
POINT = rng.uniform(0.5, 2.0, size=(3, 4))            # three 3-vectors: rows are inputs, plus a scalar
DIRECTIONS = rng.normal(size=(4, N_COLUMNS))           # d input / d column


def _inputs(column=None, step=0.0, duals=True):
    """Three rows of 4 inputs, two lanes each (POINT and 0.9 POINT), moved by ``step`` along ``column``.
    Input k of row i has tangent (1 + i) DIRECTIONS[k, j] in column j, except: input 1 none in
    column 1 (a structural zero), input 0 the constant 0.5 in column 2 (a Python float tangent)."""
    out = []
    for i in range(POINT.shape[0]):
        row = []
        for k in range(4):
            tangents = [(1 + i) * DIRECTIONS[k, j] for j in range(N_COLUMNS)]
            if k == 1:
                tangents[1] = None
            if k == 0:
                tangents[2] = 0.5
            shift = 0.0 if column is None or tangents[column] is None else step * tangents[column]
            value = Float64(POINT[i, k] + shift, 0.9 * POINT[i, k] + shift)
            if duals:
                value = dm.Dual(value, [t if t is None or k == 0 and j == 2 else Float64(t, t)
                                        for j, t in enumerate(tangents)])
            row.append(value)
        out.append(row)
    return out


CASES = {
    "mul": lambda a, b, c: [dm.multiply(a[0], a[1]), dm.multiply(a[1], b[2])],
    "div": lambda a, b, c: [a[0] / a[1], a[2] / b[3]],
    "rdiv": lambda a, b, c: [1.5 / a[2]],
    "dot": lambda a, b, c: [dm.dot(a[:3], b[:3])],
    "cross": lambda a, b, c: list(dm.cross(a[:3], b[:3])),
    "cross, plain on one side": lambda a, b, c: list(dm.cross(a[:3], (0.3, -1.2, 0.7))),
    "normalized": lambda a, b, c: list(dm.normalized(a[:3])),
    "atan2": lambda a, b, c: [dm.atan2(a[1], a[2])],
    "sqrt, log, exp": lambda a, b, c: [dm.sqrt(a[3]), dm.log(b[0]), dm.exp(c[1])],
    "select": lambda a, b, c: [dm.select(dm.value(a[0]) > 1.2, a[1], b[2])],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tangents_match_finite_differences(name):
    function = CASES[name]
    results = function(*_inputs())
    step = 1e-6
    for column in range(N_COLUMNS):
        plus = function(*_inputs(column, step, duals=False))
        minus = function(*_inputs(column, -step, duals=False))
        for result, p, m in zip(results, plus, minus):
            numeric = (np.array(p) - np.array(m)) / (2 * step)
            tangent = dm.tangent(result, column)
            analytic = np.zeros(2) if tangent is None else np.array(tangent + 0.0 * dm.value(result))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-8, err_msg=f"{name}, column {column}")


@pytest.mark.parametrize("name", sorted(set(CASES) - {"div", "rdiv"}))
def test_values_equal_plain_arithmetic(name):
    """(A Dual quotient is the numerator times the reciprocal: it may differ from a division in the last bit.)"""
    function = CASES[name]
    with_tangents = [np.array(dm.value(r)) for r in function(*_inputs())]
    plain = [np.array(r) for r in function(*_inputs(duals=False))]
    for a, b in zip(with_tangents, plain):
        assert np.array_equal(a, b), name


def test_structural_zeros_stay_none():
    a, b, _ = _inputs()
    product = dm.multiply(a[1], dm.Dual(Float64(2.0), [None] * N_COLUMNS))
    assert product.tangents[1] is None
    assert dm.dot((a[1], a[1], a[1]), (1.0, 2.0, 3.0)).tangents[1] is None
    assert dm.cross((a[1],) * 3, (b[1],) * 3)[0].tangents[1] is None
