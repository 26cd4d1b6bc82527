"""Hits on cylinders, disks and planes vs analytic helix intersections; misses are masked, never NaN."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from pyhybrid.kernels import fields
from pyhybrid.kernels.material import SILICON
from pyhybrid.kernels.propagation import Layer, PropagationOptions, propagate_layers
from pyhybrid.kernels.steppers import RK4
from pyhybrid.kernels.surfaces import Cylinder, Disk, Plane
from reference import torch_rk4
from test_propagation_support import F64, helix, helix_cylinder_path, kernel_params, numpy_columns

BZ = 2.0
UNIFORM = fields.UniformField(F64.Float(0.0), F64.Float(0.0), F64.Float(BZ))


def _propagate(starts, layers, positions, thickness=None, field=UNIFORM, **options):
    thickness = np.zeros(len(layers)) if thickness is None else thickness
    hits = propagate_layers(kernel_params(starts), field, layers, F64.Float(positions), F64.Float(thickness),
                            PropagationOptions(stepper=RK4(5.0), **options))
    free = np.stack([numpy_columns(f).T for f in hits.free], axis=1)        # (N, L, 8)
    local = np.stack([numpy_columns(v).T for v in hits.local], axis=1)      # (N, L, 2)
    path = numpy_columns(hits.path).T                                        # (N, L)
    valid = numpy_columns(hits.valid).T.astype(bool)
    return free, local, path, valid


def _tracks(n, seed, eta_max=1.0, pt=(1.0, 5.0)):
    rng = np.random.default_rng(seed)
    eta, phi = rng.uniform(-eta_max, eta_max, n), rng.uniform(-math.pi, math.pi, n)
    theta = 2 * np.arctan(np.exp(-eta))
    p = rng.uniform(*pt, n) / np.sin(theta)
    direction = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    qop = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0) / p
    return np.concatenate([np.zeros((n, 4)), direction, qop[:, None]], axis=1)


def test_cylinder_hits_match_analytic_helix_intersections():
    starts = _tracks(12, seed=1)
    radii = [50.0, 200.0, 600.0]
    layers = [Layer(Cylinder(half_length=5000.0)) for _ in radii]
    free, local, path, valid = _propagate(starts, layers, radii)
    assert valid.all()
    for i, start in enumerate(starts):
        for k, radius in enumerate(radii):
            s = helix_cylinder_path(start[4:7], start[7], BZ, radius)
            position, direction = helix(np.r_[start[:3], start[4:7]], start[7], BZ, s)
            np.testing.assert_allclose(free[i, k, :3], position, atol=2e-6)
            np.testing.assert_allclose(free[i, k, 4:7], direction, atol=1e-8)
            assert path[i, k] == pytest.approx(s, abs=2e-6)
            assert local[i, k, 0] == pytest.approx(radius * math.atan2(position[1], position[0]), abs=2e-6)
            assert local[i, k, 1] == pytest.approx(position[2], abs=2e-6)


def test_disk_and_tilted_plane_hits_match_analytic_intersections():
    starts = _tracks(8, seed=2, eta_max=0.3)
    starts[:, 6] = np.abs(starts[:, 6]) + 0.5            # all forward, towards the disk
    starts[:, 4:7] /= np.linalg.norm(starts[:, 4:7], axis=1, keepdims=True)
    z_disk = 400.0
    free, local, path, valid = _propagate(starts, [Layer(Disk(r_min=0.0, r_max=5000.0))], [z_disk])
    assert valid.all()
    for i, start in enumerate(starts):
        s = z_disk / start[6]                             # uniform B along z: dz/ds is constant
        position, _ = helix(np.r_[start[:3], start[4:7]], start[7], BZ, s)
        np.testing.assert_allclose(free[i, 0, :3], position, atol=2e-6)
        assert local[i, 0, 0] == pytest.approx(math.hypot(position[0], position[1]), abs=2e-6)
        assert local[i, 0, 1] == pytest.approx(math.atan2(position[1], position[0]), abs=1e-8)

    normal = np.array([1.0, 1.0, 0.2]) / np.linalg.norm([1.0, 1.0, 0.2])
    u_axis = np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)
    plane = Plane(normal_vector=tuple(normal), u_axis=tuple(u_axis), center=(5.0, -3.0))
    offset = 300.0
    starts = _tracks(8, seed=3, eta_max=0.5)
    phi = np.linspace(0.2, 1.3, 8)                        # towards the plane
    starts[:, 4], starts[:, 5] = np.cos(phi) * np.hypot(starts[:, 4], starts[:, 5]), \
        np.sin(phi) * np.hypot(starts[:, 4], starts[:, 5])
    free, local, path, valid = _propagate(starts, [Layer(plane)], [offset])
    assert valid.all()
    v_axis = np.cross(normal, u_axis)
    for i, start in enumerate(starts):
        def distance(s):
            return helix(np.r_[start[:3], start[4:7]], start[7], BZ, s)[0] @ normal - offset
        s = brentq(distance, 0.0, 2000.0, xtol=1e-12)
        position, _ = helix(np.r_[start[:3], start[4:7]], start[7], BZ, s)
        np.testing.assert_allclose(free[i, 0, :3], position, atol=2e-6)
        assert path[i, 0] == pytest.approx(s, abs=2e-6)
        np.testing.assert_allclose(local[i, 0], [position @ u_axis - 5.0, position @ v_axis + 3.0], atol=2e-6)


def test_misses_are_masked_and_the_next_layer_is_searched_from_the_last_hit():
    curler = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -0.05, 1.0 / 0.15]    # pT = 150 MeV: 2 R = 500 mm
    forward = [0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 1.0, 0.5]             # leaves the barrel through the end
    backward = [0.0, 0.0, 0.0, 0.0, 0.3, 0.1, -1.0, -0.5]          # never reaches the +z disk
    neutral = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.1, 0.0]
    layers = [Layer(Cylinder(half_length=500.0)), Layer(Cylinder(half_length=500.0)),
              Layer(Cylinder(half_length=500.0)), Layer(Disk(r_min=10.0, r_max=900.0))]
    free, local, path, valid = _propagate([curler, forward, backward, neutral], layers, [100.0, 400.0, 800.0, 700.0],
                                          world_radius=2000.0, world_half_length=1500.0)
    expected = np.array([[1, 1, 0, 0],      # the curler turns below 800 mm and loops away from the disk
                         [1, 0, 0, 1],      # out of the barrel's bounds at 400 mm: found on the disk
                         [1, 0, 0, 0],      # out of bounds (z = -1265) at 400 mm; the disk is behind it
                         [1, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(valid, expected)
    for array in (free, local, path):
        assert np.isfinite(array).all()
        assert (array[~valid] == 0).all()
    # the forward track's disk hit is the same as without the barrel layers it missed
    alone, _, alone_path, _ = _propagate([forward], [layers[0], layers[3]], [100.0, 700.0])
    np.testing.assert_allclose(free[1, 3], alone[0, 1], atol=1e-9)
    assert path[1, 3] == pytest.approx(alone_path[0, 1], abs=1e-9)
    # the neutral track is a straight line
    direction = np.array(neutral[4:7]) / np.linalg.norm(neutral[4:7])
    s = 800.0 / math.hypot(direction[0], direction[1])
    np.testing.assert_allclose(free[3, 2, :3], s * direction, atol=1e-9)


def test_matches_the_torch_reference_with_energy_loss_in_a_solenoid():
    starts = _tracks(20, seed=4, eta_max=1.5, pt=(0.2, 5.0))
    radii, half_lengths = [40.0, 120.0, 300.0, 500.0], [400.0, 600.0, 800.0, 1000.0]
    thickness = np.array([0.3, 0.3, 2.0, 2.0])
    solenoid = fields.SolenoidField(F64.Float(2.0), F64.Float(1200.0), F64.Float(1500.0))
    layers = [Layer(Cylinder(half_length=h), SILICON) for h in half_lengths]
    free, local, path, valid = _propagate(starts, layers, radii, thickness, field=solenoid, scattering="none")
    reference = torch_rk4.propagate_cylinders(torch.tensor(starts), radii, half_lengths,
                                              torch_rk4.solenoid_field(2.0, 1200.0, 1500.0), 5.0,
                                              thickness=torch.tensor(thickness))
    np.testing.assert_array_equal(valid, reference["valid"].numpy())
    assert 0 < valid.sum() < valid.size
    np.testing.assert_allclose(free, reference["free"].numpy(), atol=1e-9, rtol=1e-10)
    np.testing.assert_allclose(local, reference["local"].numpy(), atol=1e-9)
    np.testing.assert_allclose(path, reference["path"].numpy(), atol=1e-9)
    # energy loss lowered |q/p| after each hit
    assert np.all(np.abs(free[:, 1:, 7])[valid[:, 1:]] > np.abs(free[:, :1, 7]).repeat(3, 1)[valid[:, 1:]])


def test_surfaces_reject_bad_geometry():
    with pytest.raises(ValueError, match="half_length must be positive"):
        Cylinder(half_length=-1.0)
    with pytest.raises(ValueError, match="u_axis must be perpendicular"):
        Plane(normal_vector=(0, 0, 1), u_axis=(0, 1, 1))
    with pytest.raises(ValueError, match="need 0 <= r_min < r_max"):
        Disk(r_min=10.0, r_max=5.0)
    with pytest.raises(ValueError, match="normal_vector must be a non-zero"):
        Plane(normal_vector=(0, 0, 0))


@pytest.mark.parametrize("surface, a", [(Cylinder(), 300.0), (Cylinder(), 4.0),
                                        (Plane((0.6, 0.0, 0.8), (0.8, 0.0, -0.6)), 100.0)],
                         ids=["cylinder", "thin-cylinder", "plane"])
def test_within_never_rejects_a_surface_that_a_step_can_reach(surface, a):
    """The stepping loop computes the straight-line distance only where ``within`` is True: it must be
    True wherever the surface lies within the step (no missed crossing), and False far away (the point)."""
    rng = np.random.default_rng(7)
    n, step = 200_000, 10.0
    r = rng.uniform(-1.5 * a - 30, 1.5 * a + 30, (3, n))
    t = rng.normal(size=(3, n))
    t /= np.linalg.norm(t, axis=0)
    rows = [F64.Float(v) for v in r]
    within = np.array(surface.within(rows, F64.Float(a), step))
    step_limit, _ = surface.line_distance(rows, [F64.Float(v) for v in t], F64.Float(a), F64.Bool(np.zeros(n, bool)))
    reachable = np.array(step_limit) <= step
    assert reachable.sum() > 1000 and not (reachable & ~within).any()
    assert (~within).mean() > 0.5
