"""Frozen kernels (dr.freeze) in the Propagator: replayed calls give exactly the results of traced ones.

Every comparison is against a Propagator with ``freeze_kernels=False`` (the kernels traced on every
call), bit for bit: on the CPU both run the same compiled kernels.
"""
import copy

import drjit as dr
import pytest
import torch

from pyhybrid.nn import propagator as prop_module
from pyhybrid.nn.propagator import (AdaptiveRKN, DiskLayer, GridField, PlaneLayer, Propagator, RK4, SolenoidField,
                                    UniformField, barrel, free_parameters, _PROPAGATE)

LAYERS = barrel([40.0, 100.0, 250.0], half_length=[300.0, 500.0, 800.0], thickness=0.3) + \
    [DiskLayer(z=900.0, r_min=30.0, r_max=700.0, thickness=0.3)]
FIELDS = ("free", "local", "path_length", "valid", "covariance", "local_covariance")


def _params(n, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    momentum = torch.randn(n, 3, generator=generator, dtype=dtype) * torch.tensor([2.0, 2.0, 1.5], dtype=dtype)
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return free_parameters(0.05 * torch.randn(n, 3, generator=generator, dtype=dtype), momentum, charge)


def _pair(field, layers=LAYERS, **options):
    """The same propagator frozen and traced (deep copies: parameters are not shared)."""
    frozen = Propagator(field, layers, **options)
    return frozen, Propagator(copy.deepcopy(field), layers, freeze_kernels=False, **options)


def _assert_identical(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), f"{name}: max difference {(x.double() - y.double()).abs().max().item()}"


def _grid():
    coords = torch.stack(torch.meshgrid(torch.linspace(-900, 900, 10), torch.linspace(-900, 900, 10),
                                        torch.linspace(-1000, 1000, 6), indexing="ij"), -1).double()
    b = torch.stack([1e-4 * coords[..., 1], -1e-4 * coords[..., 0], 2.0 + 1e-4 * coords[..., 2]], -1)
    return GridField(b, origin=(-900.0, -900.0, -1000.0), spacing=(200.0, 200.0, 400.0))


GRADIENT_LAYERS = LAYERS[1:2] + LAYERS[3:]   # a cylinder and the disk: small Jacobian kernels to compile


def _recordings(prop: Propagator):
    """Recordings of the forward kernels of the most recently used configuration."""
    return next(reversed(prop_module._FROZEN.values())).forward.n_recordings


# Few distinct configurations and small geometries: each configuration compiles its own kernels,
# seconds each on a cold kernel cache; the covariance case shares those of test_propagation_jacobian.
@pytest.mark.parametrize("setup, dtype", [("solenoid-rk4", torch.float32), ("solenoid-rk4", torch.float64),
                                          ("uniform-adaptive-plane", torch.float64), ("covariance", torch.float64)],
                         ids=["solenoid-rk4-float32", "solenoid-rk4-float64", "uniform-adaptive-plane-float64",
                              "covariance-float64"])
def test_frozen_equals_traced_for_changing_batch_sizes(setup, dtype):
    n_layers = len(LAYERS)
    if setup == "solenoid-rk4":
        frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0), stepper=RK4(10.0))
    elif setup == "uniform-adaptive-plane":
        layers = barrel([50.0, 150.0], thickness=0.2) + [PlaneLayer(300.0, half_u=400.0, half_v=400.0)]
        n_layers = len(layers)
        frozen, traced = _pair(UniformField((0.1, 0.0, 1.5)), layers, stepper=AdaptiveRKN(tolerance=1e-5),
                               energy_loss=False)
    else:
        layers = barrel([60.0, 200.0], half_length=800.0, material=None, thickness=0.0)
        n_layers = len(layers)
        frozen, traced = _pair(SolenoidField(2.0, 1200.0, 1500.0, requires_grad=True), layers, stepper=RK4(10.0))
    recordings = []
    # 1 track and N = L are recorded anew (dr.freeze's rules), as is each class of row capacity (130)
    for n in [600, 37, 1, n_layers, 130, 600, 140]:
        params = _params(n, dtype, seed=n)
        cov = None
        if setup == "covariance":
            cov = torch.diag_embed(torch.linspace(1e-4, 1e-2, 8, dtype=dtype).expand(n, 8))
        with torch.no_grad():
            _assert_identical(frozen(params, cov), traced(params, cov))
        recordings.append(_recordings(frozen))
    # a repeated batch size and a new one of the same row capacity (140 like 130) are replayed
    assert recordings[6] == recordings[5] == recordings[4]


