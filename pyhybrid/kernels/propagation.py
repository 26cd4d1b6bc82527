"""Charged-particle propagation through a magnetic field and detector layers (Dr.Jit; no torch).

Track state: ACTS free parameters, one lane per track,

    (x, y, z [mm], t [ns], tx, ty, tz [unit direction], q/p [e/GeV]),

see :class:`FreeParameters`. Input directions are normalised; a track with a non-finite
parameter or a direction of zero (or overflowing) length is not propagated: it misses every
layer and is flagged in :attr:`LayerHits.unusable` (the torch layer then raises). q/p = 0 means a
neutral / infinite-momentum track: a straight line, no material effects, time advancing at the
speed of light.

Navigation: :func:`propagate_layers` visits the layers in the order given.
For each layer it steps (RK4 or adaptive RKN, see :mod:`steppers`) towards the
layer's surface, limiting each step to the straight-line distance to the
surface (as the ACTS navigator does) until the track is within
``surface_tolerance`` of it, then moves it onto the surface along its tangent.
A layer is *hit* when the crossing lies inside its bounds; the hit records the
state on the surface (before the layer's material), local coordinates and the
path length from the start, and the material of the layer is applied. A layer
is *missed* when the crossing is out of bounds, when the track turns away
(passes a closest approach without crossing, e.g. a curler below a cylinder's
radius), leaves the world volume, exceeds ``max_path`` or ``max_steps`` for
that layer, or has stopped in earlier material. A missed layer leaves the
track state unchanged (the next layer is searched from the last hit), its
outputs are zero and ``valid`` is False -- never NaN. Each layer is hit at
most once, on its first crossing after the previous hit.

Jacobians (forward mode, as ACTS): within a segment between two surfaces the
derivatives of (r, T) with respect to the segment's start (x, y, z, T, q/p)
and the field parameters are carried through every Runge-Kutta stage (including
dB/dr with ``transport_jacobian="exact"``; neglecting it, as ACTS' EigenStepper
does, with ``"acts"``). At the surface they are combined, with :mod:`dual` numbers, with the
surface intersection (the path-length correction of ACTS' free-to-bound
projection), the derivative with respect to the surface position parameter,
the time, local coordinates and the material interaction (including the
material thickness). Each layer's Jacobians are kept (O(batch x layers)
memory, independent of the number of steps); :func:`layers_vjp` runs the
reverse sweep J^T g over layers. The covariance (8x8 free) is transported with
the same Jacobians, with multiple scattering and energy-loss straggling added
at each hit layer.

Derivatives come from these Jacobians (``jacobian=True``, :func:`layers_vjp`), not from Dr.Jit's
AD: reverse-mode AD through the symbolic stepping loops is not supported (it would tape every step),
and inputs with gradients enabled are refused with a ValueError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field
from typing import Sequence

import drjit as dr

from pyhybrid.kernels import dual as dm
from pyhybrid.kernels.backend import KernelTypes, check_integer, types_of
from pyhybrid.kernels.material import Material, energy_over_momentum, interact
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN, TangentColumn, nystrom_step
from pyhybrid.kernels.surfaces import NO_INTERSECTION, Cylinder, Disk, Plane
from pyhybrid.units import B_CURVATURE, MUON_MASS, PION_MASS, SPEED_OF_LIGHT

__all__ = ["Particle", "MUON", "PION", "KAON", "PROTON", "PARTICLES", "FreeParameters", "Layer",
           "PropagationOptions", "SCATTERING_MODES", "TRANSPORT_JACOBIANS", "LayerHits", "JacobianRecord",
           "PathResult", "propagate_path", "propagate_layers", "layers_vjp", "output_rows", "layer_columns",
           "row_major", "random_tracks", "coherent_lanes", "inverse_permutation", "LANE_WINDOW",
           "FREE_NAMES", "RUNNING", "REACHED", "MISSED"]

RUNNING, REACHED, MISSED = 0, 1, 2
FREE_NAMES = ("x", "y", "z", "t", "tx", "ty", "tz", "qop")
SCATTERING_MODES = ("none", "covariance", "sample")
TRANSPORT_JACOBIANS = ("exact", "acts")
_TIME, _QOP = 3, 7


@dataclass(frozen=True)
class Particle:
    """Particle hypothesis: mass [GeV] and absolute charge [e] (q/p carries the sign)."""

    name: str
    mass: float
    charge: float = 1.0

    def __post_init__(self):
        if not self.mass > 0:
            raise ValueError(f"particle mass must be positive (GeV), got {self.mass!r}")
        if not self.charge > 0:
            raise ValueError(f"particle charge is the absolute charge in e, must be positive, got {self.charge!r}")


MUON = Particle("muon", MUON_MASS)
PION = Particle("pion", PION_MASS)
KAON = Particle("kaon", 0.493677)
PROTON = Particle("proton", 0.93827208816)
PARTICLES = {p.name: p for p in (MUON, PION, KAON, PROTON)}


@dataclass
class FreeParameters:
    """Free track parameters, one lane per track (3-tuples of arrays for vectors)."""

    position: tuple
    time: object
    direction: tuple
    qop: object

    @classmethod
    def from_columns(cls, columns: Sequence) -> "FreeParameters":
        """From the 8 columns (x, y, z, t, tx, ty, tz, q/p)."""
        if len(columns) != 8:
            raise ValueError(f"free parameters need 8 columns, got {len(columns)}")
        return cls(tuple(columns[0:3]), columns[3], tuple(columns[4:7]), columns[7])

    def columns(self) -> list:
        return [*self.position, self.time, *self.direction, self.qop]


@dataclass(frozen=True)
class Layer:
    """A detector layer: a surface (its position parameter is passed separately) and optional material."""

    surface: Cylinder | Disk | Plane
    material: Material | None = None


@dataclass(frozen=True)
class PropagationOptions:
    """Stepping, navigation and material-effect settings.

    energy_loss: apply the mean Bethe-Bloch loss at each hit layer (and its
    straggling to the covariance). scattering: "none"; "covariance" (Highland
    multiple scattering enters the covariance only); "sample" (the direction is
    deflected by Gaussian angles, reparametrised so that derivatives flow through
    theta0; the covariance then excludes it). Lengths in mm.
    transport_jacobian: "exact" (the derivative of the discrete steps, including the
    field gradient dB/dr in every Runge-Kutta stage) or "acts" (dB/dr neglected in the
    stages, as ACTS' EigenStepper: cheaper, exact in a uniform field; the dependence
    on the field parameters is kept; see docs/propagation.md for its accuracy).
    """

    stepper: RK4 | AdaptiveRKN = RK4()
    particle: Particle = MUON
    energy_loss: bool = True
    scattering: str = "covariance"
    surface_tolerance: float = 1e-2
    max_steps: int = 10000
    max_path: float = 1e5
    world_radius: float = math.inf
    world_half_length: float = math.inf
    transport_jacobian: str = "exact"

    def __post_init__(self):
        if self.scattering not in SCATTERING_MODES:
            raise ValueError(f"scattering must be one of {SCATTERING_MODES}, got {self.scattering!r}")
        if self.transport_jacobian not in TRANSPORT_JACOBIANS:
            raise ValueError(f"transport_jacobian must be one of {TRANSPORT_JACOBIANS}, "
                             f"got {self.transport_jacobian!r}")
        for name in ("surface_tolerance", "max_path", "world_radius", "world_half_length"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        object.__setattr__(self, "max_steps", check_integer(self.max_steps, "max_steps", 1))


# ---------------------------------------------------------------- targets of one stepping loop


class _SurfaceTarget:
    """Stepping towards a surface with position parameter ``a``."""

    def __init__(self, surface, a):
        self.surface, self.a = surface, a

    def level(self, r, s):
        return self.surface.level(r, self.a)

    def level_rate(self, r, t):
        return self.surface.level_rate(r, t)

    def within(self, r, s, distance):
        return self.surface.within(r, self.a, distance)

    def line_distance(self, r, t, s, crossed):
        return self.surface.line_distance(r, t, self.a, crossed)

    def snap_distance(self, r, t, s, a):
        return self.surface.snap_distance(r, t, a)


class _PathTarget:
    """Stepping a fixed path length."""

    def __init__(self, length: float):
        self.length = length

    def level(self, r, s):
        return s - self.length

    def level_rate(self, r, t):
        return 1.0 + 0.0 * t[0]

    def within(self, r, s, distance):
        return self.length - s <= distance

    def line_distance(self, r, t, s, crossed):
        return self.length - s, self.length - s

    def snap_distance(self, r, t, s, a):
        return self.length - s


@dataclass
class _Loop:
    """State of the stepping loop (one lane per track).

    ``h``, ``max_error`` and ``accepted`` are carried only by the adaptive stepper (None for RK4,
    whose step size is a compile-time constant and whose every iteration is an accepted step):
    fewer loop variables, fewer live registers in the compiled loop.
    """

    r: tuple
    t: tuple
    s: object
    iterations: object
    status: object
    crossed: object
    approached: object
    distance: object     # straight-line distance that limits the next step (see ``line_distance``)
    columns: list        # [(dr, dt)] tangent columns (empty without Jacobian)
    h: object = None          # accuracy step size of the adaptive stepper
    max_error: object = None  # largest error estimate of an accepted step (adaptive stepper)
    accepted: object = None   # accepted steps (adaptive stepper)


def _check(loop: _Loop, target, side, options: PropagationOptions, running, next_step):
    """Update crossing/approach flags, the distance to the target and the status at the current point.

    Only the signs of the target's level function and its rate are used (cheap: no square roots).
    The straight-line distance to the target (a square root and two divisions for a cylinder) only
    matters where the target may lie within the next step (``next_step`` [mm], the largest step
    size): it is computed in a branch that a SIMD packet (GPU warp) skips when all its lanes are
    farther (most steps); elsewhere it is "no intersection" (a full step, not on the surface).
    """
    crossed = side * target.level(loop.r, loop.s) < 0
    approaching = side * target.level_rate(loop.r, loop.t) < 0
    approached = loop.approached | approaching
    # A crossing lies within the last step; the margin covers |T| != 1 by rounding and the tolerance.
    near = crossed | target.within(loop.r, loop.s, 1.01 * next_step + options.surface_tolerance)
    far = dr.full(type(loop.s), NO_INTERSECTION, dr.width(loop.s))
    distance, nearest = dr.if_stmt((loop.r, loop.t, loop.s, crossed), near,
                                   lambda r, t, s, c: target.line_distance(r, t, s, c),
                                   lambda r, t, s, c: (far, far))
    reached = dr.abs(nearest) < options.surface_tolerance
    missed = (approached & ~approaching & ~crossed) | (loop.s > options.max_path) | \
        (loop.iterations >= options.max_steps)
    if math.isfinite(options.world_radius):
        missed = missed | (loop.r[0] * loop.r[0] + loop.r[1] * loop.r[1] > options.world_radius ** 2)
    if math.isfinite(options.world_half_length):
        missed = missed | (dr.abs(loop.r[2]) > options.world_half_length)
    status = dr.select(running & reached, REACHED, dr.select(running & missed, MISSED, loop.status))
    return crossed, approached, distance, status


def _step_to_target(field, target, r, t, lam, options: PropagationOptions, columns=None, active=None):
    """Run the stepping loop until every lane reached or missed its target.

    ``columns``: list of :class:`TangentColumn` to carry (or None); ``active``: lanes to step (None:
    all; the others are MISSED without a step). Returns the final loop state (unevaluated: the
    loop is compiled into the kernel that evaluates its results).
    """
    types = types_of(r[0])
    stepper = options.stepper
    n = dr.width(r[0])
    zero = dr.zeros(types.Float, n)
    side = dr.select(target.level(r, zero) > 0, 1.0, -1.0)
    metadata = [(c.d_lambda, c.field_parameter, c.per_lambda) for c in columns or []]
    status = dr.full(types.UInt32, RUNNING, n) if active is None else dr.select(active, RUNNING, MISSED)
    loop = _Loop(r=tuple(types.Float(v) + zero for v in r), t=tuple(types.Float(v) + zero for v in t), s=zero,
                 iterations=dr.zeros(types.UInt32, n), status=status,
                 crossed=dr.zeros(types.Bool, n), approached=dr.zeros(types.Bool, n), distance=zero,
                 columns=[(_dense(c.dr, zero), _dense(c.dt, zero)) for c in columns or []])
    if stepper.adaptive:
        loop.h, loop.max_error, loop.accepted = zero + stepper.initial_step, zero, dr.zeros(types.UInt32, n)

    def largest_step(loop):
        return loop.h if stepper.adaptive else stepper.step_size

    running = loop.status == RUNNING
    loop.crossed, loop.approached, loop.distance, loop.status = _check(loop, target, side, options, running,
                                                                       largest_step(loop))

    def cond(loop):
        return loop.status == RUNNING

    def body(loop):
        running = loop.status == RUNNING
        h_max = largest_step(loop)
        limited = dr.abs(loop.distance) < h_max
        h = dr.select(limited, loop.distance, dr.select(loop.crossed, -h_max, h_max))
        if not stepper.adaptive:
            # A step of size 0 is exactly the identity (values and tangents): finished lanes need no
            # select, so the old state need not stay alive across the step (fewer live registers).
            h = dr.select(running, h, 0.0)
        tangents = [TangentColumn(d_r, d_t, *meta) for (d_r, d_t), meta in zip(loop.columns, metadata)]
        r_new, t_new, error, new_columns = nystrom_step(field, stepper.tableau, loop.r, loop.t, lam, h,
                                                        tangents if columns else None,
                                                        error_estimate=stepper.adaptive,
                                                        spatial_gradient=_with_field_gradient(field, options))
        if stepper.adaptive:
            accept = (error <= stepper.tolerance) | (dr.abs(h) <= stepper.min_step)
            h_next = stepper.next_step(dr.abs(h), error)
            loop.h = dr.select(running & ~(accept & limited), h_next, loop.h)
            loop.max_error = dr.select(running & accept, dr.maximum(loop.max_error, error), loop.max_error)
            advance = running & accept
            r_new = tuple(dr.select(advance, a, b) for a, b in zip(r_new, loop.r))
            t_new = tuple(dr.select(advance, a, b) for a, b in zip(t_new, loop.t))
            new_columns = [TangentColumn(tuple(dr.select(advance, a, b) for a, b in zip(new.dr, d_r)),
                                         tuple(dr.select(advance, a, b) for a, b in zip(new.dt, d_t)))
                           for new, (d_r, d_t) in zip(new_columns or [], loop.columns)]
            h = dr.select(advance, h, 0.0)
            loop.accepted = dr.select(advance, loop.accepted + 1, loop.accepted)
        loop.r, loop.t, loop.s = r_new, t_new, loop.s + h
        if columns:
            loop.columns = [(new.dr, new.dt) for new in new_columns]
        loop.iterations = dr.select(running, loop.iterations + 1, loop.iterations)
        loop.crossed, loop.approached, loop.distance, loop.status = _check(loop, target, side, options, running,
                                                                           largest_step(loop))
        return (loop,)

    (loop,) = dr.while_loop((loop,), cond, body)
    if not stepper.adaptive:  # every RK4 iteration is an accepted step
        loop.accepted, loop.max_error = loop.iterations, zero
    return loop


def _with_field_gradient(field, options: PropagationOptions) -> bool:
    """Whether the transport includes dB/dr (else the position-only columns are not carried): the
    exact Jacobian in a field that varies in space."""
    return options.transport_jacobian == "exact" and not getattr(field, "spatially_constant", False)


def _dense(vector, zero):
    return tuple(zero + (0.0 if v is None else v) for v in vector)


# ---------------------------------------------------------------- states with derivatives


@dataclass
class _SegmentStart:
    """Start of a segment: unit direction t0, two unit vectors e1, e2 perpendicular to it, k0 = dT/ds,
    and which tangent columns the segment carries (see :meth:`columns`)."""

    t0: tuple
    e1: tuple
    e2: tuple
    k0: tuple
    n_field: int
    field_gradient: bool      # carry the field-parameter columns
    position_columns: bool    # carry the position columns (False: the transport neglects dB/dr)
    proportional: int | None  # index of the field parameter theta with B = theta B^ (one column for it and q/p)
    rotation: "_RotationRelation | None" = None  # a direction column follows from the others (_RotationRelation)

    @classmethod
    def of(cls, field, r, t, lam, options: PropagationOptions, field_gradient: bool):
        e1, e2 = dm.perpendicular_basis(t)
        b = field.evaluate(r)
        k0 = tuple(lam * c for c in dm.cross(t, b))
        proportional_to = getattr(field, "proportional_to", None)
        proportional = field.names.index(proportional_to) if proportional_to and field_gradient else None
        position_columns = _with_field_gradient(field, options)
        rotation = None
        if ROTATION_RELATION and position_columns and getattr(field, "symmetric_about_z", False):
            rotation = _RotationRelation.of(r, t, e1, e2, k0)
        return cls(tuple(t), e1, e2, k0, len(field.names), field_gradient, position_columns, proportional, rotation)

    def columns(self) -> list[TangentColumn]:
        """Tangent columns carried through the stepping loop.

        Position along e1, e2 (only with dB/dr in the transport: without it they stay pure
        translations); direction along e1, e2; q/p; the field parameters (if ``field_gradient``).
        Only two direction columns are needed: directions stay unit vectors, so their variations
        are perpendicular to them. The position column along t0 follows from the flow property
        (see :func:`_segment_duals`), and with ``rotation`` one of the direction columns too: the
        loop then carries one direction column, along ``rotation.carried`` (e1 or e2 per lane; see
        :class:`_RotationRelation`). For a field proportional to one of its parameters theta
        (the solenoid's b0, a map's scale) the q/p and theta columns are one column, d/d(lambda theta).
        """
        none = (None, None, None)
        columns = [TangentColumn(self.e1, none), TangentColumn(self.e2, none)] if self.position_columns else []
        if self.rotation is None:
            columns += [TangentColumn(none, self.e1), TangentColumn(none, self.e2)]
        else:
            columns.append(TangentColumn(none, self.rotation.carried))
        if self.proportional is None:
            columns.append(TangentColumn(none, none, d_lambda=B_CURVATURE))
        else:
            columns.append(TangentColumn(none, none, field_parameter=self.proportional, per_lambda=True))
        if self.field_gradient:
            columns += [TangentColumn(none, none, field_parameter=g) for g in range(self.n_field)
                        if g != self.proportional]
        return columns



#: Solve for a direction column where the field is symmetric about the z axis (see
#: :class:`_RotationRelation`); False steps every column (the tests compare the two). Read when the
#: kernels are traced: a frozen recording (``Propagator(freeze_kernels=True)``) keeps the setting it
#: was recorded with.
ROTATION_RELATION = True
#: Smallest coefficient (see :class:`_RotationRelation`) for which a direction column is solved for
#: instead of stepped.
ROTATION_MIN_COEFFICIENT = 0.2


@dataclass
class _RotationRelation:
    """One linear relation among a segment's tangent columns when the field is symmetric under
    rotations R about the z axis, B(R r) = R B(r) (a solenoid; ``field.symmetric_about_z``).

    Every Runge-Kutta stage is then equivariant, k(R r, R T) = R k(r, T), so the steps taken, at
    their sizes, map a rotated start onto the rotated end whatever chose the sizes (the target, the
    error control); and the tangent columns, which carry the derivative of those steps, carry the
    infinitesimal rotation G = (z x r, z x T) of the start into that of the end. At the start,
    G0 = alpha1 P1 + alpha2 P2 + alpha_t (t0, 0) + beta1 D1 + beta2 D2 with (t0, 0) = y'(0) - kappa1 D1
    - kappa2 D2 (alpha_i = e_i . z x r0, alpha_t = t0 . z x r0, beta_i = e_i . z x t0,
    kappa_i = k0 . e_i); the flow property carries y'(0) to y'(s). Hence at the end

        (z x r, z x T) = alpha1 P1 + alpha2 P2 + alpha_t y'(s) + c1 D1 + c2 D2,   c_i = beta_i - alpha_t kappa_i,

    which gives, per lane, the direction column with the larger |c_i| from the other one (``carried``
    is the start direction of the column the loop carries) where that |c_i| is at least
    :data:`ROTATION_MIN_COEFFICIENT` ((beta1, beta2) are the components of z x t0, of length
    sin theta; for a helix from the origin, at transverse radius R on a circle of radius rho, the
    largest |c_i| is about sin theta (1 - sin^2 theta R^2 / (2 rho^2))). The stepping loop then carries
    four columns instead of five: 1685 instead of 1954 instructions per iteration of the compiled
    float32 loop (AVX-512), a gradient call 9-10 % shorter in the benchmark. The lanes below the
    threshold (directions within 12-16 degrees of the z axis, a helix centred on the axis, for which
    the rotation is a shift along the track) step the column in a second loop of their own
    (:func:`_step_segment`), in a branch that the SIMD packets (GPU warps) without such a lane
    skip. (Stepping it in a branch inside the one loop kept it in the loop's state, and saved only
    2-5 %.)

    Accuracy. The solved column inherits the flow property's truncation error (the discrete steps
    satisfy it to the stepper's local error), amplified by |alpha_t / c_i|: in float64 it agrees
    with the stepped column to 1e-11 with 5 mm RK4 steps, 1e-7 with 50 mm and 2e-5 with 200 mm
    steps, and neither is closer to finite differences of the discrete map. Rounding is amplified
    by about |z x r| / (|c_i| s) for a segment of length s at distance |z x r| from the axis: in
    float32 a very short segment far from the axis (s ~ 1 mm at R ~ 1 m) has its direction column
    only to ~1e-4 of its size (2e-6 stepped); the benchmark's float32 gradients are as close to
    the float64 ones as with every column stepped.
    """

    alpha1: object
    alpha2: object
    alpha_t: object
    c_solved: object      # c_i of the column solved for
    c_carried: object     # c_i of the column the loop carries
    solve_second: object  # lanes that solve for D2 (and carry D1); the others solve for D1
    stepped: object       # lanes that step the solved-for column (coefficient too small)
    carried: tuple        # start direction of the column the loop carries: e2 or e1 per lane
    solved: tuple         # start direction of the other one: e1 or e2

    @classmethod
    def of(cls, r, t, e1, e2, k0):
        z_cross_r, z_cross_t = _z_cross(r), _z_cross(t)
        alpha_t = dm.dot(t, z_cross_r)
        c1 = dm.dot(e1, z_cross_t) - alpha_t * dm.dot(k0, e1)
        c2 = dm.dot(e2, z_cross_t) - alpha_t * dm.dot(k0, e2)
        solve_second = dr.abs(c2) > dr.abs(c1)
        c_solved, c_carried = dr.select(solve_second, c2, c1), dr.select(solve_second, c1, c2)
        carried = tuple(dr.select(solve_second, a, b) for a, b in zip(e1, e2))
        solved = tuple(dr.select(solve_second, b, a) for a, b in zip(e1, e2))
        return cls(dm.dot(e1, z_cross_r), dm.dot(e2, z_cross_r), alpha_t, c_solved, c_carried, solve_second,
                   ~(dr.abs(c_solved) >= ROTATION_MIN_COEFFICIENT), carried, solved)

    def solve(self, end, p1, p2, flow, carried, stepped_column):
        """(D1, D2) at the end of the segment, one 3-vector each (the r or the T part: ``end``, ``flow`` =
        y'(s) and the columns' parts alike), from the carried direction column and the others;
        ``stepped_column`` where the other one was stepped."""
        inverse = 1.0 / dr.select(self.stepped, 1.0, self.c_solved)
        solved = [dr.select(self.stepped, x,
                            (g - self.alpha1 * a - self.alpha2 * b - self.alpha_t * f - self.c_carried * d) * inverse)
                  for g, a, b, f, d, x in zip(_z_cross(end), p1, p2, flow, carried, stepped_column)]
        d1 = tuple(dr.select(self.solve_second, c, x) for c, x in zip(carried, solved))
        d2 = tuple(dr.select(self.solve_second, x, c) for c, x in zip(carried, solved))
        return d1, d2


def _z_cross(v):
    """z x v."""
    return (-v[1], v[0], 0.0 * v[2])


def _step_segment(field, target, start: _SegmentStart | None, r, t, lam, options: PropagationOptions, active=None):
    """:func:`_step_to_target` with the segment's tangent columns (``start``: None for none).

    Where a direction column follows from the rotation relation the loop does not carry it. A
    second loop steps it for the lanes where it cannot be solved for (taking the same steps: the
    same arithmetic on the same start; on CUDA, where the compiler may fuse multiply-adds
    differently in the two loops, an adaptive stepper's step sizes could differ in the last bits),
    in a branch that the SIMD packets (GPU warps) without such a lane skip. The returned loop's columns
    are then P1, P2, that column (its start value in the lanes where :func:`_segment_duals` solves
    for it), the carried direction column and the rest.
    """
    columns = None if start is None else start.columns()
    loop = _step_to_target(field, target, r, t, lam, options, columns, active)
    if start is not None and start.rotation is not None:
        stepped = start.rotation.stepped if active is None else active & start.rotation.stepped

        def step_column(r, t, lam, direction, stepped):
            column = [TangentColumn((None,) * 3, direction)]
            return _step_to_target(field, target, r, t, lam, options, column, stepped).columns[0]

        def start_value(r, t, lam, direction, stepped):
            zero = 0.0 * r[0]
            return (zero, zero, zero), tuple(zero + v for v in direction)

        other = dr.if_stmt((tuple(r), tuple(t), lam, start.rotation.solved, stepped), stepped, step_column,
                           start_value)
        loop.columns = [*loop.columns[:2], other, *loop.columns[2:]]  # after P1, P2
    return loop


def _segment_duals(field, loop: _Loop, start: _SegmentStart, lam, n_columns: int):
    """Duals of r and T at the end of the loop over the layer columns (8 free, field, a, thickness).

    Free columns from the carried ones: d/dT0 = e1 (x) D1 + e2 (x) D2 (variations perpendicular
    to t0); d/dr0 = e1 (x) P1 + e2 (x) P2 + t0 (x) A, where the column along t0 follows from
    the flow property  d/dr0 . t0 + d/dT0 . k0 = y'(s)  (starting a little further along the
    track = arriving a little further), y'(s) = (T, lambda T x B) at the end. Without carried
    position columns (the transport neglects dB/dr) P1 = (e1, 0), P2 = (e2, 0): translations.
    With ``start.rotation``, one of D1, D2 follows from the others where it was not stepped (see
    :class:`_RotationRelation`).

    For a field B = theta B^(r) (``start.proportional``) every Runge-Kutta stage k = lambda T x B
    = (lambda theta) T x B^ depends on lambda and theta only through mu = lambda theta, so the
    steps (at their fixed sizes) and their exact or ACTS tangents do too: with the carried column
    C = d/dmu, d/d(q/p) = c theta C and d/dtheta = lambda C (no division: valid for theta = 0 or
    q/p = 0 as well).
    """
    carried = list(loop.columns)
    if start.position_columns:
        p1, p2 = carried.pop(0), carried.pop(0)
    else:
        p1, p2 = (start.e1, (0.0, 0.0, 0.0)), (start.e2, (0.0, 0.0, 0.0))
    d1, d2 = carried.pop(0), carried.pop(0)
    q, *field_columns = carried
    if start.proportional is not None:
        per_mu = q
        theta = getattr(field, field.names[start.proportional])
        q = _scaled_column(per_mu, B_CURVATURE * theta)
        field_columns.insert(start.proportional, _scaled_column(per_mu, lam))
    k_end = tuple(lam * c for c in dm.cross(loop.t, field.evaluate(loop.r)))
    if start.rotation is not None:  # d1: the solved-for (or stepped) column, d2: the carried one
        parts = [start.rotation.solve(end, p1[which], p2[which], flow, d2[which], d1[which])
                 for which, (end, flow) in enumerate(((loop.r, loop.t), (loop.t, k_end)))]
        d1, d2 = tuple(part[0] for part in parts), tuple(part[1] for part in parts)
    along_e1, along_e2 = dm.dot(start.k0, start.e1), dm.dot(start.k0, start.e2)

    def duals(values, which, slope):
        result = []
        for i, value in enumerate(values):
            p1_i, p2_i, d1_i, d2_i = p1[which][i], p2[which][i], d1[which][i], d2[which][i]
            along = dr.fma(-along_e2, d2_i, dr.fma(-along_e1, d1_i, slope[i]))
            tangents = [None] * n_columns
            for m in range(3):
                tangents[m] = dr.fma(start.t0[m], along, dr.fma(start.e1[m], p1_i, start.e2[m] * p2_i))
                tangents[4 + m] = dr.fma(start.e1[m], d1_i, start.e2[m] * d2_i)
            tangents[_QOP] = q[which][i]
            for g, column in enumerate(field_columns):
                tangents[8 + g] = column[which][i]
            result.append(dm.Dual(value, tangents))
        return tuple(result)

    return duals(loop.r, 0, loop.t), duals(loop.t, 1, k_end)


def _scaled_column(column, factor):
    return tuple(tuple(factor * v for v in vector) for vector in column)


def _inverse_speed(qop, particle: Particle):
    """dt/ds = E / (p c) [ns/mm] from q/p (1/c for q/p = 0)."""
    return energy_over_momentum(qop, particle.mass, particle.charge) * (1.0 / SPEED_OF_LIGHT)


def _snap(field, target, loop: _Loop, r, t, qop, t0, a, particle: Particle):
    """Move the track (within tolerance of the target) onto it along its tangent.

    r, t, qop, t0, a may be Duals: then the result carries the surface-projection
    derivatives (d s = -(n . d r - d a) / (n . T) to first order, as ACTS).
    Returns position, direction, path length of the segment and time.
    """
    d = target.snap_distance(r, t, loop.s, a)
    b = field.evaluate(loop.r)
    curvature = dm.cross(t, b)
    lam = B_CURVATURE * qop
    position = tuple(ri + ti * d for ri, ti in zip(r, t))
    direction = dm.normalized(tuple(ti + (lam * ki) * d for ti, ki in zip(t, curvature)))
    path = d + loop.s
    time = t0 + _inverse_speed(qop, particle) * path
    return position, direction, path, time


# ---------------------------------------------------------------- fixed path (transport Jacobian)


@dataclass
class PathResult:
    """Result of :func:`propagate_path`.

    final: :class:`FreeParameters` after the path; jacobian: (when requested) the
    transport Jacobian, 8 rows x (8 + n_field) columns of arrays, d final_i / d
    (initial free parameters, field parameters) -- direction columns are the
    derivatives for variations perpendicular to the (normalised) initial direction;
    status: REACHED, or MISSED (max_steps / world volume); steps: accepted steps;
    max_error: largest ACTS error estimate of an accepted step [mm] (adaptive stepper).
    """

    final: FreeParameters
    jacobian: list | None
    status: object
    steps: object
    max_error: object


def propagate_path(params: FreeParameters, field, path_length: float, options: PropagationOptions, *,
                   jacobian: bool = False, field_gradient: bool = True) -> PathResult:
    """Propagate every track by ``path_length`` [mm] through the field (no surfaces, no material)."""
    if not path_length > 0:
        raise ValueError(f"path_length must be positive (mm), got {path_length!r}")
    _refuse_ad(params, field)
    n_field = len(field.names)
    direction = dm.normalized(params.direction)
    qop = params.qop
    lam = B_CURVATURE * qop
    start = _SegmentStart.of(field, params.position, direction, lam, options, field_gradient) if jacobian else None
    target = _PathTarget(path_length)
    loop = _step_segment(field, target, start, params.position, direction, lam, options)
    n_columns = 8 + n_field + 1
    if jacobian:
        r, t = _segment_duals(field, loop, start, lam, n_columns)
        qop_d = dm.Dual.variable(qop, _QOP, n_columns)
        t0 = dm.Dual.variable(params.time, _TIME, n_columns)
    else:
        r, t, qop_d, t0 = loop.r, loop.t, qop, params.time
    position, direction, _, time = _snap(field, target, loop, r, t, qop_d, t0, 0.0, options.particle)
    values = FreeParameters(*(_values(v) for v in (position, time, direction, qop_d)))
    jac = None
    if jacobian:
        zero = dr.zeros(types_of(loop.s).Float, dr.width(loop.s))
        rows = [*position, time, *direction, qop_d]
        jac = [[zero + (0.0 if tg is None else tg) for tg in row.tangents[:8 + n_field]] for row in rows]
    result = PathResult(values, jac, loop.status, loop.accepted, loop.max_error)
    dr.eval(result.final.columns(), result.jacobian, result.status, result.steps, result.max_error)
    return result


def _refuse_ad(params: FreeParameters, field, *layer_arrays) -> None:
    """ValueError if an input has Dr.Jit gradients enabled (see the module docstring)."""
    field_arrays = [a for value in vars(field).values() for a in (value if isinstance(value, tuple) else (value,))]
    arrays = [*params.columns(), *field_arrays, *layer_arrays]
    if any(dr.is_array_v(a) and dr.grad_enabled(a) for a in arrays):
        raise ValueError("propagation inputs must not have Dr.Jit gradients enabled: reverse-mode AD through the "
                         "stepping loop is not supported; use jacobian=True (transport Jacobians) and layers_vjp")


def _values(x):
    if isinstance(x, tuple):
        return tuple(dm.value(v) for v in x)
    return dm.value(x)


# ---------------------------------------------------------------- through layers


class RowLayout:
    """Where the entries of a record's tangent rows are, per layer: a tuple of rows, each a tuple
    over columns of None (structural zero), a float (constant) or an int (index into the layer's
    arrays). Static for a given configuration; compared by value, so that ``dr.freeze`` sees the
    same layout as the same key, and one leaf to Dr.Jit: its traversals (of the arguments and
    results of frozen functions, and in the torch bridge) cost ~1 us per Python leaf, and
    the ~1400 None entries of ten layers' rows cost 1.3-2 ms per traversal."""

    __slots__ = ("layers",)

    def __init__(self):
        self.layers: list[tuple] = []

    def __eq__(self, other) -> bool:
        return isinstance(other, RowLayout) and other.layers == self.layers

    def __hash__(self) -> int:
        return hash(tuple(self.layers))


