"""Gradient / forward time ratios of the Dr.Jit modules, the cases alternating in one process.

The targets "forward + gradient <= 4x the forward" (propagation) and "gradient <= 3x forward"
(matrix elements) compare two calls of the same module. ``pyhybrid bench`` times each case in
its own process and batch size against torch eager; here the forward and the gradient calls of
one workload run round by round in one process, so that the machine's drift (large on shared
VMs) affects them alike. Each entry is the median time over the rounds and the median, smallest
and largest of its per-round ratios to the forward of the same round (a ratio within one round
cancels the drift between rounds). For the matrix elements two kernels that only move the momenta
as the matrix-element kernels do run in the same rounds (:func:`momentum_row_floors`), and their
ratio (read + read+write) / read: what grad-all / forward would be if both passes were memory
traffic alone.

Usage: ``python -m pyhybrid.bench.ratios [--topic propagate|me] [--size N] [--rounds R]``
(workloads of :mod:`pyhybrid.bench.propagate` and :mod:`pyhybrid.bench.me`, CPU, float32;
set ``OMP_WAIT_POLICY=PASSIVE`` on a machine with few cores, as ``pyhybrid bench`` does).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import drjit as dr

from pyhybrid.bench import me, propagate
from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.matrix_elements import get_process
from pyhybrid.nn.matrix_element import _four_vector_columns, _interleave_four_vectors


def propagation_calls(n_tracks: int, precision: str = "float32") -> dict[str, Callable[[], object]]:
    """The propagation benchmark's forward and its four gradient cases (track / all parameters,
    exact / ACTS Jacobian) on ``n_tracks`` tracks."""
    setups = {"forward": propagate._setup(None),
              "tracks, exact": propagate._setup("tracks"), "tracks, acts": propagate._setup("tracks", "acts"),
              "all, exact": propagate._setup("all"), "all, acts": propagate._setup("all", "acts")}
    return {name: setup("cpu", precision, n_tracks)[0] for name, setup in setups.items()}


def matrix_element_calls(process: str, n_events: int, precision: str = "float32") -> dict[str, Callable[[], object]]:
    """Forward, parameter gradient and parameter + momentum gradient of one process, and the two
    data-movement floors of :func:`momentum_row_floors`."""
    calls = {mode: me._setup(process, mode)("cpu", precision, n_events)[0]
             for mode in ("forward", "grad-params", "grad-all")}
    return {**calls, **momentum_row_floors(get_process(process).n_particles, n_events, precision)}


def momentum_row_floors(n_particles: int, n_events: int, precision: str = "float32") -> dict[str, Callable[[], object]]:
    """Kernels that only move the momenta the way the matrix-element kernels do: "floor: read" reads
    the (N, n, 4) rows into columns (what every forward must do), "floor: read+write" also writes a
    value per component back in the same layout (what every gradient with respect to the momenta
    must do besides). Where they take most of the forward and the grad-all backward, the grad-all
    ratio is bound by memory traffic, not by arithmetic. Recorded with ``dr.freeze`` and replayed,
    as the matrix-element calls are (a traced call would add Python's tracing time). They return
    what they computed: the sum of each event's components, and twice the rows."""
    import torch

    types = kernel_types("cpu", precision)
    flat = types.Float(torch.rand(n_events * n_particles * 4, dtype=getattr(torch, precision)))
    read, read_write = dr.freeze(_row_sums), dr.freeze(_rows_doubled)

    def synchronized(frozen):
        def call():
            result = frozen(flat, n_particles)
            dr.sync_thread()  # kernels run asynchronously
            return result
        return call

    return {"floor: read": synchronized(read), "floor: read+write": synchronized(read_write)}


def _row_sums(flat, n_particles: int):
    columns = _four_vector_columns(flat, n_particles)
    total = columns[0]
    for column in columns[1:]:
        total = total + column
    dr.eval(total)
    return total


def _rows_doubled(flat, n_particles: int):
    doubled = _interleave_four_vectors([2.0 * c for c in _four_vector_columns(flat, n_particles)])
    dr.eval(doubled)
    return doubled


def alternate(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, one entry per round, the calls alternating round by
    round (after ``warmup`` rounds that are not kept)."""
    times = {name: [] for name in calls}
    for round_index in range(warmup + rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def report(title: str, times: dict[str, list[float]]) -> str:
    """Per call: median time, and the median [smallest-largest] of its per-round ratios to "forward"
    (and, with the floors of :func:`momentum_row_floors`, their per-round ratio)."""
    lines = [title]
    for name, seconds in times.items():
        lines.append(f"  {name:17s} {statistics.median(seconds) * 1e3:9.2f} ms  "
                     + _ratio_text(seconds, times["forward"], "forward"))
    if "floor: read" in times:
        floor = [r + w for r, w in zip(times["floor: read"], times["floor: read+write"])]
        lines.append(f"  {'(read + read+write) / read':38s}" + _ratio_text(floor, times["floor: read"], "read"))
    return "\n".join(lines)


def _ratio_text(seconds: list[float], reference: list[float], name: str) -> str:
    ratios = [t / f for t, f in zip(seconds, reference)]
    return f"{statistics.median(ratios):5.2f}x {name} [{min(ratios):.2f}-{max(ratios):.2f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", choices=("propagate", "me"), action="append",
                        help="workload (repeatable; default: both)")
    parser.add_argument("--size", type=int, help="tracks (default 50 000) or events (default 2^20) per call")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    for topic in args.topic or ("propagate", "me"):
        if topic == "propagate":
            n = args.size or 50_000
            print(report(f"propagation, {n} tracks", alternate(propagation_calls(n), args.rounds)), flush=True)
        else:
            n = args.size or me.N_EVENTS
            for process in ("ee_mumu", "ee_qqg", "gg_tt"):
                print(report(f"{process}, {n} events", alternate(matrix_element_calls(process, n), args.rounds)),
                      flush=True)


if __name__ == "__main__":
    main()