def test_many_batch_sizes_re_record_without_a_warning(capfd):
    """More row-capacity classes than the recording limit (varying batch sizes in training): Dr.Jit
    re-records and evicts, by design, without its warning about frequent re-recording."""
    prop = Propagator(UniformField((0.0, 0.0, 2.0)), barrel([40.0, 100.0], half_length=400.0))
    capfd.readouterr()
    with torch.no_grad():
        for n in [1, 2, 3, 5, 7, 9, 11, 13, 17, 21, 25, 29, 35, 41, 49, 57, 69, 81, 97, 113, 137, 161, 193, 225,
                  273, 321, 385, 449]:
            prop(_params(n))
    assert "frozen function" not in capfd.readouterr().err


def test_row_capacity_classes_leave_at_most_a_fifth_of_the_rows_unused():
    capacities = [prop_module._row_capacity(n) for n in range(1, 5000)]
    assert all(n <= c <= max(n, 1.25 * n) for n, c in zip(range(1, 5000), capacities))
    assert len({prop_module._row_capacity(n) for n in range(1025, 2049)}) == 4  # four classes per factor 2
    from pyhybrid.kernels.backend import kernel_types
    from pyhybrid.kernels.propagation import output_rows

    with pytest.raises(ValueError, match="capacity"):
        output_rows(kernel_types("cpu", "float32"), 10, 2, capacity=5)


def test_results_of_earlier_calls_are_not_overwritten_by_later_calls():
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0), stepper=RK4(10.0))
    p1, p2 = _params(64, seed=1), _params(64, seed=2)
    with torch.no_grad():
        first = frozen(p1)
        second = frozen(p2)
        frozen(p1 * 1.01)
        _assert_identical(first, traced(p1))
        _assert_identical(second, traced(p2))
        assert not torch.equal(first.local, second.local)


def test_frozen_gradients_equal_traced_gradients():
    dtype = torch.float64
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0, requires_grad=True), GRADIENT_LAYERS,
                           stepper=RK4(10.0), trainable_positions=True, trainable_thickness=True)
    for n in (20, 300, 20):  # 300: more than one window of lanes (coherent_lanes)
        grads = []
        for prop in (frozen, traced):
            params = [_params(n, dtype, seed=n).requires_grad_() for _ in range(2)]
            params[1] = (params[1] * 1.02).detach().requires_grad_()
            prop.zero_grad()
            # two forward calls before one backward: the first call's Jacobian record must survive the second
            outs = [prop(p) for p in params]
            loss = sum((o.local.square().sum() + o.path_length.sum() + o.free[..., 7].sum()) for o in outs)
            loss.backward()
            grads.append([params[0].grad, params[1].grad, prop.positions.grad, prop.thickness.grad,
                          prop.field.b0.grad, prop.field.radius.grad])
        for g_frozen, g_traced in zip(*grads):
            assert torch.equal(g_frozen, g_traced)
        assert grads[0][2].abs().min() > 0 and grads[0][4].abs() > 0

@pytest.mark.parametrize("used", ["local", "path_length", "free"])
def test_loss_on_one_output_gives_the_gradient_of_all_outputs_with_zero_weight(used):
    """Outputs the loss does not use reach the VJP as None (their record rows are skipped). The
    gradient equals that of a loss using every output with zero weight (all rows read), frozen and
    traced, also when a recording made at one N is replayed at another (including the initial time,
    which no gradient reaches: it must come back with N entries, not the recorded count)."""
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0, requires_grad=True), GRADIENT_LAYERS,
                           stepper=RK4(10.0), trainable_positions=True)
    for n in (16, 5):
        grads = []
        for prop, weight in ((frozen, None), (traced, None), (traced, 0.0)):
            params = _params(n, seed=n).requires_grad_()
            prop.zero_grad()
            out = prop(params)
            loss = getattr(out, used).square().sum()
            if weight is not None:  # every output in the graph: their gradients are materialised zeros
                loss = loss + weight * sum(getattr(out, name).sum() for name in ("local", "path_length", "free"))
            loss.backward()
            grads.append([params.grad, prop.positions.grad, prop.field.b0.grad])
        assert grads[0][0].shape == (n, 8)
        for g_frozen, g_traced, g_all in zip(*grads):
            assert torch.equal(g_frozen, g_traced)
            torch.testing.assert_close(g_traced, g_all, rtol=1e-13, atol=0.0)
        assert grads[0][0][:, :3].abs().sum() > 0