@dataclass
class JacobianRecord:
    """Per-layer derivatives kept for the reverse sweep (see :func:`layers_vjp`).

    ``hit[k]``: lanes that hit layer k. The tangent rows of layer k (over the layer columns: 8 free
    parameters after the previous hit, field parameters, the layer's position parameter, its
    thickness) are those of the 8 free parameters after the material, then of the 8 free
    parameters on the surface, the 2 local coordinates and the segment path length
    (:meth:`rows`); stored as the arrays among them (``tangents[k]``) and their ``layout``.
    All of them are per lane: ``lanes`` is the track each lane ran (:func:`coherent_lanes`),
    ``inverse`` the lane of each track. ``direction_norm``: |input direction| (the input is normalised).
    """

    n_field: int
    lanes: object = None
    inverse: object = None
    hit: list = dataclass_field(default_factory=list)
    tangents: list = dataclass_field(default_factory=list)
    layout: RowLayout = dataclass_field(default_factory=RowLayout)
    direction: tuple = ()
    direction_norm: object = None

    def append(self, hit, rows: list) -> None:
        """Add a layer: its hit mask and tangent rows (lists over columns of array, float or None).
        An array given more than once (the position and time rows before and after the material
        are the same arrays) is stored once: each stored array costs Dr.Jit a traversal step in
        every frozen call and bridge check that it passes."""
        arrays, layout, stored = [], [], {}
        for row in rows:
            entries = []
            for t in row:
                if _is_array(t):
                    if id(t) not in stored:
                        stored[id(t)] = len(arrays)
                        arrays.append(t)
                    entries.append(stored[id(t)])
                else:
                    entries.append(None if t is None else float(t))
            layout.append(tuple(entries))
        self.hit.append(hit)
        self.tangents.append(arrays)
        self.layout.layers.append(tuple(layout))

    def rows(self, k: int) -> list:
        """The tangent rows of layer k, as given to :meth:`append`."""
        arrays = self.tangents[k]
        return [[arrays[e] if isinstance(e, int) else e for e in row] for row in self.layout.layers[k]]


