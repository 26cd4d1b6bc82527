"""Magnetic fields for track propagation (Dr.Jit; no torch).

Units: positions in mm, fields in Tesla. Every field evaluates B at a batch of
points (a 3-tuple of arrays, one lane per point) and, for the transport
Jacobian, also the field gradient ``dB_i/dx_j`` and the derivatives of B with
respect to its own parameters (the field's differentiable "global" parameters):
``evaluate_with_derivatives(r, gradient=True)`` returns ``(B, dB/dr, dB/dparameters)``;
with ``gradient=False`` (the ACTS-style transport, which neglects dB/dr) the
gradient is not computed and returned as structural zeros.
Structural zeros are ``None`` so that the Jacobian code skips them.
``proportional_to``: the name of the parameter theta with B = theta B^(r) (None if there is
none); the transport then carries one column for q/p and theta (see ``propagation``).
``spatially_constant``: dB/dr = 0 everywhere (the transport then carries no position columns:
the exact Jacobian costs what the ACTS one does, and equals it). A subclass of
:class:`UniformField` whose field varies in space must set it to False.
``symmetric_about_z`` (optional, default False): B(R r) = R B(r) for every rotation R about the z
axis; the exact transport then steps one tangent column fewer (see ``propagation._RotationRelation``).
A subclass of :class:`SolenoidField` that breaks the symmetry must set it to False.

Fields
------
* :class:`UniformField` -- parameters (bx, by, bz) [T].
* :class:`SolenoidField` -- finite solenoid (current sheet of radius R and
  half-length L) in the paraxial expansion, with its fringe field; parameters
  (b0 [T] = field at the centre, radius R [mm], half_length L [mm]).
* :class:`GridField` -- 3D regular Cartesian grid with trilinear interpolation;
  parameter (scale,) multiplying the map. Zero field outside the grid.

Parameters are Dr.Jit arrays of width 1 (broadcast to all lanes) or Python floats.
"""
from __future__ import annotations

from typing import Sequence

import drjit as dr

from pyhybrid.kernels.backend import inverse_sqrt

__all__ = ["UniformField", "SolenoidField", "GridField", "FIELD_KINDS"]


class UniformField:
    """B = (bx, by, bz) everywhere [T]."""

    names = ("bx", "by", "bz")
    proportional_to = None
    spatially_constant = True

    def __init__(self, bx, by, bz):
        self.b = (bx, by, bz)

    def evaluate(self, r, scale=None):
        """``scale`` (None: 1) times B at r."""
        zero = 0.0 * r[0]
        return tuple(_scaled(b, scale) + zero for b in self.b)

    def evaluate_with_derivatives(self, r, gradient: bool = True):
        parameter_derivatives = ((1.0, None, None), (None, 1.0, None), (None, None, 1.0))
        return self.evaluate(r), ((None,) * 3,) * 3, parameter_derivatives