def test_gradcheck_through_the_frozen_kernels():
    prop = Propagator(SolenoidField(2.0, 1200.0, 3000.0), GRADIENT_LAYERS, stepper=RK4(10.0))
    params = _params(3, seed=5).requires_grad_()
    inputs = (params, torch.tensor([2.0, 1200.0, 3000.0], dtype=torch.float64, requires_grad=True),
              prop.positions.detach().clone().requires_grad_(), prop.thickness.detach().clone().requires_grad_())

    def run(params, field_params, positions, thickness):
        return _PROPAGATE(params, field_params, positions, thickness, layers=prop.kernel_layers,
                          options=prop.options, field=prop.field.kernel_field("cpu", torch.float64), jacobian=True,
                          seed=0, with_covariance=False, field_gradient=True, layer_gradient=True, freeze=True)[:3]

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)


def test_changed_parameters_and_layers_are_seen_no_stale_recording():
    """Field parameters, layer positions, thicknesses and grid values are inputs of the recorded
    kernels; layers, options and gradient flags are part of their key."""
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0), GRADIENT_LAYERS, stepper=RK4(10.0))
    params = _params(40, seed=3)
    with torch.no_grad():
        before = frozen(params)
        for prop in (frozen, traced):
            prop.field.b0.fill_(3.0)
            prop.positions[0] = 120.0
            prop.thickness[0] = 0.6
        after = frozen(params)
        _assert_identical(after, traced(params))
        assert (after.local[:, 0] - before.local[:, 0]).abs().max() > 1.0
    # a gradient flag switches the Jacobian columns on: the same results, now with field gradients
    for prop in (frozen, traced):
        prop.field.b0.requires_grad_(True)
    grads = [torch.autograd.grad(p(params).local.sum(), p.field.b0)[0] for p in (frozen, traced)]
    assert torch.equal(grads[0], grads[1]) and grads[0].abs() > 0
    # other layer bounds: another configuration, never the old recording
    moved = [DiskLayer(z=900.0, r_min=30.0, r_max=300.0, thickness=0.3) if isinstance(layer, DiskLayer) else layer
             for layer in GRADIENT_LAYERS]
    frozen_moved, traced_moved = _pair(SolenoidField(2.0, 1200.0, 3000.0), moved, stepper=RK4(10.0))
    with torch.no_grad():
        _assert_identical(frozen_moved(params), traced_moved(params))
        assert not torch.equal(frozen_moved(params).valid[:, 1], frozen(params).valid[:, 1])
    # a field map (its values are inputs too), for two batch sizes, then changed in place
    frozen_grid, traced_grid = _pair(_grid(), LAYERS[2:3], stepper=RK4(10.0))
    with torch.no_grad():
        first = frozen_grid(params)
        _assert_identical(first, traced_grid(params))
        _assert_identical(frozen_grid(params[:17]), traced_grid(params[:17]))
        for prop in (frozen_grid, traced_grid):
            prop.field.values[:, 2] *= 1.5
        _assert_identical(frozen_grid(params), traced_grid(params))
        assert first.valid.any() and not torch.equal(frozen_grid(params).local, first.local)


def test_sampled_scattering_is_not_frozen_and_follows_the_seed():
    prop = Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=RK4(10.0), scattering="sample")
    params = _params(30, seed=4)
    with torch.no_grad():
        a, b, c = prop(params, seed=1), prop(params, seed=2), prop(params, seed=1)
    assert torch.equal(a.local, c.local) and not torch.equal(a.local, b.local)


def test_freezing_disabled_globally_still_gives_the_same_results():
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0), stepper=RK4(10.0))
    params = _params(25, seed=6)
    with torch.no_grad():
        expected = traced(params)
        with dr.scoped_set_flag(dr.JitFlag.KernelFreezing, False):
            _assert_identical(frozen(params), expected)
        _assert_identical(frozen(params), expected)


def test_gradient_calls_are_replayed_without_recording_again():
    """The Jacobian record passes through the frozen forward and VJP; its row layout is compared by
    value, so calls after the first of a batch size replay both (a layout compared by identity
    would record anew on every call)."""
    frozen = Propagator(SolenoidField(2.0, 1200.0, 3000.0, requires_grad=True), GRADIENT_LAYERS, stepper=RK4(10.0),
                        trainable_positions=True)
    counts = []
    for n in (20, 50, 20, 50):
        frozen(_params(n, seed=n).requires_grad_()).local.square().sum().backward()
        kernels = next(reversed(prop_module._FROZEN.values()))
        counts.append((kernels.forward.n_recordings, kernels.vjp.n_recordings))
    assert counts[2] == counts[3] == counts[1]