@dataclass
class LayerHits:
    """Per-layer results, stored layer-major as flat arrays (the torch layer hands them over as
    (N, L, ...) views without a copy): ``free_rows`` (L, N, 8) free parameters on the surface
    (before its material), ``local_rows`` (L, N, 2), ``path_rows`` (L, N) path length from the
    start [mm], ``valid_rows`` (L, N) a Bool array, True where the layer was hit (the other outputs
    are zeros where it was not). Layer-major because each layer's kernel writes its outputs: its N rows are then one
    contiguous block (track-major rows would spread every layer's writes over the whole array, a
    cache line per track and output, which cost ~15 % of a forward call).
    ``free``, ``local``, ``path``, ``valid`` give them as lists over layers of arrays over tracks.
    ``unusable``: per lane (in the lane order of :func:`coherent_lanes`), True for a track that was not
    propagated because a parameter is not finite or its direction has no usable length.
    The rows may be longer than L*N*width (``capacity`` of :func:`output_rows`); the entries past
    that are unused. covariance: (when requested) lists over layers of the 8x8 free covariance on
    the surface; local_covariance: 2x2.
    """

    n_layers: int
    n_tracks: int
    free_rows: object
    local_rows: object
    path_rows: object
    valid_rows: object
    covariance: list | None = None
    local_covariance: list | None = None
    record: JacobianRecord | None = None
    unusable: object = None

    @property
    def free(self) -> list:
        return self._columns(self.free_rows, 8)

    @property
    def local(self) -> list:
        return self._columns(self.local_rows, 2)

    @property
    def path(self) -> list:
        return [c[0] for c in self._columns(self.path_rows, 1)]

    @property
    def valid(self) -> list:
        return [c[0] for c in self._columns(self.valid_rows, 1)]

    def _columns(self, rows, width: int) -> list:
        lanes = dr.arange(dr.uint32_array_t(type(rows)), self.n_tracks)
        return layer_columns(rows, self.n_layers, width, lanes=lanes, n_tracks=self.n_tracks)


