"""Forward-mode transport Jacobians vs finite differences, gradcheck through the torch module, covariance."""
import drjit as dr
import numpy as np
import pytest
import torch

from pyhybrid.kernels import fields
from pyhybrid.kernels.propagation import PropagationOptions, propagate_path
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN
from pyhybrid.nn.propagator import _PROPAGATE, _propagate_kernel, DiskLayer, GridField, Propagator, SolenoidField, barrel
from test_propagation_support import F64, kernel_params, numpy_columns

SOLENOID = (2.0, 1200.0, 1500.0)
# tracks crossing the solenoid's fringe field (its coil ends at z = 1500 mm)
STARTS = np.array([[10.0, -5.0, 1000.0, 0.5, 0.6, 0.5, 0.62, 1 / 1.5],
                   [0.0, 20.0, 1200.0, 0.0, -0.3, 0.2, 0.9, -1 / 0.8]])


def _transport(starts, solenoid, stepper, jacobian=False):
    # opaque: a literal would be compiled into the kernel (a new kernel for every finite-difference step)
    field = fields.SolenoidField(*[dr.opaque(F64.Float, v) for v in solenoid])
    result = propagate_path(kernel_params(starts), field, 1200.0, PropagationOptions(stepper=stepper),
                            jacobian=jacobian)
    final = numpy_columns(result.final.columns()).T
    if jacobian:
        return final, np.array([[np.array(v) for v in row] for row in result.jacobian]).transpose(2, 0, 1)
    return final


@pytest.mark.parametrize("stepper", [RK4(5.0), AdaptiveRKN(tolerance=1e-7)], ids=["rk4", "adaptive-rkn"])
def test_transport_jacobian_matches_finite_differences(stepper):
    final, jac = _transport(STARTS, SOLENOID, stepper, jacobian=True)       # (N, 8, 8 + 3)
    np.testing.assert_allclose(final, _transport(STARTS, SOLENOID, stepper), rtol=1e-14, atol=1e-12)
    fd = np.zeros_like(jac)
    for j in range(8):
        step = 1e-6 * max(1.0, np.abs(STARTS[:, j]).max())
        up, down = STARTS.copy(), STARTS.copy()
        up[:, j] += step
        down[:, j] -= step
        fd[:, :, j] = (_transport(up, SOLENOID, stepper) - _transport(down, SOLENOID, stepper)) / (2 * step)
    for g in range(3):
        step = 1e-6 * SOLENOID[g]
        up, down = list(SOLENOID), list(SOLENOID)
        up[g] += step
        down[g] -= step
        fd[:, :, 8 + g] = (_transport(STARTS, up, stepper) - _transport(STARTS, down, stepper)) / (2 * step)
    # inputs are normalised: the Jacobian's direction columns are for variations perpendicular to it
    for i, start in enumerate(STARTS):
        t = start[4:7] / np.linalg.norm(start[4:7])
        jac[i, :, 4:7] = jac[i, :, 4:7] @ (np.eye(3) - np.outer(t, t)) / np.linalg.norm(start[4:7])
    scale = np.abs(fd).max(axis=(0, 1), keepdims=True) + 1e-12
    assert np.abs(jac - fd).max(axis=(0, 1)).max() < 1e-4
    assert (np.abs(jac - fd) / scale).max() < 2e-6
    assert np.abs(fd[:, :3, 8:]).max() > 1.0        # the field parameters do move the track


# A helix whose transverse circle is centred on the z axis: radius rho = 500 mm in the 2 T solenoid,
# p_T = c B rho = 0.2998 GeV, with the charge that turns it towards the axis.
_LOOPER_PT = 0.299792458e-3 * 2.0 * 500.0
ROTATION_STARTS = np.array([
    [10.0, -5.0, 100.0, 0.0, 0.6, 0.5, 0.62, 1 / 1.5],     # generic: D1 solved for
    [300.0, 40.0, 0.0, 0.0, -0.3, 0.8, 0.1, -1 / 0.7],      # off the origin, generic
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1 / 2.0],          # along the axis: the rotation moves nothing
    [20.0, 0.0, 0.0, 0.0, 0.01, 0.0, 1.0, 1 / 2.0],        # nearly along z
    [500.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1 / _LOOPER_PT],  # the looper: rotation = shift along it
    [0.0, 0.0, 0.0, 0.0, 0.05, 0.43, 0.9, 1 / 2.0],        # 26 degrees from z: e1 from the x axis, D2 solved
])


