"""Benchmark harness: Dr.Jit kernels vs a torch-eager implementation of the same computation.

Each kernel topic registers cases in ``pyhybrid/bench/<topic>.py`` as ``CASES``.
For every case, device and precision the harness runs, each in its own
subprocess so that peak memory belongs to one measurement:

* the Dr.Jit path for CPU thread counts 1..N (LLVM backend) or on CUDA;
* the torch-eager baseline (all CPU threads, or the GPU).

Times are medians over repeats after a warm-up call (which also JIT-compiles).
Reported: work units per second, the speed-up ratio vs torch eager measured in
the same run, peak RSS (CPU) and peak GPU memory (torch's allocator + Dr.Jit's).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_MODULES = ("propagate", "me", "shower", "calorimeter", "training")


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked computation.

    name: unique id, e.g. ``"propagate-rk4-forward"``.
    unit: what the work counts, e.g. ``"track-steps"`` or ``"events"``.
    batch: items (tracks, events, showers) one call processes on the CPU.
    setup: ``setup(device, precision, batch) -> (drjit_call, torch_call | None)``;
        each call runs the whole computation on ``batch`` items once, including
        evaluation and synchronisation. ``torch_call`` is the torch-eager baseline.
    grad: True when the calls include the gradient.
    cuda_batch: the batch on CUDA, larger because a GPU needs ~1e6 lanes in flight
        to be busy; None: the CPU batch.
    work_per_item: units of work per item (e.g. RK4 steps per track).
    """

    name: str
    unit: str
    batch: int
    setup: Callable[[str, str, int], tuple[Callable[[], None], Callable[[], None] | None]]
    grad: bool = False
    cuda_batch: int | None = None
    work_per_item: float = 1.0

    def batch_on(self, device: str) -> int:
        return self.cuda_batch if device == "cuda" and self.cuda_batch is not None else self.batch

    def work_on(self, device: str) -> int:
        """Units of work of one call on ``device``."""
        return int(self.batch_on(device) * self.work_per_item)


@functools.lru_cache(maxsize=None)
def load_reference(name: str):
    """``tests/reference/<name>.py`` (a torch-eager baseline), loaded by path: tests/ is not a package."""
    path = Path(__file__).resolve().parents[2] / "tests" / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pyhybrid_reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cases(topics=BENCH_MODULES) -> dict[str, BenchCase]:
    """All registered cases of the given topics, by name (topics not yet present are skipped)."""
    cases: dict[str, BenchCase] = {}
    for topic in topics:
        try:
            module = importlib.import_module(f"pyhybrid.bench.{topic}")
        except ModuleNotFoundError as error:
            if error.name == f"pyhybrid.bench.{topic}":
                continue
            raise
        for case in module.CASES:
            cases[case.name] = case
    return cases


def median_seconds(call: Callable[[], None], repeats: int, min_time: float = 0.0) -> float:
    """Median wall time of ``call`` after one warm-up call; at least ``repeats`` timings."""
    call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(case_name: str, device: str, precision: str, backend: str, threads: list[int],
            repeats: int) -> list[dict]:
    """Run one (case, device, precision, backend) in this process; return result rows."""
    case = load_cases()[case_name]
    drjit_call, torch_call = case.setup(device, precision, case.batch_on(device))
    rows = []
    if backend == "torch":
        if torch_call is None:
            return rows
        import torch

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(torch_call, repeats)
        rows.append(_row(case, device, precision, backend, os.cpu_count() if device == "cpu" else None, seconds))
    else:
        import drjit as dr

        for n in threads if device == "cpu" else [None]:
            if n is not None:
                dr.set_thread_count(n)
            seconds = median_seconds(drjit_call, repeats)
            rows.append(_row(case, device, precision, backend, n, seconds))
    for row in rows:
        row["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        if device == "cuda":
            row["cuda_peak_mb"] = _cuda_peak_mb()
    return rows


def _cuda_peak_mb() -> float:
    """GPU memory high-water mark of this process: torch's caching allocator plus Dr.Jit's own
    (the two peaks are added, an upper bound when they do not coincide)."""
    import drjit as dr
    import torch

    torch_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
    drjit_peak = dr.detail.malloc_watermark(dr.JitBackend.CUDA)
    return round((torch_peak + drjit_peak) / 2**20, 1)


def _row(case: BenchCase, device, precision, backend, threads, seconds) -> dict:
    return {"case": case.name, "unit": case.unit, "grad": case.grad, "device": device,
            "precision": precision, "backend": backend, "threads": threads,
            "seconds": seconds, "rate": case.work_on(device) / seconds}


def run_all(case_names: list[str], devices: list[str], precisions: list[str], max_threads: int,
            repeats: int) -> list[dict]:
    """Every measurement in its own subprocess; returns all rows with ratios vs torch eager."""
    rows: list[dict] = []
    threads = list(range(1, max_threads + 1))
    for name in case_names:
        for device in devices:
            for precision in precisions:
                for backend in ("torch", "drjit"):
                    rows += _subprocess_measure(name, device, precision, backend, threads, repeats)
    _add_ratios(rows)
    return rows


def _subprocess_measure(name, device, precision, backend, threads, repeats) -> list[dict]:
    spec = json.dumps({"case": name, "device": device, "precision": precision, "backend": backend,
                       "threads": threads, "repeats": repeats})
    result = subprocess.run([sys.executable, "-m", "pyhybrid.bench.harness", spec],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark {name} ({device}, {precision}, {backend}) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _add_ratios(rows: list[dict]) -> None:
    baseline = {(r["case"], r["device"], r["precision"]): r["rate"] for r in rows if r["backend"] == "torch"}
    for row in rows:
        reference = baseline.get((row["case"], row["device"], row["precision"]))
        row["ratio_vs_torch"] = None if reference is None else row["rate"] / reference


def plot(rows: list[dict], path: str) -> None:
    """Rate vs CPU threads per case (Dr.Jit), torch-eager baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(len(cases), 1, figsize=(7, 3.2 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        for precision in sorted({r["precision"] for r in rows if r["case"] == case}):
            cpu = [r for r in rows if r["case"] == case and r["precision"] == precision
                   and r["device"] == "cpu" and r["backend"] == "drjit"]
            if cpu:
                line, = ax.plot([r["threads"] for r in cpu], [r["rate"] for r in cpu], "o-",
                                label=f"Dr.Jit cpu {precision}")
                for r in rows:
                    if (r["case"], r["precision"], r["backend"]) == (case, precision, "torch") and r["device"] == "cpu":
                        ax.axhline(r["rate"], ls="--", color=line.get_color(), label=f"torch eager cpu {precision}")
            for r in rows:
                if (r["case"], r["precision"], r["device"]) == (case, precision, "cuda"):
                    ax.axhline(r["rate"], ls=":" if r["backend"] == "torch" else "-.",
                               label=f"{r['backend']} cuda {precision}")
        unit = next(r["unit"] for r in rows if r["case"] == case)
        ax.set_yscale("log")
        ax.set_xlabel("CPU threads")
        ax.set_ylabel(f"{unit} / s")
        ax.set_title(case)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    rows = measure(spec["case"], spec["device"], spec["precision"], spec["backend"],
                   spec["threads"], spec["repeats"])
    print(json.dumps(rows))


if __name__ == "__main__":
    _child(sys.argv[1])
