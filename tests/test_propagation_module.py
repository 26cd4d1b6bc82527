"""The torch Propagator: API, dtypes, neutral tracks, repeated backward, bad input; the standalone CLI run."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyhybrid.cli import main
from pyhybrid.io import read_events
from pyhybrid.nn.propagator import (AdaptiveRKN, CylinderLayer, DiskLayer, Propagator, RK4, SolenoidField,
                                    UniformField, barrel, free_parameters)

LAYERS = barrel([40.0, 100.0, 250.0], half_length=[300.0, 500.0, 800.0], thickness=0.3) + \
    [DiskLayer(z=900.0, r_min=30.0, r_max=700.0, thickness=0.3)]


def _params(n, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    momentum = torch.randn(n, 3, generator=generator, dtype=dtype) * torch.tensor([2.0, 2.0, 1.5], dtype=dtype)
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return free_parameters(0.05 * torch.randn(n, 3, generator=generator, dtype=dtype), momentum, charge)


@pytest.fixture(scope="module")
def propagator():
    return Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=RK4(10.0))


def test_outputs_shapes_masks_and_consistency(propagator):
    params = _params(64)
    with torch.no_grad():
        out = propagator(params)
    assert out.free.shape == (64, 4, 8) and out.local.shape == (64, 4, 2)
    assert out.path_length.shape == (64, 4) and out.valid.dtype == torch.bool
    assert out.position.shape == (64, 4, 3)
    assert out.valid.any() and not out.valid.all()
    for tensor in (out.free, out.local, out.path_length):
        assert torch.isfinite(tensor).all()
        assert (tensor[~out.valid] == 0).all()
    barrel_hits = out.valid[:, :3]
    radius = out.position[:, :3, :2].norm(dim=-1)
    torch.testing.assert_close(radius[barrel_hits], propagator.positions[:3].expand(64, 3)[barrel_hits])
    torch.testing.assert_close(out.local[:, :3, 0][barrel_hits],
                               (radius * torch.atan2(out.position[..., 1], out.position[..., 0])[:, :3])[barrel_hits])
    # path lengths increase along the layers a track hits; time = path / (beta c)
    assert (out.path_length[:, 1:][out.valid[:, 1:] & out.valid[:, :-1]] >
            out.path_length[:, :-1][out.valid[:, 1:] & out.valid[:, :-1]]).all()
    torch.testing.assert_close(out.direction.norm(dim=-1)[out.valid], torch.ones(int(out.valid.sum()), dtype=torch.float64))


def test_non_unit_directions_are_normalised_and_float32_agrees(propagator):
    params = _params(32)
    scaled = params.clone()
    scaled[:, 4:7] *= 3.7
    with torch.no_grad():
        reference = propagator(params)
        torch.testing.assert_close(propagator(scaled).free, reference.free)
        single = propagator(params.float())
    assert single.free.dtype == torch.float32
    both = single.valid & reference.valid
    assert both.sum() >= 0.95 * reference.valid.sum()
    assert (single.local.double() - reference.local)[both].abs().max() < 1e-2       # mm


def test_repr_names_the_layers_stepper_and_options(propagator):
    text = repr(propagator)
    assert "layers=4 (3 cylinder, 1 disk)" in text
    assert "stepper=RK4(step_size=10.0)" in text and "jacobian='exact'" in text and "SolenoidField" in text


def test_neutral_track_is_a_straight_line(propagator):
    params = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.6, 0.8, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.6, 0.8, 0.2, 0.5]],
                          dtype=torch.float64)
    with torch.no_grad():
        out = propagator(params)
    assert out.valid[0, :3].all()
    direction = params[0, 4:7] / params[0, 4:7].norm()
    for k in range(3):
        point = out.position[0, k]
        offset = point - params[0, :3]
        torch.testing.assert_close(offset / offset.norm(), direction)
        assert out.time[0, k].item() == pytest.approx(offset.norm().item() / 299.792458, rel=1e-12)
    torch.testing.assert_close(out.direction[0, :3], direction.expand(3, 3))


def test_gradients_flow_to_a_network_and_repeated_backward_accumulates(propagator):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    features = torch.randn(16, 3, dtype=torch.float64)
    momentum = net(features) + torch.tensor([1.5, 0.5, 0.2], dtype=torch.float64)
    params = free_parameters(torch.zeros(16, 3, dtype=torch.float64), momentum, 1.0)
    out = propagator(params)
    loss = ((out.local - 1.0) ** 2 * out.valid[..., None]).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in net.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in first)
    loss.backward()
    for p, g in zip(net.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g)
    assert propagator.positions.grad is None            # not trainable by default


def test_torch_func_jacrev_and_functional_grad_match_autograd(propagator):
    """torch.func on the module: jacrev of the hits (one VJP per output entry) and grad over the
    module's parameters through functional_call, against torch.autograd."""
    params = _params(4)
    hits = lambda p: propagator(p).local  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(hits)(params), torch.autograd.functional.jacobian(hits, params))
    module_parameters = {name: p.detach() for name, p in propagator.named_parameters()}
    loss = lambda ps: torch.func.functional_call(propagator, ps, (params,)).local.square().sum()  # noqa: E731
    grads = torch.func.grad(loss)(module_parameters)
    leaves = {name: p.clone().requires_grad_() for name, p in module_parameters.items()}
    expected = torch.autograd.grad(loss(leaves), list(leaves.values()))
    assert any(g.abs().sum() > 0 for g in expected)
    for name, want in zip(leaves, expected):
        torch.testing.assert_close(grads[name], want)