def _with_rotation_relation(solve, function):
    from pyhybrid.kernels import propagation

    propagation.ROTATION_RELATION = solve
    try:
        return function()
    finally:
        propagation.ROTATION_RELATION = True


def test_the_rotation_relation_gives_the_stepped_jacobian_and_steps_where_it_cannot():
    """In the axially symmetric solenoid one direction column follows from the rotation about z
    (propagation._RotationRelation); where both coefficients are small (directions near z, a helix
    centred on the axis) a second loop steps it. Both give the Jacobian of stepping every column."""
    from pyhybrid.kernels import propagation

    field = fields.SolenoidField(*[dr.opaque(F64.Float, v) for v in SOLENOID])
    params = kernel_params(ROTATION_STARTS)
    direction = tuple(v / dr.norm(params.direction) for v in params.direction)
    start = propagation._SegmentStart.of(field, params.position, direction, 0.299792458e-3 * params.qop,
                                         PropagationOptions(), False)
    assert start.rotation is not None
    assert np.array(start.rotation.stepped).tolist() == [False, False, True, True, True, False]
    assert np.array(start.rotation.solve_second).tolist()[-1]  # |c1| = 0.05 there, |c2| = 0.43
    jacobians = [_with_rotation_relation(solve, lambda: _transport(ROTATION_STARTS, SOLENOID, RK4(5.0),
                                                                    jacobian=True)[1])
                 for solve in (True, False)]
    scale = np.abs(jacobians[1]).max(axis=(0, 1), keepdims=True) + 1e-12
    assert (np.abs(jacobians[0] - jacobians[1]) / scale).max() < 1e-11
    assert np.abs(jacobians[1][:, :3, 4:7]).max() > 100.0  # direction columns that matter


def test_the_rotation_relation_through_layers_in_both_precisions():
    """Propagator gradients (track, field, layer parameters) with a direction column solved for equal
    those with every column stepped: to 1e-10 in float64; in float32 both stay within 1e-4 of the float64 ones. Four
    tracks from the origin need D1 stepped (the second loop): three within 11 degrees of the z axis
    (sin theta < 0.2) and a curler (p_T = 60 MeV, transverse radius 100 mm) whose second segment
    starts at R = 141 mm, close to sqrt(2) times it (c ~ 1 - R^2 / (2 rho^2) ~ 0). A fifth, 26
    degrees from z, solves for D2 (its e1 is built from the x axis)."""
    tracks = _tracks(64, 5)
    directions = torch.tensor([[0.19, 0.0, 0.982], [0.0, -0.15, -0.989], [0.1, 0.1, 0.99], [0.6, 0.8, 0.0],
                               [0.05, 0.43, 0.9]])
    tracks[:5, :3] = 0.0
    tracks[:5, 4:7] = directions / directions.norm(dim=1, keepdim=True)
    tracks[3, 7] = 1 / 0.06
    tracks[5:9, 7] = torch.tensor([3.0, -3.0, 2.5, -2.5])  # p ~ 0.35 GeV: curling in 2 T

    def gradients(dtype):
        prop = Propagator(SolenoidField(2.0, 1200.0, 1500.0, requires_grad=True),
                          barrel([40.0, 141.0, 300.0], half_length=1400.0), trainable_positions=True,
                          trainable_thickness=True, freeze_kernels=False).to(dtype)
        params = tracks.to(dtype).clone().requires_grad_()
        out = prop(params)
        assert out.valid[:5, :2].all()  # the special tracks hit the first two layers
        (out.local.square().sum() + out.path_length.sum() + out.free.square().sum()).backward()
        return torch.cat([params.grad.flatten(), *(p.grad.flatten() for p in prop.parameters())]).double()

    solved, stepped = (_with_rotation_relation(solve, lambda: gradients(torch.float64)) for solve in (True, False))
    scale = stepped.abs().max()
    assert ((solved - stepped).abs() / scale).max() < 1e-10
    for solve in (True, False):
        single = _with_rotation_relation(solve, lambda: gradients(torch.float32))
        assert ((single - stepped).abs() / scale).max() < 1e-4