def output_rows(types: KernelTypes, n: int, n_layers: int, *, like=None, capacity: int | None = None) -> list:
    """Arrays of L*N*8, L*N*2, L*N and L*N entries for the outputs of :func:`propagate_layers`
    (the last a Bool array), which writes every entry: their contents are undefined.

    Outside a ``dr.freeze`` recording they are allocated uninitialised (no zero-fill: 4 ms per
    100 000 tracks). Inside one, either pass ``capacity``, an int >= N: the rows are then allocated
    uninitialised for that many tracks, an allocation that keeps this size when the recording is
    replayed for any N up to it (the layers use the first L*N*width entries); or pass
    ``like``, four evaluated arrays of N lanes (distinct: equal
    expressions would be merged into one array): each output is then made by a kernel that reads
    one of them, since Dr.Jit sizes a replayed kernel from the arrays it reads, whereas an
    allocation or index range of the recording's own keeps its recorded size when replayed for
    another N. Made inside the recording, the rows take the layers' writes in place; rows passed
    in as inputs were copied on every replay first (copy-on-write: the recording holds a
    reference too), 10-17 ms per 100 000 tracks on 2 cores, against ~6 ms for these kernels.
    """
    if capacity is not None and capacity < n:
        raise ValueError(f"capacity ({capacity}) must be at least the number of tracks ({n})")
    sizes = [(n if capacity is None else capacity) * n_layers * width for width in (8, 2, 1, 1)]
    kinds = (types.Float, types.Float, types.Float, types.Bool)
    if like is None:
        rows = [dr.empty(kind, size) for kind, size in zip(kinds, sizes)]
    else:
        if any(source.state == dr.VarState.Literal for source in like):
            raise ValueError("inside a dr.freeze recording the track parameters must be arrays of N lanes, "
                             "not literals: the output rows are sized from them")
        rows = [kind(dr.gather(types.Float, source, dr.zeros(types.UInt32, size)))
                for kind, source, size in zip(kinds, like, sizes)]
    dr.eval(rows)
    return rows