def test_unusable_tracks_are_found_by_the_kernel_in_recorded_and_replayed_calls():
    """The finite / direction checks run inside the (frozen) kernel: a bad track raises in the call
    that records the kernels and in later replays, with or without gradients; good batches of the same
    size still run. At kernel level the bad tracks are flagged, never stepped, and leave the other
    tracks' results unchanged."""
    propagator = Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=RK4(10.0))
    params = _params(40)
    bad = params.clone()
    bad[7, 1] = float("inf")
    for requires_grad in (False, True, False):
        with pytest.raises(ValueError, match="params contains NaN or infinite"):
            propagator(bad.clone().requires_grad_(requires_grad))
        zero = params.clone().requires_grad_(requires_grad)
        with torch.no_grad():
            zero[3, 4:7] = 0.0
        with pytest.raises(ValueError, match="direction.*positive length"):
            propagator(zero)
        propagator(params.clone().requires_grad_(requires_grad))
    sampling = Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=RK4(10.0), scattering="sample")
    torch.manual_seed(5)
    expected = torch.rand(())
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="params contains NaN or infinite"):
        sampling(bad)
    assert torch.rand(()) == expected  # a rejected call leaves torch's random state as it was

    from pyhybrid.kernels import propagation as kprop
    from pyhybrid.kernels.backend import kernel_types
    from pyhybrid.kernels.fields import SolenoidField as KernelSolenoid

    types = kernel_types("cpu", "float64")
    layers = [layer.kernel_layer() for layer in LAYERS]
    options = kprop.PropagationOptions(stepper=RK4(10.0))

    def run(rows):
        state = kprop.FreeParameters.from_columns([types.Float(rows[:, j].numpy()) for j in range(8)])
        hits = kprop.propagate_layers(state, KernelSolenoid(2.0, 1200.0, 3000.0), [k for k, _ in layers],
                                      types.Float([a for _, a in layers]), types.Float([0.3] * len(layers)), options)
        lanes = kprop.coherent_lanes(state.direction, rows.shape[0])
        unusable = np.zeros(rows.shape[0], bool)
        unusable[lanes.numpy()] = hits.unusable.numpy()
        return np.stack([v.numpy() for v in hits.valid]), np.stack([v.numpy() for v in hits.path]), unusable

    rows = params.detach().clone()
    rows[5, 0], rows[9, 4:7], rows[12, 7] = float("nan"), 0.0, float("-inf")
    valid, path, unusable = run(rows)
    assert unusable.nonzero()[0].tolist() == [5, 9, 12]
    assert not valid[:, [5, 9, 12]].any() and (path[:, [5, 9, 12]] == 0).all()
    good = [i for i in range(40) if i not in (5, 9, 12)]
    reference_valid, reference_path, reference_unusable = run(params.detach()[good])
    assert not reference_unusable.any() and reference_valid.any()
    np.testing.assert_array_equal(valid[:, good], reference_valid)
    np.testing.assert_array_equal(path[:, good], reference_path)