def _tracks(n, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    eta = torch.empty(n, dtype=dtype).uniform_(-1.2, 1.2, generator=generator)
    phi = torch.empty(n, dtype=dtype).uniform_(-3.0, 3.0, generator=generator)
    pt = torch.empty(n, dtype=dtype).uniform_(0.7, 3.0, generator=generator)
    theta = 2 * torch.atan(torch.exp(-eta))
    direction = torch.stack([torch.cos(phi) * torch.sin(theta), torch.sin(phi) * torch.sin(theta), torch.cos(theta)], 1)
    qop = torch.where(torch.rand(n, generator=generator, dtype=dtype) < 0.5, -1.0, 1.0) * torch.sin(theta) / pt
    vertex = 0.1 * torch.randn(n, 3, generator=generator, dtype=dtype)
    return torch.cat([vertex, torch.zeros(n, 1, dtype=dtype), direction, qop[:, None]], 1)


def _call(prop, params, field_params, positions, thickness, seed):
    """The propagator's autograd function with every input explicit (free, local, path length)."""
    outputs = _PROPAGATE(params, field_params, positions, thickness, layers=prop.kernel_layers, options=prop.options,
                         field=prop.field.kernel_field(params.device, params.dtype), jacobian=True,
                         seed=seed, with_covariance=False, field_gradient=True, layer_gradient=True)
    return outputs[:3]


LAYERS = barrel([40.0, 90.0, 160.0], half_length=[300.0, 400.0, 500.0], thickness=0.5) + \
    [DiskLayer(z=600.0, r_min=20.0, r_max=700.0, thickness=0.4)]


def _forward_tracks(n, seed):
    params = _tracks(n, seed)
    params[:n // 2, 6] = params[:n // 2, 6].abs() + 0.3      # half of them forward, towards the disk
    return params


def test_dr_jit_ad_through_the_stepping_loop_is_refused_with_a_pointer_to_the_jacobians():
    params = kernel_params(STARTS)
    dr.enable_grad(params.qop)
    with pytest.raises(ValueError, match="use jacobian=True"):
        _ = propagate_path(params, fields.SolenoidField(*SOLENOID), 100.0, PropagationOptions(stepper=RK4(10.0)))
    b0 = F64.Float(2.0)
    dr.enable_grad(b0)
    with pytest.raises(ValueError, match="must not have Dr.Jit gradients enabled"):
        _ = propagate_path(kernel_params(STARTS), fields.SolenoidField(b0, 1200.0, 1500.0), 100.0,
                           PropagationOptions(stepper=RK4(10.0)))


def test_gradcheck_through_the_propagator_wrt_tracks_field_and_detector():
    prop = Propagator(SolenoidField(*SOLENOID), LAYERS, stepper=RK4(10.0), scattering="sample")
    params = _forward_tracks(4, seed=1).requires_grad_()
    inputs = (params, torch.tensor(SOLENOID, dtype=torch.float64, requires_grad=True),
              prop.positions.detach().clone().requires_grad_(), prop.thickness.detach().clone().requires_grad_())
    outputs = _call(prop, *[t.detach() for t in inputs], seed=3)
    valid = outputs[2].reshape(4, 4) != 0
    assert valid.any(dim=0).all() and not valid.all()      # every layer hit by some track, some misses
    # fast mode: random projections u^T J v of every output and input block (the full Jacobian
    # is compared with finite differences in the tests around this one)
    assert torch.autograd.gradcheck(lambda *x: _call(prop, *x, seed=3), inputs, eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


def test_module_gradients_match_finite_differences_for_trainable_geometry_and_field():
    prop = Propagator(SolenoidField(*SOLENOID, requires_grad=True), LAYERS, trainable_positions=True,
                      trainable_thickness=True, stepper=RK4(10.0), scattering="sample")
    params = _forward_tracks(6, seed=2)
    target = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss():
        out = prop(params, seed=11)
        return (((out.local - target) ** 2).sum(-1) * out.valid).sum() + out.path_length.sum() * 1e-3

    loss().backward()
    parameters = [prop.field.b0, prop.field.radius, prop.field.half_length, prop.positions, prop.thickness]
    analytic = torch.cat([p.grad.reshape(-1) for p in parameters])
    numeric = []
    with torch.no_grad():
        for p in parameters:
            flat = p.data.view(-1)
            for i in range(flat.numel()):
                step = 1e-6 * max(1.0, abs(flat[i].item()))
                flat[i] += step
                up = loss().item()
                flat[i] -= 2 * step
                down = loss().item()
                flat[i] += step
                numeric.append((up - down) / (2 * step))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert analytic[:-1].abs().min() > 0       # (the last layer's material acts on nothing downstream)


def test_gradients_through_a_field_map():
    """Propagation in a grid map of the solenoid: gradients wrt tracks and the map scale (dB/dr of the interpolation)."""
    axes = [torch.linspace(-800.0, 800.0, 17, dtype=torch.float64)] * 2 + \
        [torch.linspace(-1000.0, 1000.0, 11, dtype=torch.float64)]
    nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    solenoid = fields.SolenoidField(F64.Float(2.0), F64.Float(1200.0), F64.Float(1500.0))
    b = solenoid.evaluate(tuple(F64.Float(nodes[:, i].numpy()) for i in range(3)))
    values = torch.stack([torch.tensor(np.array(c)) for c in b], -1).reshape(17, 17, 11, 3)
    grid = GridField(values, origin=(-800.0, -800.0, -1000.0), spacing=(100.0, 100.0, 200.0), trainable_scale=True)
    prop = Propagator(grid, barrel([60.0, 200.0, 500.0], half_length=900.0, material=None, thickness=0.0),
                      stepper=RK4(10.0))
    params = _tracks(3, seed=4).requires_grad_()
    scale = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)

    def run(params, scale, positions, thickness):
        return _PROPAGATE(params, scale, positions, thickness, layers=prop.kernel_layers, options=prop.options,
                          field=grid.kernel_field(params.device, params.dtype), jacobian=True, seed=0,
                          with_covariance=False, field_gradient=True, layer_gradient=True)[:3]

    # atol 1e-4: the position column along the track follows from the flow property of the exact
    # trajectory; RK4 steps across the kinks of a trilinear map deviate from it at the 1e-5 level
    assert torch.autograd.gradcheck(run, (params, scale, prop.positions.detach(), prop.thickness.detach()),
                                    eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)
    # the map reproduces the analytic field closely: hits agree to well below a millimetre
    exact = Propagator(SolenoidField(2.0, 1200.0, 1500.0), barrel([60.0, 200.0, 500.0], half_length=900.0,
                                                                  material=None, thickness=0.0), stepper=RK4(10.0))
    with torch.no_grad():
        assert (prop(params).local - exact(params).local).abs().max() < 0.5


def test_covariance_transport_equals_j_c_jt_of_the_vjp_jacobian():
    prop = Propagator(SolenoidField(*SOLENOID, requires_grad=True),
                      barrel([60.0, 200.0], half_length=800.0, material=None, thickness=0.0), stepper=RK4(10.0))
    params = _tracks(2, seed=6)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 8, 8)) * np.array([0.1, 0.1, 1.0, 0.01, 1e-3, 1e-3, 1e-3, 1e-3])
    cov0 = torch.tensor(a @ a.transpose(0, 2, 1))
    with torch.no_grad():
        out = prop(params, cov0)
    jac = torch.autograd.functional.jacobian(lambda p: prop(p).local, params)    # (2, L, 2, 2, 8), from J^T g
    for i in range(2):
        for k in range(2):
            jk = jac[i, k, :, i]
            torch.testing.assert_close(out.local_covariance[i, k], jk @ cov0[i] @ jk.T, rtol=1e-7, atol=1e-12)


