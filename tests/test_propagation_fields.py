"""Magnetic fields: solenoid vs the exact current-sheet field, Maxwell, derivatives, field map."""
import drjit as dr
import numpy as np
import pytest
import torch
from scipy import integrate, special

from pyhybrid.kernels import fields
from pyhybrid.nn.propagator import _FIELD_LOOKUP, GridField, Propagator, barrel
from test_propagation_support import F64

B0, RADIUS, HALF_LENGTH = 2.0, 1200.0, 3000.0


def _point(x, y, z):
    return (F64.Float(x), F64.Float(y), F64.Float(z))


def _value(v):
    if v is None:
        return 0.0
    return float(v) if isinstance(v, float) else float(v[0])


def _current_sheet(rho, z):
    """Exact (B_rho, B_z) of a solenoidal current sheet (Biot-Savart: loops integrated over z'), unnormalised."""
    def loop(rho, dz):
        d = (RADIUS + rho) ** 2 + dz ** 2
        m = 4 * RADIUS * rho / d
        k, e = special.ellipk(m), special.ellipe(m)
        gap = (RADIUS - rho) ** 2 + dz ** 2
        bz = (k + (RADIUS ** 2 - rho ** 2 - dz ** 2) / gap * e) / np.sqrt(d)
        br = 0.0 if rho == 0 else dz / (rho * np.sqrt(d)) * (-k + (RADIUS ** 2 + rho ** 2 + dz ** 2) / gap * e)
        return br, bz
    return tuple(integrate.quad(lambda zp: loop(rho, z - zp)[i], -HALF_LENGTH, HALF_LENGTH, limit=200,
                                epsabs=1e-13)[0] for i in range(2))


def test_solenoid_matches_exact_current_sheet_inside_tracker_volume():
    field = fields.SolenoidField(F64.Float(B0), F64.Float(RADIUS), F64.Float(HALF_LENGTH))
    scale = B0 / _current_sheet(0.0, 0.0)[1]
    # (rho, z, tolerance on |B_model - B_exact| / B0): exact on the axis, paraxial off it
    for rho, z, tol in [(0, 0, 1e-12), (0, 2800, 1e-12), (0, 4500, 1e-12), (300, 0, 2e-5), (300, 2500, 1e-3),
                        (300, 3200, 2e-3), (600, 0, 3e-4), (600, 2900, 2e-2)]:
        br, bz = (scale * b for b in _current_sheet(rho, z))
        b = field.evaluate(_point(rho, 0.0, z))
        assert abs(_value(b[1])) < 1e-14
        deviation = np.hypot(_value(b[0]) - br, _value(b[2]) - bz) / B0
        assert deviation < tol, (rho, z, deviation)
    centre = field.evaluate(_point(0.0, 0.0, 0.0))
    assert _value(centre[2]) == pytest.approx(B0, rel=1e-14)


def _fd_gradient(field, point, eps=1e-3):
    rows = np.zeros((3, 3))
    for j in range(3):
        up, down = list(point), list(point)
        up[j] += eps
        down[j] -= eps
        bu, bd = field.evaluate(_point(*up)), field.evaluate(_point(*down))
        rows[:, j] = [(_value(a) - _value(b)) / (2 * eps) for a, b in zip(bu, bd)]
    return rows


def test_solenoid_is_curl_free_and_divergence_is_the_paraxial_remainder():
    """curl B = 0 exactly; div B = -rho^2/4 b3(z) (b3: third z-derivative on the axis), the neglected order."""
    field = fields.SolenoidField(F64.Float(B0), F64.Float(RADIUS), F64.Float(HALF_LENGTH))

    def on_axis(z):
        return _value(field.evaluate(_point(0.0, 0.0, z))[2])

    for point in [(150.0, -230.0, 2700.0), (400.0, 100.0, -3100.0), (50.0, 80.0, 0.0)]:
        g = _fd_gradient(field, point)
        curl = [g[2, 1] - g[1, 2], g[0, 2] - g[2, 0], g[1, 0] - g[0, 1]]
        assert np.abs(curl).max() < 1e-9
        h, z = 20.0, point[2]
        b3 = (on_axis(z + 2 * h) - 2 * on_axis(z + h) + 2 * on_axis(z - h) - on_axis(z - 2 * h)) / (2 * h ** 3)
        remainder = -(point[0] ** 2 + point[1] ** 2) / 4 * b3
        assert np.trace(g) == pytest.approx(remainder, rel=0.02, abs=1e-10)