def test_bad_input_gives_clear_errors(propagator):
    params = _params(4)
    with pytest.raises(ValueError, match=r"params must have shape \(N, 8\)"):
        propagator(params[:, :7])
    bad = params.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="params contains NaN"):
        propagator(bad)
    bad = params.clone()
    bad[2, 4:7] = 0.0
    with pytest.raises(ValueError, match="direction.*positive length"):
        propagator(bad)
    for length in (1e20, 1e-25):  # |d|^2 over- or underflows in float32
        bad = params.float()
        bad[0, 4:7] *= length
        with pytest.raises(ValueError, match="direction.*squared length finite in torch.float32"):
            propagator(bad)
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        propagator(params.to(torch.float16))
    with pytest.raises(ValueError, match=r"covariance must have shape \(4, 8, 8\)"):
        propagator(params, torch.zeros(4, 6, 6, dtype=torch.float64))
    position, momentum = torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
    for bad, error, message in ((dict(charge=torch.ones(3, 1)), ValueError, "charge must have shape"),
                                (dict(charge=float("nan")), ValueError, "charge contains NaN"),
                                (dict(charge=1.0, time=torch.zeros(3, 1, dtype=torch.float64)), ValueError,
                                 "time must have shape"),
                                (dict(charge=1.0, time=[0.0, 0.0, 0.0]), TypeError, "time must be a torch.Tensor")):
        with pytest.raises(error, match=message):
            free_parameters(position, momentum, **bad)
    for one_for_all in (-1, [-1.0], torch.tensor([-1.0])):
        assert (free_parameters(position, momentum, one_for_all)[:, 7] < 0).all()
    charges = torch.tensor([1, -1, 0])  # integer charges are converted
    torch.testing.assert_close(free_parameters(position, momentum, charges)[:, 7],
                               charges.double() / math.sqrt(3.0))
    for charge in (torch.tensor([1.0, 2.0, -1.0]), 0.5):  # |q| = 1 particles only
        with pytest.raises(ValueError, match=r"charge must be -1, \+1 or 0 \(neutral\) \[e\], got (2.0|0.5)"):
            free_parameters(position, momentum, charge)
    # a covariance computed from tracks that require grad: detached, the hit gradients are those without it
    tracks = params.clone().requires_grad_()
    covariance = 1e-4 * torch.eye(8, dtype=torch.float64) * tracks[:, 7:8, None].square()
    with_covariance = torch.autograd.grad(propagator(tracks, covariance).local.sum(), tracks)[0]
    torch.testing.assert_close(with_covariance, torch.autograd.grad(propagator(tracks).local.sum(), tracks)[0])
    with pytest.raises(ValueError, match="cylinder radius must be positive"):
        Propagator(UniformField(), [CylinderLayer(radius=-5.0)])
    with pytest.raises(ValueError, match="thickness must be >= 0"):
        Propagator(UniformField(), [CylinderLayer(radius=5.0, thickness=-1.0)])
    with pytest.raises(ValueError, match="unknown particle"):
        Propagator(UniformField(), LAYERS, particle="graviton")
    with pytest.raises(ValueError, match="scattering must be one of"):
        Propagator(UniformField(), LAYERS, scattering="sometimes")
    with pytest.raises(ValueError, match="radius and half_length must be positive"):
        SolenoidField(radius=0.0)
    with pytest.raises(TypeError, match="stepper must be"):
        Propagator(UniformField(), LAYERS, stepper="rk4")
    with pytest.raises(ValueError, match="step_size must be a positive length"):
        RK4(step_size=-1.0)
    with pytest.raises(ValueError, match="layers must contain at least one layer"):
        Propagator(UniformField(), [])
    from_generator = Propagator(UniformField(), (layer for layer in LAYERS))  # not used up by the checks
    assert from_generator.n_layers == len(LAYERS)