def test_stored_jacobians_do_not_grow_with_the_number_of_steps():
    """Memory O(tracks x layers): ten times more steps to the second layer, the same stored derivatives."""
    prop = Propagator(SolenoidField(*SOLENOID), barrel([60.0, 200.0], half_length=800.0, material=None, thickness=0.0),
                      stepper=RK4(10.0))
    params = torch.tensor([[0, 0, 0, 0, 1.0, 0.2, 0.1, 0.2]] * 3, dtype=torch.float64)
    stored, path = [], []
    for radius in (150.0, 1500.0):
        # from torch tensors, as the engine passes them (the same compiled kernels as the test above)
        inputs = [F64.Float(params[:, j].contiguous()) for j in range(8)], \
            F64.Float(torch.tensor(SOLENOID, dtype=torch.float64)), \
            F64.Float(torch.tensor([60.0, radius], dtype=torch.float64)), F64.Float(torch.zeros(2, dtype=torch.float64))
        outputs, record = _propagate_kernel(*inputs, layers=prop.kernel_layers, options=prop.options,
                                            field=prop.field.kernel_field("cpu", torch.float64),
                                            jacobian=True, seed=0, with_covariance=False, field_gradient=True,
                                            layer_gradient=True)
        assert np.array(outputs[3].array).reshape(2, 3)[1].all()  # layer-major (L, N) rows (all of them in use)
        arrays = [t for k in range(len(record.hit)) for row in record.rows(k) for t in row if t is not None]
        stored.append(sum(1 if isinstance(t, float) else dr.width(t) for t in arrays))
        path.append(np.array(outputs[2].array).reshape(2, 3)[1, 0])
    assert path[1] > 10 * path[0] and stored[0] == stored[1]
