"""Lane order of the propagation (kernels.propagation.coherent_lanes): within windows of tracks the
lanes run them sorted by polar angle, so that a SIMD packet's tracks need similar numbers of steps.
Only the lanes change: every output, covariance and track gradient is the same bit for bit."""
import drjit as dr
import numpy as np
import pytest
import torch
from drjit.llvm import Float64, UInt32

from pyhybrid.kernels import propagation as kprop
from pyhybrid.kernels.backend import kernel_types
from pyhybrid.nn.propagator import AdaptiveRKN, DiskLayer, Propagator, RK4, SolenoidField, barrel, free_parameters

N_TRACKS = 600  # two full windows of 256 tracks and a partial one


def _bucket(direction):
    cos_theta = np.abs(direction[:, 2]) / np.linalg.norm(direction, axis=1)
    return np.minimum(np.nan_to_num(cos_theta) * 16, 15).astype(int)


def test_lanes_are_a_stable_sort_of_each_window_by_polar_angle():
    direction = np.random.default_rng(3).normal(size=(N_TRACKS, 3))
    direction[5] = np.nan  # a bad direction still gets a lane (bucket 0)
    lanes = kprop.coherent_lanes([Float64(direction[:, i]) for i in range(3)], N_TRACKS).numpy()

    assert sorted(lanes) == list(range(N_TRACKS))
    assert (lanes // kprop.LANE_WINDOW == np.arange(N_TRACKS) // kprop.LANE_WINDOW).all()
    bucket = _bucket(direction)
    for start in range(0, N_TRACKS, kprop.LANE_WINDOW):
        window = lanes[start:start + kprop.LANE_WINDOW]
        key = bucket[window] * N_TRACKS + window  # bucket first, then the original order (stable)
        assert (np.diff(key) > 0).all()
    assert len(set(bucket[lanes[:8]])) < len(set(bucket[:8]))  # the first packet is more uniform than before

    inverse = kprop.inverse_permutation(UInt32(lanes)).numpy()
    assert (lanes[inverse] == np.arange(N_TRACKS)).all()


def test_random_streams_follow_the_lane_index_they_are_given():
    types = kernel_types("cpu", "float64")
    reversed_lanes = UInt32(np.arange(100)[::-1].astype(np.uint32))
    default = types.uniform(types.rng(100, seed=11, stream=2)).numpy()
    given = types.uniform(types.rng(100, seed=11, stream=2, lane=reversed_lanes)).numpy()
    assert np.array_equal(given, default[::-1])


def _tracks(n):
    generator = torch.Generator().manual_seed(5)
    momentum = torch.randn(n, 3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.5])
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    return free_parameters(0.05 * torch.randn(n, 3, generator=generator, dtype=torch.float64), momentum, charge)


@pytest.mark.parametrize("scattering, stepper", [("covariance", "rk4"), ("sample", "rk4"), ("covariance", "adaptive")])
def test_results_do_not_depend_on_the_lane_order(monkeypatch, scattering, stepper):
    """The same call with the lanes in track order (no reordering) gives identical results: bit for bit
    per track, and to rounding for the gradients of the global parameters (sums over the tracks)."""
    layers = barrel([50.0, 200.0], half_length=[400.0, 600.0], thickness=0.5)
    if stepper == "adaptive":  # per-lane step sizes, and a disk (steps grow with 1 / |cos theta| there)
        layers = layers[:1] + [DiskLayer(z=500.0, r_min=20.0, r_max=600.0, thickness=0.5)]
    prop = Propagator(SolenoidField(2.0, 1200.0, 3000.0, requires_grad=True), layers,
                      stepper=RK4(20.0) if stepper == "rk4" else AdaptiveRKN(tolerance=1e-4),
                      scattering=scattering, trainable_positions=True, trainable_thickness=True,
                      freeze_kernels=False)
    params = _tracks(N_TRACKS)
    covariance = torch.diag_embed(torch.linspace(1e-4, 1e-2, 8, dtype=torch.float64).expand(N_TRACKS, 8))

    def run():
        prop.zero_grad()
        p = params.clone().requires_grad_()
        out = prop(p, covariance, seed=7)
        (out.local.square().sum() + out.path_length.sum() + out.free[..., 7].sum()).backward()
        return [out.free, out.local, out.path_length, out.valid, out.covariance, out.local_covariance, p.grad,
                prop.positions.grad, prop.thickness.grad, prop.field.b0.grad]

    reordered = run()
    monkeypatch.setattr(kprop, "coherent_lanes", lambda direction, n: dr.arange(UInt32, n))
    in_track_order = run()
    per_track, sums = 7, slice(7, None)  # the global gradients are sums over tracks in another order
    for a, b in zip(reordered[:per_track], in_track_order[:per_track]):
        assert torch.equal(a, b)
    for a, b in zip(reordered[sums], in_track_order[sums]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    not_time = [0, 1, 2, 4, 5, 6, 7]  # the loss does not depend on the start time
    assert reordered[3].any(dim=0).all() and (reordered[6][:, not_time] != 0).any(dim=0).all()