def test_adaptive_stepper_agrees_with_rk4():
    params = _params(32, seed=3)
    fine = Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=AdaptiveRKN(tolerance=1e-6))
    coarse = Propagator(SolenoidField(2.0, 1200.0, 3000.0), LAYERS, stepper=RK4(10.0))
    with torch.no_grad():
        a, b = fine(params), coarse(params)
    assert torch.equal(a.valid, b.valid)
    assert (a.local - b.local)[a.valid].abs().max() < 1e-3


def test_cli_run_writes_hits(tmp_path):
    path = tmp_path / "hits.h5"
    result = CliRunner().invoke(main, ["run", "propagate", "--tracks", "300", "--field", "solenoid", "--device", "cpu",
                                       "--seed", "5", "--batch-size", "128", "--b0", "2.5", "-o", str(path)])
    assert result.exit_code == 0, result.output
    events = read_events(path)
    assert events.n_events == 300
    n_layers = events.fixed["local"].shape[1]
    assert events.fixed["free"].shape == (300, n_layers, 8)
    assert events.fixed["initial"].shape == (300, 8)
    valid = events.fixed["valid"].astype(bool)
    assert valid[:, 0].mean() > 0.9
    assert np.isfinite(events.fixed["local"]).all() and (events.fixed["local"][~valid] == 0).all()
    radii = np.linalg.norm(events.fixed["free"][:, :, :2], axis=-1)
    np.testing.assert_allclose(radii[valid], np.broadcast_to(events.metadata["parameters"]["radii"], radii.shape)[valid],
                               rtol=1e-5)
    assert events.metadata["parameters"]["field"] == "solenoid" and events.metadata["seed"] == 5
    assert events.metadata["parameters"]["batch_size"] == 128 and events.metadata["parameters"]["tracks"] == 300
    assert events.metadata["parameters"]["bfield"] == 2.5  # --b0: the Python name of --bfield
    assert events.complete is True
    again = tmp_path / "again.h5"
    CliRunner().invoke(main, ["run", "propagate", "--tracks", "300", "--seed", "5", "--batch-size", "128",
                              "--bfield", "2.5", "-o", str(again)])
    np.testing.assert_array_equal(read_events(again).fixed["local"], events.fixed["local"])
    assert math.isfinite(float(events.fixed["path_length"].max()))