def layer_columns(rows, n_layers: int, width: int, *, lanes=None, n_tracks=None) -> list:
    """A flat layer-major (L, N, width) array as lists over layers of ``width`` arrays over tracks.

    For callers recording with ``dr.freeze``, which must not compile N in (a replay for another N
    would use it): ``lanes`` = arange(N) made from the width of a width-N input of the recording,
    ``n_tracks`` = N as a 1-lane UInt32 array.
    """
    Float, UInt32 = type(rows), dr.uint32_array_t(type(rows))
    n = dr.width(rows) // (n_layers * width)
    first = (dr.arange(UInt32, n) if lanes is None else lanes) * width
    stride = width * (n if n_tracks is None else n_tracks)
    columns = []
    for k in range(n_layers):
        start = dr.opaque(UInt32, k) * stride  # not a literal: the layers' kernels are the same
        columns.append([dr.gather(Float, rows, first + (start + j)) for j in range(width)])
    return columns


def propagate_layers(params: FreeParameters, field, layers: Sequence[Layer], positions, thickness,
                     options: PropagationOptions, *, jacobian: bool = False, covariance=None,
                     seed: int = 0, field_gradient: bool = True, layer_gradient: bool = True,
                     n_tracks=None, capacity: int | None = None) -> LayerHits:
    """Propagate tracks through ``layers`` in order (see the module docstring).

    positions, thickness: arrays with one entry per layer (surface position
    parameter [mm], material thickness [mm]); ``covariance``: initial 8x8 free
    covariance (list of lists of arrays) to transport, or None for no covariance
    output; ``jacobian``: keep the per-layer Jacobians for :func:`layers_vjp`.
    ``seed``: random numbers for ``scattering="sample"`` (per lane and layer).
    ``field_gradient``: carry the field-parameter columns (else their gradients are zero).
    ``layer_gradient``: the same for the layer positions and thicknesses (their columns cost a
    fifth of the Jacobian record).
    ``n_tracks``: N as a 1-lane UInt32 array, required when the call is recorded with ``dr.freeze``
    (the layer-major output rows are addressed with it; a Python int would be compiled into the
    recording; see :func:`layer_columns` and :func:`output_rows`). ``capacity``: inside a
    recording, allocate the output rows for this many tracks (an int >= N, see :func:`output_rows`)
    instead of sizing them from the tracks with fill kernels.

    One kernel per layer: the stepping loop, the surface, the material and the outputs of the
    layer (written into their rows) are compiled together, so the loop state never goes to memory.
    The lanes run the tracks in the order of :func:`coherent_lanes`; outputs are in track order.
    """
    _refuse_ad(params, field, positions, thickness)
    types = types_of(params.qop)
    n = dr.width(params.qop)
    for v in params.columns():
        n = max(n, dr.width(v))
    lanes = coherent_lanes(params.direction, n)
    params = FreeParameters.from_columns([_in_lane_order(v, lanes, n) for v in params.columns()])
    n_layers = len(layers)
    zero = dr.zeros(types.Float, n)
    n_field = len(field.names)
    n_columns = 8 + n_field + 2
    column_a, column_thickness = 8 + n_field, 9 + n_field
    particle = options.particle
    derivatives = jacobian or covariance is not None

    # Layer parameters as memory (an array built from Python floats may be compiled in as constants).
    positions, thickness = types.Float(positions), types.Float(thickness)
    dr.make_opaque(positions, thickness)
    length2 = dm.dot(params.direction, params.direction)
    norm = dm.sqrt(length2)
    state = FreeParameters(tuple(v + zero for v in params.position), params.time + zero,
                           tuple(v / norm + zero for v in params.direction), params.qop + zero)
    # Tracks that cannot be propagated never step (a NaN lane would step until max_steps).
    usable = (length2 > 0) & dr.isfinite(length2)
    for v in params.columns():
        usable = usable & dr.isfinite(v)
    alive = usable | dr.zeros(types.Bool, n)  # N lanes also when every column is one broadcast value
    dr.eval(state, alive)
    recording = dr.flag(dr.JitFlag.FreezingScope)
    path_total = dr.zeros(types.Float, n)
    # Start values as memory, not literals: the first layer then compiles to the same kernels as the others.
    # (Not inside a dr.freeze recording: there an opaque array without inputs keeps the recorded
    # width on replay, while literals take the width of the kernels they are compiled into.)
    if not recording:
        dr.make_opaque(path_total)
    inverse = inverse_permutation(lanes) if derivatives else None
    record = JacobianRecord(n_field, lanes, inverse, direction=state.direction,
                            direction_norm=norm + zero) if jacobian else None
    cov = None
    if covariance is not None:
        cov = [[_in_lane_order(covariance[i][j], lanes, n) + zero for j in range(8)] for i in range(8)]
    sized_from_tracks = recording and capacity is None
    rows = output_rows(types, n, n_layers, like=state.columns()[:4] if sized_from_tracks else None, capacity=capacity)
    hits = LayerHits(n_layers, n, *rows, covariance=[] if cov is not None else None,
                     local_covariance=[] if cov is not None else None, record=record, unusable=~alive)
    layer_stride = n if n_tracks is None else n_tracks  # rows of one layer

    for k, layer in enumerate(layers):
        index = dr.opaque(types.UInt32, k)  # not a literal: layers of the same kind share compiled kernels
        a = dr.gather(types.Float, positions, index)
        thick = dr.gather(types.Float, thickness, index)
        target = _SurfaceTarget(layer.surface, a)
        lam = B_CURVATURE * state.qop
        start = _SegmentStart.of(field, state.position, state.direction, lam, options,
                                 field_gradient) if derivatives else None
        loop = _step_segment(field, target, start, state.position, state.direction, lam, options, alive)
        if derivatives:
            r, t = _segment_duals(field, loop, start, lam, n_columns)
            qop = dm.Dual.variable(state.qop, _QOP, n_columns)
            t0 = dm.Dual.variable(state.time, _TIME, n_columns)
            if layer_gradient:
                a_var = dm.Dual.variable(a, column_a, n_columns)
                thick_var = dm.Dual.variable(thick, column_thickness, n_columns)
            else:
                a_var, thick_var = dm.Dual.constant(a, n_columns), dm.Dual.constant(thick, n_columns)
        else:
            r, t, qop, t0, a_var, thick_var = loop.r, loop.t, state.qop, state.time, a, thick
        position, direction, path, time = _snap(field, target, loop, r, t, qop, t0, a_var, particle)
        local = layer.surface.local(position, a_var)
        position_v = _values(position)
        hit = alive & (loop.status == REACHED) & layer.surface.in_bounds(position_v, a)

        surface_state = [*position, time, *direction, qop]
        after_state = list(surface_state)
        interaction = None
        if layer.material is not None:
            deflection = None
            if options.scattering == "sample":
                rng = types.rng(n, seed, stream=k, lane=lanes)
                dr.make_opaque(rng)  # the seed must not be compiled into the layer's kernel
                deflection = (types.normal(rng), types.normal(rng))
            interaction = interact(direction, qop, layer.surface.normal(position), thick_var, layer.material,
                                   particle.mass, particle.charge, energy_loss=options.energy_loss,
                                   deflection=deflection)
            after_state[4:7] = interaction.direction
            after_state[7] = interaction.qop

        # Outputs of this layer into their rows, zeros where the layer is missed: every entry is written
        # (unmasked packet stores), whatever the rows held before.
        row = index * layer_stride + lanes
        outputs = ([dm.value(v) for v in surface_state], [dm.value(v) for v in local], [path_total + dm.value(path)])
        for target_rows, values in zip(rows, outputs):
            dr.scatter(target_rows, types.ArrayX([dr.select(hit, v, 0.0) for v in values]), row)
        dr.scatter(rows[3], hit, row)

        if cov is not None:
            cov = _transport_covariance(cov, surface_state, after_state, local, interaction, options, hit,
                                        hits, zero)
        if record is not None:
            record.append(hit, [_tangents(v, n_columns) for v in (*after_state, *surface_state, *local, path)])

        # Advance the lanes that hit; the others keep their state.
        after_values = [dm.value(v) for v in after_state]
        new = [dr.select(hit, v, old) for v, old in zip(after_values, state.columns())]
        state = FreeParameters.from_columns(new)
        path_total = dr.select(hit, path_total + dm.value(path), path_total)
        if interaction is not None:
            alive = alive & ~(hit & interaction.stopped)
        _evaluate_layer(hits, record, state, path_total, alive, cov)
    if cov is not None:  # lane order -> track order (gathers that fuse into the kernel that reads them)
        hits.covariance, hits.local_covariance = (
            [[[dr.gather(types.Float, c, inverse) for c in row] for row in layer] for layer in per_layer]
            for per_layer in (hits.covariance, hits.local_covariance))
    return hits


