"""Detector surfaces for track propagation (Dr.Jit; no torch).

Each surface has one differentiable *position parameter* ``a`` (a Dr.Jit array
of width 1, or a Dual) and fixed bounds:

* :class:`Cylinder` around the z axis: ``a`` = radius [mm]; bounds |z| <= half_length;
  local coordinates (R phi, z) [mm] as in ACTS.
* :class:`Disk` perpendicular to z: ``a`` = z position [mm]; bounds r_min <= rho <= r_max;
  local coordinates (rho [mm], phi [rad]) as ACTS' disc surface.
* :class:`Plane` with unit normal n and in-plane axes (u, v = n x u): the plane
  n . r = ``a`` [mm]; local coordinates (r . u - u0, r . v - v0) [mm]; rectangular bounds.

Methods used inside the stepping loop take plain arrays; :meth:`snap_distance`,
:meth:`local` and :meth:`normal` are written with :mod:`pyhybrid.kernels.dual`
helpers, so they also accept Duals (for the transport Jacobian).

Level function S(r): negative on the side the track starts for an outward
barrel (inside a cylinder; below a plane), zero on the surface; the stepping
loop uses only its sign and the sign of its rate dS/ds (for a cylinder
S = rho^2 - a^2, no square root per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import drjit as dr

from pyhybrid.kernels import dual as dm

__all__ = ["Cylinder", "Disk", "Plane", "NO_INTERSECTION"]

#: Distance reported when a straight line does not reach a surface [mm].
NO_INTERSECTION = 1e30


def _finite_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Cylinder:
    """Cylinder of radius ``a`` around the z axis, |z| <= half_length [mm]."""

    half_length: float = math.inf
    kind = "cylinder"

    def __post_init__(self):
        _finite_positive("half_length", self.half_length)

    def level(self, r, a):
        """rho^2 - a^2: the sign of rho - a (a > 0) without a square root (evaluated every step)."""
        return r[0] * r[0] + r[1] * r[1] - a * a

    def level_rate(self, r, t):
        """d level / ds along the direction t."""
        return 2.0 * (r[0] * t[0] + r[1] * t[1])

    def within(self, r, a, distance):
        """False where the surface is certainly farther than ``distance`` from r (no square root):
        |rho - a| > distance, i.e. rho^2 outside [max(a - distance, 0)^2, (a + distance)^2]."""
        rho2 = r[0] * r[0] + r[1] * r[1]
        inner = dr.maximum(a - distance, 0.0)
        outer = a + distance
        return (rho2 >= inner * inner) & (rho2 <= outer * outer)

    def _roots(self, r, t, a):
        """Both straight-line roots (far, near) and whether they exist; works on Duals."""
        a2 = t[0] * t[0] + t[1] * t[1]
        b = r[0] * t[0] + r[1] * t[1]
        c = r[0] * r[0] + r[1] * r[1] - a * a
        disc = b * b - a2 * c
        exists = dm.value(disc) >= 0
        disc = dm.select(dm.value(disc) > 1e-30, disc, 1e-30)
        sign = dr.select(dm.value(b) >= 0, 1.0, -1.0)
        q = -(b + dm.sqrt(disc) * sign)
        q = dm.select(dr.abs(dm.value(q)) > 1e-30, q, -sign * 1e-30)
        near = c / q
        a2_safe = dm.select(dm.value(a2) > 1e-30, a2, 1e-30)
        far = q / a2_safe
        return far, near, exists

    def line_distance(self, r, t, a, crossed):
        """Straight-line distances ``(step, nearest)``: ``step`` limits the next step (the first
        root ahead, or once the surface has been crossed, the root closest to zero, behind);
        ``nearest`` is the root closest to zero (the track is on the surface when it is small)."""
        far, near, exists = self._roots(r, t, a)
        ahead = dr.select(near > 0, dr.select(far > 0, dr.minimum(near, far), near),
                          dr.select(far > 0, far, NO_INTERSECTION))
        step = dr.select(crossed, dr.select(exists, near, 0.0), dr.select(exists, ahead, NO_INTERSECTION))
        return step, dr.select(exists, near, NO_INTERSECTION)

    def snap_distance(self, r, t, a):
        """Root closest to zero (the track is within tolerance of the surface)."""
        _, near, _ = self._roots(r, t, a)
        return near

    def normal(self, r):
        inverse = 1.0 / dm.sqrt(r[0] * r[0] + r[1] * r[1])
        return (r[0] * inverse, r[1] * inverse, 0.0 * r[0])

    def local(self, r, a):
        return (a * dm.atan2(r[1], r[0]), r[2])

    def in_bounds(self, r, a):
        return dr.abs(r[2]) <= _bound(r, self.half_length)


@dataclass(frozen=True)
class Plane:
    """Plane n . r = a with unit ``normal`` n, local axis ``u_axis`` (v = n x u), centre (u0, v0)."""

    normal_vector: tuple = (0.0, 0.0, 1.0)
    u_axis: tuple = (1.0, 0.0, 0.0)
    half_u: float = math.inf
    half_v: float = math.inf
    center: tuple = (0.0, 0.0)
    kind = "plane"

    def __post_init__(self):
        n = _unit("normal_vector", self.normal_vector)
        u = _unit("u_axis", self.u_axis)
        if abs(sum(a * b for a, b in zip(n, u))) > 1e-6:
            raise ValueError("u_axis must be perpendicular to normal_vector")
        object.__setattr__(self, "normal_vector", n)
        object.__setattr__(self, "u_axis", u)
        _finite_positive("half_u", self.half_u)
        _finite_positive("half_v", self.half_v)

    @property
    def v_axis(self) -> tuple:
        n, u = self.normal_vector, self.u_axis
        return (n[1] * u[2] - n[2] * u[1], n[2] * u[0] - n[0] * u[2], n[0] * u[1] - n[1] * u[0])

    def level(self, r, a):
        return dm.dot(self.normal_vector, r) - a

    def level_rate(self, r, t):
        return dm.dot(self.normal_vector, t)

    def within(self, r, a, distance):
        """False where the plane is certainly farther than ``distance`` from r."""
        return dr.abs(self.level(r, a)) <= distance

    def line_distance(self, r, t, a, crossed):
        """``(step, nearest)`` as for :meth:`Cylinder.line_distance` (a line has one root)."""
        rate = self.level_rate(r, t)
        safe = dr.select(dr.abs(rate) > 1e-30, rate, 1e-30)
        d = -self.level(r, a) / safe
        return dr.select(crossed | (d > 0), d, NO_INTERSECTION), d

    def snap_distance(self, r, t, a):
        rate = dm.dot(self.normal_vector, t)
        rate = dm.select(dr.abs(dm.value(rate)) > 1e-30, rate, 1e-30)
        return (a - dm.dot(self.normal_vector, r)) / rate

    def normal(self, r):
        zero = 0.0 * dm.value(r[0])
        return tuple(n + zero for n in self.normal_vector)

    def local(self, r, a):
        return (dm.dot(self.u_axis, r) - self.center[0], dm.dot(self.v_axis, r) - self.center[1])

    def in_bounds(self, r, a):
        u, v = self.local(r, a)
        return (dr.abs(u) <= _bound(r, self.half_u)) & (dr.abs(v) <= _bound(r, self.half_v))


@dataclass(frozen=True)
class Disk(Plane):
    """Disk at z = a (normal +z), r_min <= rho <= r_max [mm]; local (rho [mm], phi [rad])."""

    r_min: float = 0.0
    r_max: float = math.inf
    kind = "disk"

    def __post_init__(self):
        super().__post_init__()
        if self.normal_vector != (0.0, 0.0, 1.0):
            raise ValueError("a Disk is perpendicular to z; use Plane for other orientations")
        if not 0 <= self.r_min < self.r_max:
            raise ValueError(f"need 0 <= r_min < r_max, got r_min={self.r_min}, r_max={self.r_max}")

    def local(self, r, a):
        return (dm.sqrt(r[0] * r[0] + r[1] * r[1]), dm.atan2(r[1], r[0]))

    def in_bounds(self, r, a):
        rho = dr.sqrt(r[0] * r[0] + r[1] * r[1])
        return (rho >= _bound(r, self.r_min)) & (rho <= _bound(r, self.r_max))


def _bound(r, value: float):
    """A bound as an opaque array: surfaces that differ only in their bounds share compiled kernels."""
    return dr.opaque(type(r[0]), value)


def _unit(name: str, vector) -> tuple:
    vector = tuple(float(v) for v in vector)
    if len(vector) != 3:
        raise ValueError(f"{name} must have 3 components, got {len(vector)}")
    norm = math.sqrt(sum(v * v for v in vector))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError(f"{name} must be a non-zero finite vector, got {vector}")
    return tuple(v / norm for v in vector)
