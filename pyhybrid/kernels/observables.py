"""e+e- event shapes of variable-multiplicity events (Dr.Jit, no torch).

Events are stored like the shower's particle record: per component (E, px, py,
pz) [GeV] one array of ``n_events * max_particles`` values, event-major
(index = event * max_particles + slot), and ``n_particles`` per event. One lane per event.

* Durham (k_T) jet resolutions (Catani et al., Phys. Lett. B269 (1991) 432),
  exclusive clustering with E-scheme recombination:
  y_ij = 2 min(E_i^2, E_j^2) (1 - cos theta_ij) / E_vis^2 with E_vis^2 = s; the pair with
  the smallest y_ij is merged until two jets remain. y_{n,n+1} is the y_ij of the
  merging that goes from n + 1 to n jets (0 when the event has fewer than n + 1
  particles). Returned for n = 2..5 (y23, y34, y45, y56).
* Thrust T = max_n sum |p_i . n| / sum |p_i|, exact: the optimal plane through the
  origin can be rotated to contain two momenta, so all pairs (a, b) with the four
  sign choices for p_a, p_b are tried (O(n^3)).

With ``tangents`` (d momenta / d theta of every particle, same layout) the
pathwise derivatives dy_{n,n+1}/d theta and dT/d theta are returned as well, at
fixed clustering history and fixed thrust partition (their derivatives almost
everywhere).

Histogram helpers: hard bin indicators, sigmoid-edged ("soft") indicators with
their derivative, and a scatter-add histogram.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import drjit as dr

from pyhybrid.kernels.backend import types_of

__all__ = ["OBSERVABLES", "EventShapes", "private_buffer", "event_shapes", "observable", "bin_indicators",
           "soft_bin_indicators", "histogram"]

#: Names accepted by :func:`observable`: log10 of the Durham resolutions, thrust and 1 - thrust.
OBSERVABLES = ("log10_y23", "log10_y34", "log10_y45", "log10_y56", "thrust", "one_minus_thrust")


@dataclass
class EventShapes:
    """Per-event Durham resolutions ``y`` = [y23, y34, y45, y56] and ``thrust``; with tangents
    also their derivatives ``dy`` and ``dthrust`` (else None)."""

    y: list
    thrust: Any
    dy: list | None = None
    dthrust: Any = None


def private_buffer(array):
    """An evaluated copy of ``array`` that no other variable shares.

    A symbolic loop may scatter into a buffer in place only if the buffer is its own
    JIT variable: Dr.Jit folds ``x + 0`` to ``x`` and merges equal literals
    (``dr.zeros`` twice), and scattering into a shared variable silently writes to a
    copy while the loop keeps reading the original. Adding an opaque zero forces a new one.
    """
    out = array + dr.opaque(type(array), 0)
    dr.make_opaque(out)
    return out


def _durham(momenta, n_particles, s, tangents):
    F, U = type(momenta[0]), dr.uint32_array_t(type(momenta[0]))
    n_events = dr.width(n_particles)
    lane = dr.arange(U, n_events)
    slots = dr.width(momenta[0]) // n_events

    def index(slot):
        return lane * slots + slot

    jets = [private_buffer(c) for c in momenta]
    jet_tangents = [private_buffer(c) for c in tangents] if tangents is not None else []
    inverse_s = 1.0 / s
    zeros = dr.zeros(F, n_events)

    def read(jets, slot, mask):
        p = [dr.gather(F, c, index(slot), mask) for c in jets]
        return p, dr.sqrt(p[1] * p[1] + p[2] * p[2] + p[3] * p[3])

    def resolution(pa, norm_a, pb, norm_b):
        cos = (pa[1] * pb[1] + pa[2] * pb[2] + pa[3] * pb[3]) / (norm_a * norm_b)
        return 2.0 * dr.minimum(pa[0] * pa[0], pb[0] * pb[0]) * (1.0 - cos) * inverse_s

    def closest_pair(jets, m, mask):
        """(smallest y_ij, a, b) over pairs a < b < m."""
        def outer_cond(a, best, best_a, best_b):
            return mask & (a + 1 < m)

        def outer_body(a, best, best_a, best_b):
            pa, norm_a = read(jets, a, mask)

            def inner_cond(b, best, best_a, best_b):
                return mask & (b < m)

            def inner_body(b, best, best_a, best_b):
                pb, norm_b = read(jets, b, mask)
                y = resolution(pa, norm_a, pb, norm_b)
                better = y < best
                return (b + 1, dr.select(better, y, best), dr.select(better, a, best_a),
                        dr.select(better, b, best_b))

            _, best, best_a, best_b = dr.while_loop((a + 1, best, best_a, best_b), inner_cond, inner_body,
                                                    label="durham_pairs_inner")
            return a + 1, best, best_a, best_b

        start = dr.zeros(U, n_events)
        _, best, best_a, best_b = dr.while_loop((start, dr.full(F, math.inf, n_events), start, start + 1),
                                                outer_cond, outer_body, label="durham_pairs")
        return best, best_a, best_b

    def cond(m, y, dy, jets, jet_tangents):
        return m > 2

    def body(m, y, dy, jets, jet_tangents):
        mask = m > 2
        best, a, b = closest_pair(jets, m, mask)
        last = m - 1
        # reads first: a buffer may not be read after a write in the same iteration
        pa, norm_a = read(jets, a, mask)
        pb, norm_b = read(jets, b, mask)
        p_last = [dr.gather(F, c, index(last), mask) for c in jets]
        if jet_tangents:
            da = [dr.gather(F, c, index(a), mask) for c in jet_tangents]
            db = [dr.gather(F, c, index(b), mask) for c in jet_tangents]
            d_last = [dr.gather(F, c, index(last), mask) for c in jet_tangents]
            d_best = _resolution_tangent(pa, norm_a, da, pb, norm_b, db, inverse_s)
        for n in range(4):  # y_{n+2, n+3} is the merging from n + 3 to n + 2 jets
            record = mask & (m == n + 3)
            y[n] = dr.select(record, best, y[n])
            if jet_tangents:
                dy[n] = dr.select(record, d_best, dy[n])
        for k, column in enumerate(jets):
            dr.scatter(column, pa[k] + pb[k], index(a), mask)
            dr.scatter(column, p_last[k], index(b), mask & (b != last))
        for k, column in enumerate(jet_tangents):
            dr.scatter(column, da[k] + db[k], index(a), mask)
            dr.scatter(column, d_last[k], index(b), mask & (b != last))
        return m - 1, y, dy, jets, jet_tangents

    y = [zeros + 0.0 for _ in range(4)]
    dy = [zeros + 0.0 for _ in range(4)]
    m, y, dy, _, _ = dr.while_loop((U(n_particles), y, dy, jets, jet_tangents), cond, body, label="durham")
    return y, (dy if tangents is not None else None)


def _resolution_tangent(pa, norm_a, da, pb, norm_b, db, inverse_s):
    """d y_ab for momentum tangents da, db (E-scheme pseudojets, possibly massive)."""
    dot = pa[1] * pb[1] + pa[2] * pb[2] + pa[3] * pb[3]
    cos = dot / (norm_a * norm_b)
    d_dot = da[1] * pb[1] + da[2] * pb[2] + da[3] * pb[3] + pa[1] * db[1] + pa[2] * db[2] + pa[3] * db[3]
    d_norm_a = (pa[1] * da[1] + pa[2] * da[2] + pa[3] * da[3]) / norm_a
    d_norm_b = (pb[1] * db[1] + pb[2] * db[2] + pb[3] * db[3]) / norm_b
    d_cos = d_dot / (norm_a * norm_b) - cos * (d_norm_a / norm_a + d_norm_b / norm_b)
    a_softer = pa[0] * pa[0] < pb[0] * pb[0]
    e_min = dr.select(a_softer, pa[0], pb[0])
    de_min = dr.select(a_softer, da[0], db[0])
    return 2.0 * inverse_s * (2.0 * e_min * de_min * (1.0 - cos) - e_min * e_min * d_cos)


def _thrust(momenta, n_particles, tangents):
    F, U = type(momenta[0]), dr.uint32_array_t(type(momenta[0]))
    n_events = dr.width(n_particles)
    lane = dr.arange(U, n_events)
    slots = dr.width(momenta[0]) // n_events

    def vector(slot, columns):
        index = lane * slots + slot
        return [dr.gather(F, columns[k], index) for k in (1, 2, 3)]

    def signed_sum(axis, skip_a, skip_b, columns):
        """sum over c != a, b of sign(v_c . axis) v_c for the given columns (momenta or tangents)."""
        def cond(c, total):
            return c < n_particles

        def body(c, total):
            v = vector(c, momenta)
            use = (c != skip_a) & (c != skip_b)
            sign = dr.select(v[0] * axis[0] + v[1] * axis[1] + v[2] * axis[2] > 0.0, 1.0, -1.0)
            w = v if columns is momenta else vector(c, columns)
            total = [dr.select(use, t + sign * wk, t) for t, wk in zip(total, w)]
            return c + 1, total

        zero = dr.zeros(F, n_events)
        _, total = dr.while_loop((dr.zeros(U, n_events), [zero, zero + 0.0, zero + 0.0]), cond, body,
                                 label="thrust_sum")
        return total

    def outer_cond(a, best, best_a, best_b, best_signs):
        return a + 1 < n_particles

    def outer_body(a, best, best_a, best_b, best_signs):
        va = vector(a, momenta)

        def inner_cond(b, best, best_a, best_b, best_signs):
            return b < n_particles

        def inner_body(b, best, best_a, best_b, best_signs):
            vb = vector(b, momenta)
            axis = [va[1] * vb[2] - va[2] * vb[1], va[2] * vb[0] - va[0] * vb[2], va[0] * vb[1] - va[1] * vb[0]]
            total = signed_sum(axis, a, b, momenta)
            for sign_a, sign_b in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
                x = [t + sign_a * pa + sign_b * pb for t, pa, pb in zip(total, va, vb)]
                value = x[0] * x[0] + x[1] * x[1] + x[2] * x[2]
                better = value > best
                best = dr.select(better, value, best)
                best_a = dr.select(better, a, best_a)
                best_b = dr.select(better, b, best_b)
                best_signs = [dr.select(better, sign_a, best_signs[0]), dr.select(better, sign_b, best_signs[1])]
            return b + 1, best, best_a, best_b, best_signs

        _, best, best_a, best_b, best_signs = dr.while_loop((a + 1, best, best_a, best_b, best_signs), inner_cond,
                                                            inner_body, label="thrust_pairs_inner")
        return a + 1, best, best_a, best_b, best_signs

    zero_u = dr.zeros(U, n_events)
    ones = dr.full(F, 1.0, n_events)
    state = (zero_u, dr.zeros(F, n_events), zero_u, zero_u + 1, [ones, ones + 0.0])
    _, best, best_a, best_b, signs = dr.while_loop(state, outer_cond, outer_body, label="thrust_pairs")

    def norm_cond(c, total):
        return c < n_particles

    def norm_body(c, total):
        v = vector(c, momenta)
        return c + 1, total + dr.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])

    _, norm = dr.while_loop((dr.zeros(U, n_events), dr.zeros(F, n_events)), norm_cond, norm_body,
                            label="thrust_norm")
    value = dr.sqrt(best) / norm
    if tangents is None:
        return value, None
    # Pathwise derivative at the optimal partition: P = sum s_c v_c, T = |P| / sum |v_c|.
    va, vb = vector(best_a, momenta), vector(best_b, momenta)
    axis = [va[1] * vb[2] - va[2] * vb[1], va[2] * vb[0] - va[0] * vb[2], va[0] * vb[1] - va[1] * vb[0]]
    total = signed_sum(axis, best_a, best_b, momenta)
    d_total = signed_sum(axis, best_a, best_b, tangents)
    da, db = vector(best_a, tangents), vector(best_b, tangents)
    thrust_vector = [t + signs[0] * x + signs[1] * w for t, x, w in zip(total, va, vb)]
    d_thrust_vector = [t + signs[0] * x + signs[1] * w for t, x, w in zip(d_total, da, db)]
    length = dr.sqrt(best)

    def d_norm_cond(c, total):
        return c < n_particles

    def d_norm_body(c, total):
        v, dv = vector(c, momenta), vector(c, tangents)
        return c + 1, total + (v[0] * dv[0] + v[1] * dv[1] + v[2] * dv[2]) / dr.sqrt(
            v[0] * v[0] + v[1] * v[1] + v[2] * v[2])

    _, d_norm = dr.while_loop((dr.zeros(U, n_events), dr.zeros(F, n_events)), d_norm_cond, d_norm_body,
                              label="thrust_dnorm")
    d_length = sum(p * d for p, d in zip(thrust_vector, d_thrust_vector)) / length
    return value, (d_length - value * d_norm) / norm


def event_shapes(momenta: Sequence, n_particles, s: float, *, tangents: Sequence | None = None) -> EventShapes:
    """Durham y23..y56 and thrust of every event.

    momenta: [E, px, py, pz] event-major arrays [GeV] (see the module docstring);
    n_particles: UInt32 per event (>= 2); s: E_vis^2 [GeV^2] (centre-of-mass energy squared);
    tangents: optional [dE, dpx, dpy, dpz] of every particle for pathwise derivatives.
    All results are evaluated.
    """
    if len(momenta) != 4:
        raise ValueError(f"momenta must be the 4 arrays [E, px, py, pz], got {len(momenta)}")
    if not s > 0:
        raise ValueError(f"s must be positive [GeV^2], got {s}")
    types = types_of(momenta[0])
    # The kernel's own array types (plain drjit.llvm arrays as given by a user become AD arrays: one
    # type for every loop variable).
    momenta = [types.Float(v) for v in momenta]
    tangents = None if tangents is None else [types.Float(v) for v in tangents]
    n_particles = types.UInt32(n_particles)
    s = dr.opaque(types.Float, s)
    y, dy = _durham(momenta, n_particles, s, tangents)
    thrust, d_thrust = _thrust(momenta, n_particles, tangents)
    shapes = EventShapes(y, thrust, dy, d_thrust)
    dr.eval(shapes.y, shapes.thrust, shapes.dy, shapes.dthrust)
    return shapes


def observable(shapes: EventShapes, name: str):
    """(value, pathwise derivative or None) of observable ``name`` (see :data:`OBSERVABLES`).

    log10 y of an event without that many partons is -inf (it falls below every histogram).
    """
    if name not in OBSERVABLES:
        raise ValueError(f"unknown observable {name!r}; choose one of {', '.join(OBSERVABLES)}")
    if name.startswith("log10_y"):
        k = int(name[-1]) - 3
        y = shapes.y[k]
        value = dr.select(y > 0.0, dr.log(dr.maximum(y, 1e-300 if dr.type_v(y) == dr.VarType.Float64 else 1e-38))
                          / math.log(10.0), -math.inf)
        derivative = None if shapes.dy is None else dr.select(y > 0.0, shapes.dy[k] / (y * math.log(10.0)), 0.0)
        return value, derivative
    sign = 1.0 if name == "thrust" else -1.0
    value = shapes.thrust if name == "thrust" else 1.0 - shapes.thrust
    derivative = None if shapes.dthrust is None else sign * shapes.dthrust
    return value, derivative


def bin_indicators(x, edges: Sequence[float]) -> list:
    """Per event and bin: 1.0 if edges[k] <= x < edges[k + 1], else 0.0 (len(edges) - 1 arrays);
    the last bin includes its upper edge (as numpy.histogram), so that e.g. thrust = 1 (events
    without emission) falls into a last bin ending at 1."""
    _check_edges(edges)
    F = type(x)
    last = len(edges) - 2
    return [dr.select((x >= lo) & ((x <= hi) if k == last else (x < hi)), F(1.0), F(0.0))
            for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def soft_bin_indicators(x, dx, edges: Sequence[float], width: float):
    """Sigmoid-edged bins: sigma((x - lo) / w) - sigma((x - hi) / w), and their derivative along dx.

    ``width`` is w in units of x; as w -> 0 the bins become :func:`bin_indicators`, except for values
    exactly on an edge: they count 1/2 in each bin next to it (hard bins: 1 in the upper one, and 1
    in the last bin for its upper edge).
    Returns (values, derivatives), two lists of len(edges) - 1 arrays (derivatives None if dx is None).
    """
    _check_edges(edges)
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    finite = dr.isfinite(x)
    xf = dr.select(finite, x, edges[0] - 100.0 * width)  # -inf (no such jet) lies far below the first bin

    def sigmoid(edge):
        return dr.rcp(1.0 + dr.exp(-(xf - edge) / width))

    sig = [sigmoid(e) for e in edges]
    values = [lo - hi for lo, hi in zip(sig[:-1], sig[1:])]
    if dx is None:
        return values, None
    slope = [s * (1.0 - s) / width for s in sig]
    dxf = dr.select(finite, dx, 0.0)
    return values, [(lo - hi) * dxf for lo, hi in zip(slope[:-1], slope[1:])]


def histogram(x, edges: Sequence[float], weights=None):
    """Counts (or summed weights) per bin of ``x``: a Dr.Jit array of len(edges) - 1 entries.
    Bins as :func:`bin_indicators` (the last one includes edges[-1]); values outside
    [edges[0], edges[-1]] are dropped."""
    _check_edges(edges)
    types = types_of(x)
    edge_array = types.Float(edges)
    count = len(edges) - 1
    # bin = number of edges <= x, minus one (binary search on the sorted edges)
    position = dr.binary_search(0, len(edges), lambda k: dr.gather(types.Float, edge_array, k) <= x)
    inside = (x >= edges[0]) & (x <= edges[-1])
    counts = dr.zeros(types.Float, count)
    value = types.Float(1.0) if weights is None else weights
    index = dr.minimum(types.UInt32(position), count) - 1  # x = edges[-1]: the last bin
    dr.scatter_reduce(dr.ReduceOp.Add, counts, value, index, inside)
    dr.eval(counts)
    return counts


def _check_edges(edges: Sequence[float]) -> None:
    if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"edges must be >= 2 finite, strictly increasing numbers, got {list(edges)}")
