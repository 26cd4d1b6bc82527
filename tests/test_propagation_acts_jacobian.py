"""The ACTS-style transport Jacobian (``jacobian="acts"``: dB/dr neglected in the Runge-Kutta stages).

Exact in a uniform field; in the benchmark solenoid a small, measured deviation from the exact
derivative of the discrete steps; field-parameter derivatives kept; part of the frozen key.
"""
import drjit as dr
import numpy as np
import pytest
import torch

from pyhybrid.bench.propagate import HALF_LENGTH, RADII, SOLENOID, STEP, THICKNESS, workload
from pyhybrid.kernels import fields
from pyhybrid.kernels.propagation import PropagationOptions, propagate_path
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN
from pyhybrid.nn.propagator import Propagator, SolenoidField, UniformField, barrel
from test_propagation_support import F64, kernel_params

BENCH_LAYERS = barrel(RADII, half_length=HALF_LENGTH, thickness=THICKNESS)


def _jacobian(starts, field, mode, path=900.0, stepper=RK4(STEP)):
    options = PropagationOptions(stepper=stepper, transport_jacobian=mode)
    result = propagate_path(kernel_params(starts), field, path, options, jacobian=True)
    return np.array([[np.array(v) for v in row] for row in result.jacobian]).transpose(2, 0, 1)   # (N, 8, 8 + n)


def _opaque(values):
    return [dr.opaque(F64.Float, v) for v in values]


class _UniformAsIfVarying(fields.UniformField):
    """A uniform field for which the exact transport carries the position columns, as in a varying field."""
    spatially_constant = False


def test_acts_equals_exact_in_a_uniform_field():
    """In a uniform field the exact transport skips the position columns (dB/dr = 0): it equals the
    one that carries them, and the ACTS one."""
    starts = workload(50, "cpu", "float64").numpy()
    values = (0.1, -0.2, 2.0)
    for stepper in (RK4(STEP), AdaptiveRKN(tolerance=1e-6)):
        carried = _jacobian(starts, _UniformAsIfVarying(*_opaque(values)), "exact", stepper=stepper)
        for mode in ("exact", "acts"):
            jacobian = _jacobian(starts, fields.UniformField(*_opaque(values)), mode, stepper=stepper)
            np.testing.assert_allclose(jacobian, carried, rtol=1e-12, atol=1e-12 * np.abs(carried).max())
    prop = {mode: Propagator(UniformField((0.1, -0.2, 2.0), requires_grad=True), BENCH_LAYERS[:4], stepper=RK4(STEP),
                             trainable_positions=True, trainable_thickness=True, jacobian=mode)
            for mode in ("exact", "acts")}
    grads = {mode: _module_gradients(p, workload(20, "cpu", "float64")) for mode, p in prop.items()}
    for exact_grad, acts_grad in zip(grads["exact"], grads["acts"]):
        torch.testing.assert_close(acts_grad, exact_grad, rtol=1e-11, atol=1e-11 * exact_grad.abs().max().item())


def test_acts_jacobian_deviation_in_the_benchmark_solenoid():
    """Tracks from the origin, 900 mm through the 2 T solenoid (R 1.2 m, L 3 m): measured largest
    deviation per column 1.4e-3 of the column's scale (z position), 1e-4 - 1e-3 elsewhere."""
    starts = workload(200, "cpu", "float64").numpy()
    field = fields.SolenoidField(*_opaque(SOLENOID))
    exact, acts = _jacobian(starts, field, "exact"), _jacobian(starts, field, "acts")
    scale = np.abs(exact).max(axis=(0, 1))
    deviation = np.abs(acts - exact).max(axis=(0, 1)) / np.maximum(scale, 1e-300)
    assert deviation.max() < 3e-3
    assert deviation[[0, 1, 2, 4, 5, 6, 7]].min() > 1e-5      # non-zero: the field gradient does matter
    assert deviation[8:].max() < 5e-4                          # field-parameter columns (b0, R, L)


def _module_gradients(prop, params, *, with_field=True):
    prop.zero_grad()
    p = params.detach().clone().requires_grad_()
    out = prop(p)
    (out.local.square().sum() + out.path_length.sum()).backward()
    grads = [p.grad]
    if with_field:
        grads += [q.grad.reshape(-1) for q in (*prop.field.parameters(), prop.positions, prop.thickness)]
    return grads


def _bench_propagator(mode, **options):
    return Propagator(SolenoidField(*SOLENOID, requires_grad=True), BENCH_LAYERS, stepper=RK4(STEP),
                      trainable_positions=True, trainable_thickness=True, jacobian=mode, **options)


def test_acts_gradients_in_the_benchmark_solenoid_are_close_to_the_exact_ones():
    """Benchmark loss (sum of squared local coordinates and path lengths), 2000 tracks: measured
    relative deviation (largest difference / largest gradient) 4.2e-4 (tracks), 1.1e-3 (b0),
    6.8e-4 (R), 6.5e-4 (L), 9e-4 (thicknesses), 7e-10 (positions). (Summed gradients can cancel
    between tracks: at 500 tracks the thickness gradients are 400x smaller and deviate by 3e-2.)"""
    params = workload(2000, "cpu", "float64")
    exact, acts = (_module_gradients(_bench_propagator(mode), params) for mode in ("exact", "acts"))
    deviation = [((a - e).abs().max() / e.abs().max()).item() for e, a in zip(exact, acts)]
    tracks, b0, radius, half_length, positions, thickness = deviation
    assert 1e-5 < tracks < 1e-3
    assert max(b0, radius, half_length, thickness) < 3e-3 and min(b0, radius, half_length, thickness) > 1e-5
    assert positions < 1e-7     # dominated by the surface intersection, which is exact in both modes


