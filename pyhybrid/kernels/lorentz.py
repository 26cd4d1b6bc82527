"""Four-vector helpers for Dr.Jit kernels (no torch).

A :class:`FourVector` holds four Dr.Jit arrays ``(E, px, py, pz)`` in GeV,
one lane per event/particle (structure of arrays), metric (+, -, -, -). It is a
dataclass, so Dr.Jit treats it as a PyTree: it can be loop state in
``dr.while_loop``, an argument of ``dr.select``/``dr.eval``, and it carries AD
gradients like any array. Components may be 1-lane arrays or Python floats
that broadcast against N lanes.

Everything here is generic kinematics (dot products, masses, boosts,
rotations, angles); process-specific code lives in ``phase_space`` and
``matrix_elements``.

Example::

    p = FourVector(E, px, py, pz)
    q = FourVector.from_mass(m, qx, qy, qz)        # on-shell, E = sqrt(m^2 + |q|^2)
    s = (p + q).mass2()
    p_rest = p.boost_to_rest_frame_of(p + q)        # p in the (p + q) rest frame
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import drjit as dr

__all__ = ["FourVector", "dot", "total"]


@dataclass
class FourVector:
    """Four-vector (E, px, py, pz) [GeV] of Dr.Jit arrays (N lanes) or broadcastable scalars."""

    E: Any
    px: Any
    py: Any
    pz: Any

    # ------------------------------------------------------------ construction / conversion

    @classmethod
    def from_mass(cls, mass, px, py, pz) -> "FourVector":
        """On-shell vector of mass ``mass`` [GeV] and three-momentum (px, py, pz) [GeV]."""
        return cls(dr.sqrt(mass * mass + px * px + py * py + pz * pz), px, py, pz)

    @classmethod
    def from_columns(cls, columns: Sequence) -> "FourVector":
        """From four arrays ordered (E, px, py, pz)."""
        if len(columns) != 4:
            raise ValueError(f"a four-vector needs 4 components (E, px, py, pz), got {len(columns)}")
        return cls(*columns)

    def columns(self) -> list:
        """The components as a list ``[E, px, py, pz]``."""
        return [self.E, self.px, self.py, self.pz]

    # ------------------------------------------------------------ arithmetic

    def __add__(self, other: "FourVector") -> "FourVector":
        return FourVector(self.E + other.E, self.px + other.px, self.py + other.py, self.pz + other.pz)

    def __sub__(self, other: "FourVector") -> "FourVector":
        return FourVector(self.E - other.E, self.px - other.px, self.py - other.py, self.pz - other.pz)

    def __neg__(self) -> "FourVector":
        return FourVector(-self.E, -self.px, -self.py, -self.pz)

    def __mul__(self, factor) -> "FourVector":
        """Scale all components by a (per-lane) scalar."""
        return FourVector(self.E * factor, self.px * factor, self.py * factor, self.pz * factor)

    __rmul__ = __mul__

    # ------------------------------------------------------------ invariants and observables

    def dot(self, other: "FourVector"):
        """Minkowski product E E' - p.p' [GeV^2]."""
        return self.E * other.E - self.px * other.px - self.py * other.py - self.pz * other.pz

    def mass2(self):
        """Invariant mass squared [GeV^2] (may be slightly negative from rounding)."""
        return self.dot(self)

    def mass(self):
        """Invariant mass [GeV]; sqrt(max(m^2, 0)), so rounding never gives NaN."""
        return dr.sqrt(dr.maximum(self.mass2(), 0.0))

    def p2(self):
        """|p|^2 [GeV^2]."""
        return self.px * self.px + self.py * self.py + self.pz * self.pz

    def p(self):
        """|p| [GeV]."""
        return dr.sqrt(self.p2())

    def pt(self):
        """Transverse momentum w.r.t. the z axis [GeV]."""
        return dr.sqrt(self.px * self.px + self.py * self.py)

    def phi(self):
        """Azimuth atan2(py, px) in (-pi, pi]."""
        return dr.atan2(self.py, self.px)

    def cos_theta(self):
        """Cosine of the polar angle w.r.t. +z (1 for a vector at rest)."""
        p = self.p()
        return dr.select(p > 0, self.pz / p, 1.0)

    def rapidity(self):
        """Rapidity 0.5 ln((E + pz) / (E - pz))."""
        return 0.5 * dr.log((self.E + self.pz) / (self.E - self.pz))

    def eta(self):
        """Pseudorapidity -ln tan(theta / 2) = asinh(pz / pt)."""
        return dr.asinh(self.pz / self.pt())

    # ------------------------------------------------------------ Lorentz transformations

    def boost(self, bx, by, bz) -> "FourVector":
        """Active boost by velocity (bx, by, bz) (|b| < 1, units of c).

        A vector at rest becomes a vector moving with velocity b. The
        factor (gamma - 1) / b^2 is written as gamma^2 / (gamma + 1), which is
        regular at b = 0 and keeps gradients finite there.
        """
        b2 = bx * bx + by * by + bz * bz
        gamma = 1.0 / dr.sqrt(1.0 - b2)
        bp = bx * self.px + by * self.py + bz * self.pz
        along = gamma * gamma / (gamma + 1.0) * bp + gamma * self.E
        return FourVector(gamma * (self.E + bp), self.px + along * bx, self.py + along * by,
                          self.pz + along * bz)

    def boost_to_rest_frame_of(self, frame: "FourVector") -> "FourVector":
        """This vector seen in the rest frame of the (time-like) vector ``frame``."""
        return self.boost(-frame.px / frame.E, -frame.py / frame.E, -frame.pz / frame.E)

    def boost_from_rest_frame_of(self, frame: "FourVector") -> "FourVector":
        """Inverse of :meth:`boost_to_rest_frame_of`: this vector, given in the rest frame of
        ``frame``, seen in the frame where ``frame`` has its stated momentum."""
        return self.boost(frame.px / frame.E, frame.py / frame.E, frame.pz / frame.E)

    def rotate_z_to(self, ux, uy, uz) -> "FourVector":
        """Rotate the spatial part by the rotation taking +z onto the unit vector (ux, uy, uz).

        The rotation is about the axis z x u (Rodrigues); for u = -z, where that
        axis is undefined, it is the rotation by pi about the x axis.
        """
        # R = cos(a) I + sin(a) [k]x + (1 - cos(a)) k k^T with k = (z x u)/|z x u|, cos(a) = uz.
        # Written with k' = z x u = (-uy, ux, 0): (1 - cos a)/sin^2 a = 1/(1 + uz).
        flip = uz < -1.0 + 1e-12
        c = dr.select(flip, 0.0, 1.0 / (1.0 + dr.select(flip, 0.0, uz)))
        x, y, z = self.px, self.py, self.pz
        kx, ky = -uy, ux
        kdotp = kx * x + ky * y
        rx = uz * x + ky * z + c * kdotp * kx
        ry = uz * y - kx * z + c * kdotp * ky
        rz = uz * z + (kx * y - ky * x)
        return FourVector(self.E, dr.select(flip, x, rx), dr.select(flip, -y, ry), dr.select(flip, -z, rz))


def dot(p: FourVector, q: FourVector):
    """Minkowski product p.q [GeV^2]."""
    return p.dot(q)


def total(vectors: Sequence[FourVector]) -> FourVector:
    """Sum of a non-empty sequence of four-vectors."""
    if not vectors:
        raise ValueError("total() needs at least one four-vector")
    result = vectors[0]
    for v in vectors[1:]:
        result = result + v
    return result
