"""Shared helpers of the propagation tests (no tests here): analytic helices and array conversion."""
import math

import numpy as np
import torch

from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.propagation import FreeParameters
from pyhybrid.units import B_CURVATURE

F64 = kernel_types("cpu", "float64")


def kernel_params(rows, types=F64) -> FreeParameters:
    """FreeParameters from an array (N, 8) of (x, y, z, t, dx, dy, dz, q/p).

    The columns are copied into torch-allocated (aligned) memory: Dr.Jit maps numpy buffers in
    place, and their varying alignment would compile a new kernel for many calls.
    """
    rows = torch.tensor(np.atleast_2d(np.asarray(rows, dtype=float)))
    return FreeParameters.from_columns([types.Float(rows[:, j].contiguous()) for j in range(8)])


def numpy_columns(columns) -> np.ndarray:
    """(k, N) numpy array from a list of k Dr.Jit arrays."""
    return np.array([np.array(c) for c in columns])


def helix(start, qop, bz, s):
    """Analytic state after path s [mm] in a uniform field (0, 0, bz): position, unit direction.

    The transverse direction turns at the rate omega = -c q/p bz per mm.
    """
    start = np.asarray(start, dtype=float)
    r0, t0 = start[:3], start[3:6] / np.linalg.norm(start[3:6])
    sin_theta = math.hypot(t0[0], t0[1])
    phi = math.atan2(t0[1], t0[0])
    omega = -B_CURVATURE * qop * bz
    if omega == 0:
        return r0 + s * t0, t0
    angle = phi + omega * s
    position = r0 + np.array([sin_theta / omega * (math.sin(angle) - math.sin(phi)),
                              -sin_theta / omega * (math.cos(angle) - math.cos(phi)), t0[2] * s])
    direction = np.array([sin_theta * math.cos(angle), sin_theta * math.sin(angle), t0[2]])
    return position, direction


def helix_cylinder_path(direction, qop, bz, radius):
    """Path length at which a helix from the origin first reaches radius ``radius`` (None if never)."""
    t0 = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
    sin_theta = math.hypot(t0[0], t0[1])
    omega = abs(B_CURVATURE * qop * bz)
    ratio = radius * omega / (2.0 * sin_theta)
    if ratio > 1:
        return None
    return 2.0 / omega * math.asin(ratio)