@pytest.mark.parametrize("mode", ["exact", "acts"])
def test_field_parameter_gradients_match_finite_differences(mode):
    """Measured relative deviation from central differences: exact 2e-6, acts 3.3e-4 (b0),
    8e-5 (R, L): the level of the neglected dB/dr."""
    prop = Propagator(SolenoidField(*SOLENOID, requires_grad=True), BENCH_LAYERS[::3], stepper=RK4(STEP),
                      jacobian=mode)
    params = workload(40, "cpu", "float64")

    def loss():
        out = prop(params)
        return out.local.square().sum() + out.path_length.sum()

    loss().backward()
    analytic = torch.stack([prop.field.b0.grad, prop.field.radius.grad, prop.field.half_length.grad])
    numeric = []
    with torch.no_grad():
        for p in (prop.field.b0, prop.field.radius, prop.field.half_length):
            step = 1e-6 * abs(p.item())
            p += step
            up = loss().item()
            p -= 2 * step
            down = loss().item()
            p += step
            numeric.append((up - down) / (2 * step))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    deviation = ((analytic - numeric).abs() / numeric.abs()).max().item()
    if mode == "exact":
        assert deviation < 2e-5
    else:
        assert 2e-5 < deviation < 3e-3


@pytest.mark.parametrize("mode", ["exact", "acts"])
def test_one_column_for_q_over_p_and_b0_is_exact_also_without_field(mode):
    """B = b0 B^: q/p and b0 share one carried column, d/d(lambda b0); no division by b0 or q/p, so
    at b0 = 0 the q/p column of r and T is zero and the b0 column still matches finite differences."""
    starts = workload(3, "cpu", "float64").numpy()
    solenoid = (0.0, *SOLENOID[1:])
    jacobian = _jacobian(starts, fields.SolenoidField(*_opaque(solenoid)), mode, path=500.0)
    assert np.abs(jacobian[:, [0, 1, 2, 4, 5, 6], 7]).max() == 0      # no field: r, T independent of q/p

    def final(b0):
        options = PropagationOptions(stepper=RK4(STEP), transport_jacobian=mode)
        result = propagate_path(kernel_params(starts), fields.SolenoidField(*_opaque((b0, *SOLENOID[1:]))), 500.0,
                                options)
        return np.array([np.array(v) for v in result.final.columns()]).T

    numeric = (final(1e-4) - final(-1e-4)) / 2e-4
    np.testing.assert_allclose(jacobian[:, :, 8], numeric, rtol=1e-6, atol=1e-9 * np.abs(numeric).max())
    assert np.abs(numeric[:, :3]).max() > 1.0


def test_acts_mode_does_not_evaluate_the_field_gradient():
    class CountingSolenoid(fields.SolenoidField):
        calls = []

        def evaluate_with_derivatives(self, r, gradient=True):
            self.calls.append(gradient)
            return super().evaluate_with_derivatives(r, gradient)

    starts = workload(4, "cpu", "float64").numpy()
    field = CountingSolenoid(*_opaque(SOLENOID))
    options = PropagationOptions(stepper=RK4(STEP), transport_jacobian="acts")
    propagate_path(kernel_params(starts), field, 100.0, options, jacobian=True, field_gradient=False)
    assert CountingSolenoid.calls == []               # track gradients only: the value-only field
    propagate_path(kernel_params(starts), field, 100.0, options, jacobian=True)
    assert CountingSolenoid.calls and not any(CountingSolenoid.calls)    # parameter derivatives, no dB/dr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_acts_mode_frozen_equals_traced_and_is_keyed_apart_from_exact(dtype):
    params = workload(64, "cpu", "float64").to(dtype)
    frozen_exact = _module_gradients(_bench_propagator("exact").to(dtype), params)
    frozen_acts = _module_gradients(_bench_propagator("acts").to(dtype), params)
    traced_acts = _module_gradients(_bench_propagator("acts", freeze_kernels=False).to(dtype), params)
    for frozen, traced, exact in zip(frozen_acts, traced_acts, frozen_exact):
        assert torch.equal(frozen, traced)
        assert frozen.dtype == dtype and torch.isfinite(frozen).all()
    assert not torch.equal(frozen_acts[0], frozen_exact[0])   # not the exact mode's recording
    # float32 vs float64 acts gradients: float32 rounding only
    if dtype == torch.float32:
        reference = _module_gradients(_bench_propagator("acts"), params.double(), with_field=False)[0]
        assert ((frozen_acts[0].double() - reference).abs().max() / reference.abs().max()).item() < 1e-3


def test_bad_jacobian_option_names_the_argument():
    with pytest.raises(ValueError, match="jacobian must be one of"):
        Propagator(SolenoidField(), BENCH_LAYERS, jacobian="ACTS")
    with pytest.raises(ValueError, match="jacobian"):
        Propagator(SolenoidField(), BENCH_LAYERS, jacobian=None)
    with pytest.raises(ValueError, match="transport_jacobian"):
        PropagationOptions(transport_jacobian="approximate")