class SolenoidField:
    """Field of a finite solenoid with fringe field (paraxial expansion).

    On the axis, a current sheet of radius R from z = -L to z = +L gives
    b(z) = B0 [u(z + L) - u(z - L)] / [u(L) - u(-L)] with u(zeta) = zeta / sqrt(zeta^2 + R^2),
    normalised so that b(0) = B0. Off the axis we use the expansion in the
    distance rho from the axis that keeps the field exactly curl-free:

        B_z = b(z) - rho^2 / 4 b''(z),      B_rho = -rho / 2 b'(z),

    its divergence is -rho^2 / 4 b'''(z) (small where rho << R; e.g. a tracker
    inside the coil). The field decays outside |z| > L: that is the fringe field.
    """

    names = ("b0", "radius", "half_length")
    proportional_to = "b0"
    spatially_constant = False
    symmetric_about_z = True  # B(R r) = R B(r) for rotations R about z (see propagation._RotationRelation)

    def __init__(self, b0, radius, half_length):
        self.b0 = b0
        self.radius = radius
        self.half_length = half_length
        # Constants of :meth:`evaluate` and :meth:`evaluate_with_derivatives` (computed once, outside
        # the stepping loops): b^(n) = b0 N f^(n) with N = 1 / (u(L) - u(-L)) = sqrt(L^2 + R^2) / (2 L).
        self._radius2 = radius * radius
        root = dr.sqrt(half_length * half_length + self._radius2)
        self._norm = root / (2.0 * half_length)
        scale = b0 * self._norm
        self._b_scale, self._b1_scale, self._b2_scale = scale, -0.5 * scale, 0.75 * scale
        self._scale_d_radius = b0 * radius / (2.0 * half_length * root)                          # b0 dN/dR
        self._scale_d_length = -b0 * self._radius2 / (2.0 * half_length * half_length * root)    # b0 dN/dL

    def _u(self, zeta):
        """u and its first three zeta-derivatives at zeta, u(zeta) = zeta / sqrt(zeta^2 + R^2)."""
        inv = inverse_sqrt(dr.fma(zeta, zeta, self._radius2))
        inv2 = inv * inv
        u1 = (self._radius2 * inv) * inv2
        u2 = (-3.0 * zeta) * u1 * inv2
        u3 = 3.0 * dr.fma(4.0 * zeta, zeta, -self._radius2) * (u1 * inv2) * inv2
        return zeta * inv, u1, u2, u3

    @staticmethod
    def _assemble(r, b, b1, b2):
        x, y, _ = r
        rho2 = x * x + y * y
        return (-0.5 * x * b1, -0.5 * y * b1, b - 0.25 * rho2 * b2)

    def evaluate(self, r, scale=None):
        """``scale`` (None: 1) times B at r: the hot path of the stepping loop (four calls per RK4 step), so
        written with the fewest operations: u, u' and -u''/3 at both coil ends, constants (and the
        loop-invariant ``scale``) folded in, and the fast inverse square root on the CPU (see
        :func:`~pyhybrid.kernels.backend.inverse_sqrt`)."""
        x, y, z = r
        u_plus = self._u_fast(z + self.half_length)
        u_minus = self._u_fast(z - self.half_length)
        b, minus_half_b1, minus_quarter_b2 = (
            _scaled(factor, scale) * (p - m)
            for factor, p, m in zip((self._b_scale, self._b1_scale, self._b2_scale), u_plus, u_minus))
        rho2 = x * x + y * y
        return (x * minus_half_b1, y * minus_half_b1, dr.fma(rho2, minus_quarter_b2, b))

    def _u_fast(self, zeta):
        """u, u' and -u''/3 at zeta (see :meth:`_u`)."""
        inv = inverse_sqrt(dr.fma(zeta, zeta, self._radius2))
        inv2 = inv * inv
        u1 = (self._radius2 * inv) * inv2
        return zeta * inv, u1, (zeta * u1) * inv2

    def evaluate_with_derivatives(self, r, gradient: bool = True):
        """B, dB/dr (structural zeros unless ``gradient``) and dB/d(b0, R, L) at r.

        With f^(n) = u^(n)(z + L) - u^(n)(z - L): d f^(n)/dL = u^(n+1)(z + L) + u^(n+1)(z - L); and
        since u^(n) is homogeneous of degree -n in (zeta, R), d u^(n)/dR = -(n u^(n) + zeta u^(n+1)) / R,
        so d f^(n)/dR = -(n f^(n) + (z + L) u^(n+1)(z + L) - (z - L) u^(n+1)(z - L)) / R.
        """
        x, y, z = r
        zp, zm = z + self.half_length, z - self.half_length
        plus, minus = self._u(zp), self._u(zm)
        f = [p - m for p, m in zip(plus, minus)]                                   # f and its derivatives 1-3
        b = [self._b_scale * fn for fn in f]
        field = self._assemble(r, b[0], b[1], b[2])

        spatial_gradient = ((None,) * 3,) * 3
        if gradient:
            rho2 = x * x + y * y
            half_b1 = -0.5 * b[1]
            spatial_gradient = ((half_b1, None, -0.5 * x * b[2]),
                                (None, half_b1, -0.5 * y * b[2]),
                                (-0.5 * x * b[2], -0.5 * y * b[2], b[1] - 0.25 * rho2 * b[3]))

        inverse_radius = 1.0 / self.radius
        df_dlen = [plus[n + 1] + minus[n + 1] for n in range(3)]
        df_drad = [-(n * f[n] + (zp * plus[n + 1] - zm * minus[n + 1])) * inverse_radius for n in range(3)]
        # d b^(n) = b0 (N d f^(n) + f^(n) dN)
        db_drad = [dr.fma(self._b_scale, df_drad[n], self._scale_d_radius * f[n]) for n in range(3)]
        db_dlen = [dr.fma(self._b_scale, df_dlen[n], self._scale_d_length * f[n]) for n in range(3)]
        parameter_derivatives = (self._assemble(r, *(self._norm * fn for fn in f[:3])),
                                 self._assemble(r, *db_drad),
                                 self._assemble(r, *db_dlen))
        return field, spatial_gradient, parameter_derivatives


