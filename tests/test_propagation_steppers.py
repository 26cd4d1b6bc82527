"""Steppers: analytic helix, 4th-order convergence of RK4, the adaptive stepper's tolerance."""
import math

import numpy as np
import pytest

from pyhybrid.kernels import fields
from pyhybrid.kernels.propagation import REACHED, PropagationOptions, propagate_path
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN
from test_propagation_support import F64, helix, kernel_params, numpy_columns

BZ = 2.0
# (x, y, z, t, dx, dy, dz, q/p): positive, negative, low momentum, neutral, displaced and steep
STARTS = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.3, 1.0],
                   [0.0, 0.0, 0.0, 0.0, 0.6, 0.8, -0.2, -1.0],
                   [5.0, -3.0, 10.0, 1.0, 0.0, 1.0, 0.5, 2.5],
                   [1.0, 2.0, 3.0, 0.0, 0.3, 0.4, 0.5, 0.0],
                   [0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 1.0, -0.7]])


def _final_positions(stepper, path, starts=STARTS):
    field = fields.UniformField(F64.Float(0.0), F64.Float(0.0), F64.Float(BZ))
    result = propagate_path(kernel_params(starts), field, path, PropagationOptions(stepper=stepper))
    assert (np.array(result.status) == REACHED).all()
    return result, numpy_columns(result.final.columns()).T


def _position_errors(final, path, starts=STARTS):
    return np.array([np.linalg.norm(final[i, :3] - helix(np.r_[start[:3], start[4:7]], start[7], BZ, path)[0])
                     for i, start in enumerate(starts)])


def test_rk4_follows_the_analytic_helix():
    path = 2000.0
    result, final = _final_positions(RK4(5.0), path)
    assert _position_errors(final, path).max() < 1e-6
    for i, start in enumerate(STARTS):
        _, direction = helix(np.r_[start[:3], start[4:7]], start[7], BZ, path)
        np.testing.assert_allclose(final[i, 4:7], direction, atol=1e-9)
        assert np.linalg.norm(final[i, 4:7]) == pytest.approx(1.0, abs=1e-12)
        # t advances by path * E / (p c); a neutral track (q/p = 0) moves at the speed of light
        mass = 0.1056583755
        beta_inverse = math.sqrt(1.0 + (mass * start[7]) ** 2)
        assert final[i, 3] == pytest.approx(start[3] + path * beta_inverse / 299.792458, rel=1e-12)
        assert final[i, 7] == start[7]
    assert np.array(result.steps)[0] == 400


def test_rk4_position_error_converges_at_fourth_order():
    path = 3000.0
    starts = STARTS[:3]
    errors = [_position_errors(_final_positions(RK4(h), path, starts)[1], path, starts).max()
              for h in (150.0, 75.0, 37.5)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 1e-3
    assert np.all((orders > 3.7) & (orders < 4.3)), (errors, orders)


def test_adaptive_stepper_meets_its_tolerance():
    path = 3000.0
    errors = {}
    for tolerance in (1e-3, 1e-6):
        result, final = _final_positions(AdaptiveRKN(tolerance=tolerance, initial_step=500.0), path)
        max_error = np.array(result.max_error)
        steps = np.array(result.steps)
        assert np.all(max_error <= tolerance)          # every accepted step met the local tolerance
        global_error = _position_errors(final, path)
        assert np.all(global_error <= steps * tolerance)
        errors[tolerance] = global_error.max()
    assert errors[1e-6] < 0.01 * errors[1e-3]


def test_bad_stepper_settings_are_rejected():
    with pytest.raises(ValueError, match="step_size must be a positive length"):
        RK4(0.0)
    with pytest.raises(ValueError, match="tolerance must be positive"):
        AdaptiveRKN(tolerance=-1.0)
    with pytest.raises(ValueError, match="min_step .* must not exceed max_step"):
        AdaptiveRKN(min_step=10.0, max_step=1.0)
    field = fields.UniformField(0.0, 0.0, 2.0)
    with pytest.raises(ValueError, match="path_length must be positive"):
        propagate_path(kernel_params(STARTS[:1]), field, -1.0, PropagationOptions())