# Lanes of one window are reordered among themselves: wider windows group the tracks better but
# spread the output writes over more memory (10^5 tracks: windows of 64 and 1024 gained less than
# 256; the whole batch as one window was slower than no reordering).
LANE_WINDOW = 256
_LANE_BUCKETS = 16  # of |cos theta|


def coherent_lanes(direction, n: int):
    """The track each lane runs, as a UInt32 array of n entries: within each window of
    :data:`LANE_WINDOW` consecutive tracks, ordered by |cos theta| (t_z / |t|) in 16 buckets.

    A SIMD packet (GPU warp) steps as long as its slowest track, and the number of steps to the
    next cylinder (disk) grows with 1 / sin theta (1 / |cos theta|): grouping tracks of similar
    polar angle keeps the lanes of a packet busy. The order is stable, hence deterministic, and
    only the lanes change: each track's results are the same bit for bit.
    """
    types = types_of(direction[2])
    tx, ty, tz = direction
    cos_theta = dr.abs(tz) / dr.sqrt(dr.fma(tx, tx, dr.fma(ty, ty, tz * tz)))
    cos_theta = dr.select(dr.isfinite(cos_theta), cos_theta, 0.0) + dr.zeros(types.Float, n)
    bucket = types.UInt32(dr.minimum(cos_theta * _LANE_BUCKETS, _LANE_BUCKETS - 1))
    # Dr.Jit's stable counting sort per block (the primitive under dr.argsort and dr.switch).
    return dr.detail.block_mkperm(bucket, LANE_WINDOW, _LANE_BUCKETS)