def test_jacobian_record_keeps_arrays_apart_from_its_layout():
    """Dr.Jit traverses a record (frozen calls, the torch bridge) at ~1 us per Python leaf: the rows'
    structural zeros and constants live in one layout object, the record's lists hold arrays only."""
    from pyhybrid.kernels.propagation import JacobianRecord

    a, b = dr.llvm.ad.Float(1.0, 2.0), dr.llvm.ad.Float(3.0, 4.0)
    rows = [[a, None, 1.0], [None, b, None]]
    first, second = JacobianRecord(n_field=1), JacobianRecord(n_field=1)
    first.append(dr.llvm.ad.Bool(True, False), rows)
    second.append(dr.llvm.ad.Bool(True, True), [[b, None, 1.0], [None, a, None]])
    assert all(x is y for got, row in zip(first.rows(0), rows) for x, y in zip(got, row))
    assert first.tangents == [[a, b]]
    assert first.layout == second.layout and hash(first.layout) == hash(second.layout)
    assert len(dr.detail.collect_indices(first)) == 3  # hit mask + two tangents

    # An array given twice (the position rows before and after the material) is stored once.
    shared = JacobianRecord(n_field=1)
    shared.append(dr.llvm.ad.Bool(True, False), [[a, b], [a, None], [None, b]])
    assert shared.tangents == [[a, b]]
    assert [[x is a, y is b] for x, y in shared.rows(0)] == [[True, True], [True, False], [False, True]]


def test_kernel_output_rows_are_sized_from_the_track_arrays_when_recorded():
    """propagate_layers under the user's own dr.freeze: correct for a new N without recording again,
    and a clear error where the rows could not be sized from the tracks (a literal column)."""
    from drjit.llvm import Float, UInt32

    from pyhybrid.kernels import propagation as kprop
    from pyhybrid.kernels.fields import UniformField as KernelUniformField
    from pyhybrid.kernels.surfaces import Cylinder

    layers = [kprop.Layer(Cylinder(half_length=1000.0)) for _ in range(2)]
    options = kprop.PropagationOptions(stepper=kprop.RK4(20.0), scattering="none")

    radii, thickness, b = Float(100.0, 300.0), Float(0.0, 0.0), [dr.opaque(Float, v) for v in (0.0, 0.0, 2.0)]

    def run(x, y, z, t, tx, ty, tz, qop, n_tracks):  # every array it reads is an argument (dr.freeze)
        params = kprop.FreeParameters((x, y, z), t, (tx, ty, tz), qop)
        hits = kprop.propagate_layers(params, KernelUniformField(*b), layers, radii, thickness, options,
                                      n_tracks=n_tracks)
        return hits.local_rows, hits.valid_rows

    frozen = dr.freeze(run)

    def tracks(n):
        phi = dr.arange(Float, n) * (6.0 / n)
        columns = [0.01 * phi, 0.02 * phi, 0.03 * phi, 0.04 * phi, dr.cos(phi), dr.sin(phi), 0.1 * phi, 0.2 + 0.01 * phi]
        dr.eval(columns)  # arrays of n lanes
        return columns

    for n in (50, 20, 80):
        columns = tracks(n)
        n_tracks = dr.opaque(UInt32, n)
        local, valid = frozen(*columns, n_tracks)
        local_traced, valid_traced = run(*columns, n_tracks)
        assert dr.width(local) == 2 * 2 * n
        assert dr.all(local == local_traced) and dr.all(valid == valid_traced) and dr.all(valid)
    assert frozen.n_recordings == 1

    literal_time = tracks(30)
    literal_time[3] = dr.zeros(Float, 30)
    with pytest.raises(RuntimeError) as error:  # dr.freeze reports the ValueError as the cause of its own
        dr.freeze(run)(*literal_time, dr.opaque(UInt32, 30))
    assert isinstance(error.value.__cause__, ValueError) and "not literals" in str(error.value.__cause__)


def test_outputs_of_a_frozen_call_can_be_modified_in_place():
    """33 tracks: the frozen kernels allocate rows for 36 and torch gets the 33 in use as tensors of
    their own (engine.Leading), which a loss may modify in place like any autograd output."""
    frozen, traced = _pair(SolenoidField(2.0, 1200.0, 3000.0), GRADIENT_LAYERS)
    params = _params(33)
    grads = []
    for prop, in_place in ((frozen, True), (traced, False)):
        p = params.clone().requires_grad_()
        out = prop(p)
        local = out.local
        local = local.mul_(2.0) if in_place else local * 2.0
        (local.square().sum() + out.free[..., :3].sum()).backward()
        grads.append(p.grad)
    assert torch.equal(*grads)