@pytest.mark.parametrize("kind", ["uniform", "solenoid", "grid"])
def test_field_derivatives_match_finite_differences(kind):
    if kind == "uniform":
        params = [0.3, -0.2, 2.0]
        make = lambda p: fields.UniformField(*[dr.opaque(F64.Float, v) for v in p])
    elif kind == "solenoid":
        params = [B0, RADIUS, HALF_LENGTH]
        make = lambda p: fields.SolenoidField(*[dr.opaque(F64.Float, v) for v in p])
    else:
        values = _random_map()
        params = [1.3]
        make = lambda p: fields.GridField(values, (5, 4, 6), (-200.0, -150.0, -500.0), (100.0, 100.0, 200.0),
                                          dr.opaque(F64.Float, p[0]))
    point = (150.0, -130.0, 270.0) if kind == "grid" else (150.0, -230.0, 2700.0)
    field = make(params)
    _, gradient, parameter_derivatives = field.evaluate_with_derivatives(_point(*point))
    analytic = np.array([[_value(gradient[i][j]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(analytic, _fd_gradient(field, point), rtol=1e-6, atol=1e-12)
    # the per-lane factor the stepper folds into the field (lambda = c q/p): scale * B, lanewise
    scale = F64.Float([-0.7, 2.5])
    scaled = field.evaluate(tuple(F64.Float([c, c]) for c in point), scale=scale)
    plain = field.evaluate(_point(*point))
    np.testing.assert_allclose([np.array(v) for v in scaled], [[-0.7 * _value(v), 2.5 * _value(v)] for v in plain],
                               rtol=1e-15, atol=0)
    for g, name in enumerate(field.names):
        step = 1e-5 * max(1.0, abs(params[g]))
        up, down = list(params), list(params)
        up[g] += step
        down[g] -= step
        bu, bd = make(up).evaluate(_point(*point)), make(down).evaluate(_point(*point))
        fd = [(_value(a) - _value(b)) / (2 * step) for a, b in zip(bu, bd)]
        np.testing.assert_allclose([_value(v) for v in parameter_derivatives[g]], fd, rtol=1e-6, atol=1e-12,
                                   err_msg=name)


def _random_map():
    rng = np.random.default_rng(3)
    return tuple(F64.Float(rng.normal(size=5 * 4 * 6)) for _ in range(3))


def test_grid_reproduces_a_linear_field_and_is_zero_outside():
    shape, origin, spacing = (4, 5, 6), (-150.0, -200.0, -250.0), (100.0, 100.0, 100.0)
    nodes = np.stack(np.meshgrid(*[o + s * np.arange(n) for n, o, s in zip(shape, origin, spacing)],
                                 indexing="ij"), axis=-1).reshape(-1, 3)
    linear = np.array([[1e-3, 2e-4, 0.0], [0.0, -1e-3, 5e-4], [3e-4, 0.0, 2e-3]])
    offset = np.array([0.1, -0.2, 2.0])
    values = nodes @ linear.T + offset
    field = fields.GridField([F64.Float(values[:, c]) for c in range(3)], shape, origin, spacing)
    rng = np.random.default_rng(0)
    inside = rng.uniform([-150, -200, -250], [150, 200, 250], size=(50, 3))
    b = field.evaluate(tuple(F64.Float(inside[:, i]) for i in range(3)))
    np.testing.assert_allclose(np.array([np.array(c) for c in b]).T, inside @ linear.T + offset, atol=1e-12)
    outside = field.evaluate(_point(0.0, 0.0, 300.0))
    assert all(_value(c) == 0.0 for c in outside)


def test_field_map_module_is_differentiable_in_values_scale_and_points():
    values = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    grid = GridField(values, origin=(-100.0, -150.0, -100.0), spacing=(100.0, 100.0, 100.0),
                     trainable_values=True, trainable_scale=True)
    points = (torch.rand(6, 3, dtype=torch.float64) * torch.tensor([190.0, 290.0, 190.0]) -
              torch.tensor([95.0, 145.0, 95.0])).requires_grad_()

    def lookup(v, scale, p):
        return _FIELD_LOOKUP(p, v, scale.reshape(1), grid=grid)

    v = grid.values.detach().clone().requires_grad_()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lookup, (v, scale, points), eps=1e-6, atol=1e-8, fast_mode=True)
    b = grid(points)
    b.sum().backward()
    assert grid.values.grad is not None and grid.values.grad.abs().sum() > 0
    assert points.grad is not None and torch.isfinite(points.grad).all()
    with pytest.warns(UserWarning, match="does not differentiate with respect to the map values"):
        Propagator(grid, barrel([50.0], half_length=100.0))


def test_field_map_rejects_bad_input():
    with pytest.raises(ValueError, match="values must have shape"):
        GridField(torch.zeros(4, 4, 3), origin=(0, 0, 0), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        GridField(torch.zeros(2, 2, 2, 3), origin=(0, 0, 0), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="points must have shape"):
        GridField(torch.zeros(2, 2, 2, 3), origin=(0, 0, 0), spacing=(1, 1, 1))(torch.zeros(4, 2))


def test_field_map_empty_batch_and_dtype_errors():
    grid = GridField(torch.rand(3, 3, 3, 3, dtype=torch.float64), origin=(0, 0, 0), spacing=(1, 1, 1),
                     trainable_values=True)
    out = grid(torch.zeros(0, 3, dtype=torch.float64))
    assert out.shape == (0, 3)
    out.sum().backward()
    assert grid.values.grad is not None and not grid.values.grad.any()
    for dtype in (torch.float16, torch.int64):
        with pytest.raises(TypeError, match="points must have dtype torch.float32 or torch.float64"):
            grid(torch.zeros(2, 3, dtype=dtype))