def inverse_permutation(lanes):
    """The lane of each track (``lanes[inverse[i]] == i``)."""
    UInt32 = type(lanes)
    # Written into a kernel output of N entries, every one of which the scatter overwrites: an
    # allocation would keep its recorded size when a dr.freeze recording is replayed for another N.
    inverse = dr.gather(UInt32, lanes, lanes)
    dr.scatter(inverse, dr.arange(UInt32, dr.width(lanes)), lanes)
    return inverse


def _in_lane_order(column, lanes, n: int):
    """A track column (N entries, or one for all tracks) in lane order."""
    return column if dr.width(column) == 1 and n != 1 else dr.gather(type(column), column, lanes)


def row_major(columns: list):
    """k arrays of N lanes -> one flat array in row-major (N, k) order (one kernel)."""
    return dr.ravel(types_of(columns[0]).ArrayX(columns))


def _tangents(x, n_columns: int) -> list:
    return x.tangents if isinstance(x, dm.Dual) else [None] * n_columns


def _evaluate_layer(hits: LayerHits, record, state, path_total, alive, cov) -> None:
    """Evaluate the carried state, with this layer's outputs (scattered into their rows) and
    derivatives: one kernel per layer, which also contains the layer's stepping loop."""
    arrays = [state.columns(), path_total, alive]
    if cov is not None:
        arrays += [cov, hits.covariance[-1], hits.local_covariance[-1]]
    if record is not None:
        arrays += [record.hit[-1], record.tangents[-1]]
    dr.eval(arrays)


def _is_array(x) -> bool:
    return x is not None and not isinstance(x, float)