@pytest.mark.parametrize("arguments, message", [
    (["--bfield", "nan"], "--bfield"),
    (["--disks", "800,1300"], "beyond the barrel"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["-o", "/no/such/directory/hits.h5"], "does not exist"),
    (["-o", "/proc/hits.h5"], "cannot write in '/proc'"),
    (["--thickness", "nan"], "'--thickness': 'nan' is not a finite number"),
    (["--pt-max", "inf"], "'--pt-max': 'inf' is not a finite number"),
    (["--eta-max", "1e9"], "'--eta-max': 1000000000.0 is not in the range 0<=x<=10"),
    (["--step-size", "1e-3"], "10000 steps of 0.001 mm end before the last layer"),
    (["--radii", "30,70,30"], "layers listed twice: 30 mm"),
    (["--disks", "1200,1200"], "layers listed twice: 1200 mm"),
])
def test_cli_rejects_bad_arguments_before_running(arguments, message):
    result = CliRunner().invoke(main, ["run", "propagate", "--tracks", "10", *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_endcap_disks_are_crossed_in_order(tmp_path):
    """Disks given in any order are sorted by |z|: every forward track that crosses the near disk's
    plane inside its radii has a hit there, whatever the order on the command line."""
    files = []
    for disks in ("1400,1300", "1300,1400"):
        files.append(tmp_path / f"{disks}.h5")
        result = CliRunner().invoke(main, ["run", "propagate", "--tracks", "400", "--radii", "30,70,120",
                                           "--half-length", "1200", "--disks", disks, "--eta-max", "2.5",
                                           "-o", str(files[-1])])
        assert result.exit_code == 0, result.output
    first, second = (read_events(f) for f in files)
    np.testing.assert_array_equal(first.fixed["valid"], second.fixed["valid"])
    near = first.fixed["free"][:, 3]   # layers: 3 barrel, then +z disks by |z|
    hit = first.fixed["valid"][:, 3].astype(bool)
    assert hit.sum() > 20
    np.testing.assert_allclose(near[hit, 2], 1300.0, atol=1e-3)


def test_cli_barrel_radii_in_any_order_are_crossed_in_order(tmp_path):
    files = []
    for radii in ("116,32,72", "32,72,116"):
        files.append(tmp_path / f"{radii}.h5")
        result = CliRunner().invoke(main, ["run", "propagate", "--tracks", "200", "--radii", radii,
                                           "-o", str(files[-1])])
        assert result.exit_code == 0, result.output
    unsorted, ordered = (read_events(f) for f in files)
    np.testing.assert_array_equal(unsorted.fixed["local"], ordered.fixed["local"])
    assert unsorted.fixed["valid"].mean(0).min() > 0.95 and unsorted.metadata["parameters"]["radii"] == [32, 72, 116]


def test_benchmark_workload_step_count():
    """pyhybrid/bench/propagate.py counts work as tracks x STEPS_PER_TRACK: keep the constant honest."""
    from pyhybrid.bench import propagate as bench
    from reference import torch_rk4

    params = bench.workload(300, "cpu", "float64")
    with torch.no_grad():
        out = torch_rk4.propagate_cylinders(params, list(bench.RADII), [bench.HALF_LENGTH] * len(bench.RADII),
                                            torch_rk4.solenoid_field(*bench.SOLENOID), bench.STEP,
                                            thickness=torch.full((len(bench.RADII),), bench.THICKNESS,
                                                                 dtype=torch.float64))
    assert out["steps"] / 300 == pytest.approx(bench.STEPS_PER_TRACK, rel=0.03)


def test_outputs_are_per_track_views_of_layer_major_rows():
    """(N, L, ...) results without a copy of the kernels' layer-major rows; the usual ops work on them."""
    prop = Propagator(UniformField((0.0, 0.0, 2.0)), barrel([50.0, 120.0], thickness=0.3), stepper=RK4(10.0))
    generator = torch.Generator().manual_seed(3)
    momentum = torch.randn(5, 3, generator=generator, dtype=torch.float64) + torch.tensor([2.0, 0.0, 0.0],
                                                                                          dtype=torch.float64)
    params = free_parameters(torch.zeros(5, 3, dtype=torch.float64), momentum, 1.0)
    out = prop(params)
    assert out.free.shape == (5, 2, 8) and out.local.shape == (5, 2, 2) and out.path_length.shape == (5, 2)
    assert out.free.transpose(0, 1).is_contiguous()
    first_only = Propagator(UniformField((0.0, 0.0, 2.0)), barrel([50.0], thickness=0.3), stepper=RK4(10.0))
    assert torch.equal(out.local[:, 0], first_only(params).local[:, 0])  # rows land on their track and layer
    assert out.free.reshape(5, -1).shape == (5, 16) and torch.equal(out.free.contiguous(), out.free)
    assert torch.equal(out.path_length[:, 1] > out.path_length[:, 0], out.valid[:, 1] & out.valid[:, 0])