class GridField:
    """Field map on a regular Cartesian grid, trilinearly interpolated, times ``scale``.

    values: ``(bx, by, bz)``, flat Dr.Jit arrays of ``nx*ny*nz`` nodes, node
    ``(i, j, k)`` at index ``(i*ny + j)*nz + k`` and position ``origin + (i, j, k)*spacing``.
    The interpolation is differentiable with respect to the node values (Dr.Jit AD
    through the gathers) and the query point; outside the grid B = 0.
    """

    names = ("scale",)
    proportional_to = "scale"
    spatially_constant = False

    def __init__(self, values: Sequence, shape: Sequence[int], origin: Sequence[float],
                 spacing: Sequence[float], scale=1.0):
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"grid shape must be three sizes >= 2, got {tuple(shape)}")
        if min(spacing) <= 0:
            raise ValueError(f"grid spacing must be positive, got {tuple(spacing)}")
        self.values = tuple(values)
        self.shape = tuple(int(n) for n in shape)
        self.origin = tuple(float(o) for o in origin)
        self.spacing = tuple(float(s) for s in spacing)
        self.scale = scale

    def _cell(self, r):
        """Lower corner index, fractions in the cell, and the inside mask."""
        Float = type(r[0] + 0.0 * r[1])
        Int = dr.int32_array_t(Float)
        index, fraction, inside = [], [], True
        for axis in range(3):
            u = (r[axis] - self.origin[axis]) / self.spacing[axis]
            inside = inside & (u >= 0) & (u <= self.shape[axis] - 1)
            i = dr.clip(Int(dr.floor(u)), 0, self.shape[axis] - 2)
            index.append(i)
            fraction.append(u - Float(i))
        return index, fraction, inside

    def _corners(self, index):
        ny, nz = self.shape[1], self.shape[2]
        UInt = dr.uint32_array_t(type(self.values[0]))
        base = UInt((index[0] * ny + index[1]) * nz + index[2])
        corners = {}
        for di in (0, 1):
            for dj in (0, 1):
                for dk in (0, 1):
                    offset = (di * ny + dj) * nz + dk
                    corners[di, dj, dk] = [dr.gather(type(v), v, base + offset) for v in self.values]
        return corners

    def _interpolate(self, r, derivatives: bool):
        index, (tx, ty, tz), inside = self._cell(r)
        corners = self._corners(index)
        weights_x, weights_y, weights_z = (1.0 - tx, tx), (1.0 - ty, ty), (1.0 - tz, tz)
        slopes = [(-1.0 / s, 1.0 / s) for s in self.spacing]
        field = [0.0, 0.0, 0.0]
        gradient = [[0.0] * 3 for _ in range(3)]
        for (di, dj, dk), value in corners.items():
            w = weights_x[di] * weights_y[dj] * weights_z[dk]
            dw = (slopes[0][di] * weights_y[dj] * weights_z[dk],
                  weights_x[di] * slopes[1][dj] * weights_z[dk],
                  weights_x[di] * weights_y[dj] * slopes[2][dk])
            for c in range(3):
                field[c] = field[c] + w * value[c]
                if derivatives:
                    for axis in range(3):
                        gradient[c][axis] = gradient[c][axis] + dw[axis] * value[c]
        field = tuple(dr.select(inside, f, 0.0) for f in field)
        gradient = tuple(tuple(dr.select(inside, g, 0.0) for g in row) for row in gradient)
        return field, gradient

    def evaluate(self, r, scale=None):
        """``scale`` (None: 1) times B at r."""
        field, _ = self._interpolate(r, derivatives=False)
        return tuple(_scaled(self.scale, scale) * b for b in field)

    def evaluate_with_derivatives(self, r, gradient: bool = True):
        unscaled, grid_gradient = self._interpolate(r, derivatives=gradient)
        field = tuple(self.scale * b for b in unscaled)
        if gradient:
            grid_gradient = tuple(tuple(self.scale * g for g in row) for row in grid_gradient)
        else:
            grid_gradient = ((None,) * 3,) * 3
        return field, grid_gradient, (unscaled,)


#: Field kinds by name with their parameter names (the differentiable global parameters).
FIELD_KINDS = {"uniform": UniformField, "solenoid": SolenoidField, "grid": GridField}


def _scaled(factor, scale):
    """factor * scale; ``scale`` is a per-lane factor that a stepper folds into the field's constants
    (loop-invariant, so the multiplication leaves the stepping loop), None for 1."""
    return factor if scale is None else scale * factor