def _jacobian_matrix(rows, n: int, zero):
    """First n tangent columns of Dual rows as a dense list of lists (zeros for structural zeros)."""
    return [[zero + (0.0 if tg is None else tg) for tg in _tangents(row, n)[:n]] if isinstance(row, dm.Dual)
            else [zero] * n for row in rows]


def _sandwich(jac, cov):
    """J C J^T for dense lists of lists."""
    rows, inner = len(jac), len(cov)
    jc = [[sum(jac[i][m] * cov[m][j] for m in range(inner)) for j in range(inner)] for i in range(rows)]
    return [[sum(jc[i][m] * jac[j][m] for m in range(inner)) for j in range(rows)] for i in range(rows)]


def _transport_covariance(cov, surface_state, after_state, local, interaction, options, hit, hits: LayerHits, zero):
    """Free covariance on the surface (output) and after the layer's material (carried on)."""
    on_surface = _sandwich(_jacobian_matrix(surface_state, 8, zero), cov)
    local_cov = _sandwich(_jacobian_matrix(local, 8, zero), cov)
    after = _sandwich(_jacobian_matrix(after_state, 8, zero), cov)
    if interaction is not None:
        t = [dm.value(v) for v in after_state[4:7]]
        if options.scattering == "covariance":
            for i in range(3):
                for j in range(3):
                    identity = 1.0 if i == j else 0.0
                    after[4 + i][4 + j] = after[4 + i][4 + j] + interaction.theta0_squared * (identity - t[i] * t[j])
        if options.energy_loss:
            after[7][7] = after[7][7] + interaction.qop_variance
    hits.covariance.append([[dr.select(hit, v, 0.0) for v in row] for row in on_surface])
    hits.local_covariance.append([[dr.select(hit, v, 0.0) for v in row] for row in local_cov])
    return [[dr.select(hit, a, c) for a, c in zip(row_a, row_c)] for row_a, row_c in zip(after, cov)]


def layers_vjp(record: JacobianRecord, grad_free, grad_local, grad_path, n_tracks=None, *, parameters: bool = True):
    """Reverse sweep over layers: J^T g for the outputs of :func:`propagate_layers`.

    grad_free, grad_local, grad_path: gradients of a scalar loss with respect to the layer outputs,
    laid out like ``free_rows``, ``local_rows`` and ``path_rows`` of :class:`LayerHits`, or None
    where the loss does not depend on that output (its rows of the record are then not read);
    ``n_tracks`` as for :func:`propagate_layers` (required under ``dr.freeze``). Returns
    ``(grad_initial, grad_field, grad_positions, grad_thickness)``: 8 arrays over tracks for the
    initial free parameters (direction: with respect to the un-normalised input), and per-lane
    contributions for the field parameters (list of n_field arrays) and each layer's position and
    thickness (lists over layers), to be summed over lanes by the caller; without ``parameters``
    only the first (the others are None).
    """
    n_field = record.n_field
    n_columns = 8 + n_field + 2
    n_layers = len(record.hit)
    in_lane_order = dict(lanes=record.lanes, n_tracks=n_tracks)

    def per_layer(rows, width):  # lists over layers of `width` weights (None: no gradient)
        if rows is None:
            return [[None] * width] * n_layers
        return layer_columns(rows, n_layers, width, **in_lane_order)

    grad_free, grad_local = per_layer(grad_free, 8), per_layer(grad_local, 2)
    grad_path = [c[0] for c in per_layer(grad_path, 1)]
    # Zeros computed from an input (norm * 0.0 would fold to a literal): a frozen recording then
    # replays every output at the new N, also one that no gradient reaches (a literal keeps its width).
    norm = record.direction_norm  # finite: tracks with another norm were rejected
    zero = dr.select(dr.isfinite(norm), 0.0, norm)
    adjoint = [zero] * 8  # d loss / d (state after the layer)
    # d loss / d (segment path length): the sum of the path gradients of the layers after it
    adjoint_path = None if grad_path[0] is None else zero
    grad_field = [zero] * n_field if parameters else None
    grad_positions = [zero] * n_layers if parameters else None
    grad_thickness = [zero] * n_layers if parameters else None
    for k in reversed(range(n_layers)):
        hit = record.hit[k]
        if adjoint_path is not None:
            adjoint_path = adjoint_path + dr.select(hit, grad_path[k], 0.0)
        weights = list(adjoint) + list(grad_free[k]) + list(grad_local[k]) + [adjoint_path]
        column_grad = [zero] * n_columns
        for weight, row in zip(weights, record.rows(k)):
            if weight is None:
                continue
            for j, tg in enumerate(row):
                if tg is not None:
                    column_grad[j] = dr.fma(weight, tg, column_grad[j])
        adjoint = [dr.select(hit, column_grad[j], adjoint[j]) for j in range(8)]
        if parameters:
            for g in range(n_field):
                grad_field[g] = grad_field[g] + dr.select(hit, column_grad[8 + g], 0.0)
            grad_positions[k] = dr.select(hit, column_grad[8 + n_field], 0.0)
            grad_thickness[k] = dr.select(hit, column_grad[9 + n_field], 0.0)
    # All layers in one kernel: each layer's record is read once and the adjoint stays in registers
    # (one kernel per layer wrote and read it back: 10.9 vs 12.6 ms for ten layers, 50 000 tracks).
    # Evaluated before the gathers below, which would otherwise evaluate each gathered array's sweep apart.
    dr.eval(adjoint, grad_field, grad_positions, grad_thickness)
    # In track order (gathers of evaluated arrays: they fuse into the caller's kernel). The input
    # direction d is normalised: d T / d d = (I - T T^T) / |d|.
    adjoint, t, norm = ([dr.gather(type(zero), a, record.inverse) for a in arrays]
                        for arrays in (adjoint, record.direction, [record.direction_norm]))
    g_t = adjoint[4:7]
    along = dm.dot(t, g_t)
    adjoint[4:7] = [(g - along * ti) / norm[0] for g, ti in zip(g_t, t)]
    return adjoint, grad_field, grad_positions, grad_thickness


# ---------------------------------------------------------------- generated tracks (standalone runs)


def random_tracks(types: KernelTypes, n: int, seed: int, *, pt_range=(1.0, 10.0), eta_max: float = 1.0,
                  vertex_sigma=(0.0, 0.0, 0.0), charge: float = 1.0) -> FreeParameters:
    """Tracks from a (Gaussian-smeared) origin: pT uniform in pt_range [GeV], eta uniform in
    [-eta_max, eta_max], phi uniform, charge sign +-1 with equal probability, t = 0."""
    if not 0 < pt_range[0] <= pt_range[1]:
        raise ValueError(f"pt_range must satisfy 0 < min <= max, got {pt_range}")
    if not eta_max >= 0:
        raise ValueError(f"eta_max must be >= 0, got {eta_max}")
    rng = types.rng(n, seed, stream=1000)
    pt = pt_range[0] + (pt_range[1] - pt_range[0]) * types.uniform(rng)
    eta = eta_max * (2.0 * types.uniform(rng) - 1.0)
    phi = 2.0 * math.pi * types.uniform(rng)
    sign = dr.select(types.uniform(rng) < 0.5, -1.0, 1.0)
    theta = 2.0 * dr.atan(dr.exp(-eta))
    p = pt / dr.sin(theta)
    direction = (dr.sin(theta) * dr.cos(phi), dr.sin(theta) * dr.sin(phi), dr.cos(theta))
    position = tuple(s * types.normal(rng) for s in vertex_sigma)
    return FreeParameters(position, dr.zeros(types.Float, n), direction, sign * charge / p)
