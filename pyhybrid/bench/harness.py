"""Benchmark harness: Dr.Jit kernels vs a torch-eager implementation of the same computation.

Each kernel topic registers cases in ``pyhybrid/bench/<topic>.py`` as ``CASES``.
For every case, device and precision the harness starts two subprocesses (so that
peak memory belongs to one implementation), each set up and warmed up once (which
also JIT-compiles):

* the Dr.Jit path for CPU thread counts 1..N (LLVM backend) or on CUDA;
* the torch-eager baseline (all CPU threads, or the GPU),

and times them alternately: each round is one block of torch-eager calls followed
by one block of Dr.Jit calls per thread count, so that both see the same load of a
shared machine. A block runs the call back to back for at least BLOCK_SECONDS (one
call if it is longer) and takes the median without its first call (steady state:
the first wakes the idle thread pools up). Times are medians over the rounds. Reported: work units per second, the speed-up
ratio vs torch eager, peak RSS (CPU) and peak GPU memory (torch's allocator +
Dr.Jit's) of each process; on Linux also ``calls_rss_mb``, the peak RSS of the warm-up and timed
calls above the RSS after the set-up (the set-up -- interpreter, torch, Dr.Jit, input data -- is
the same in both processes and would otherwise dominate the peak), and on CUDA likewise
``cuda_calls_mb``, the calls' GPU peak above the GPU memory held at the end of the set-up.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_MODULES = ("propagate", "me", "shower", "calorimeter", "training")
# Seconds of rest before each timed block: Dr.Jit's workers spin ~20 ms after a kernel and libgomp's
# a few ms after a torch op, on the cores the next block (of the other process) needs.
IDLE_PAUSE = 0.06
# Seconds of back-to-back calls per timed block (short calls are timed in steady state).
BLOCK_SECONDS = 0.3
# The Dr.Jit process runs with torch's OpenMP threads waiting passively (see :func:`_environment`).
DRJIT_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}


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


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MB, None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the peak-RSS count (VmHWM) at the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory_report(set_up_rss: float | None, reset: bool) -> dict:
    """Peak RSS of the process [MB] and, where it could be counted from the end of the set-up, the
    peak above the set-up's RSS: the memory of the calls themselves (their intermediates, Dr.Jit's
    allocation cache and compiled kernels), without the interpreter, libraries and input data."""
    peak = _status_mb("VmHWM") if reset else None
    if peak is None:  # no /proc: the peak of the whole process, set-up included
        return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    return {"peak_rss_mb": round(peak, 1), "calls_rss_mb": round(peak - set_up_rss, 1)}


class _Worker:
    """A subprocess holding one (case, device, precision, backend) set up and warmed up, timing one
    call per request: two of them (torch eager and Dr.Jit) are timed alternately, so that both see
    the same load of a shared machine, and each reports the peak memory of its own process."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.environment = _environment(spec["backend"])
        self.log = tempfile.TemporaryFile(mode="w+")  # the child's stderr (a pipe could fill up and block it)
        self.process = subprocess.Popen([sys.executable, "-m", "pyhybrid.bench.harness", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, **self.environment})
        self.available = self._reply()["available"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"benchmark {self.spec} failed:\n{self.log.read()}")
        return json.loads(line)

    def request(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        """The process's peak memory; ends it."""
        memory = self.request(stop=True)
        self.process.wait()
        self.log.close()
        return memory


def _environment(backend: str) -> dict:
    """Environment variables set for a worker process (beyond the caller's).

    libgomp, torch's OpenMP runtime, keeps its threads spinning for up to ~20 ms after every parallel
    torch op (by default: GOMP_SPINCOUNT = 300 000 pause instructions), on the cores that a Dr.Jit
    kernel launched right after it needs: on 2 cores the gradient kernel after a loss's ``.sum()``
    took 1.6x as long. The Dr.Jit process therefore runs with ``OMP_WAIT_POLICY=PASSIVE``, the
    setting README recommends for mixing torch and Dr.Jit on few cores; the torch-eager process keeps
    the default, which is faster for torch alone. A caller who sets OMP_WAIT_POLICY or GOMP_SPINCOUNT
    (``GOMP_SPINCOUNT=300000`` is libgomp's default) keeps that in both processes.
    """
    if backend != "drjit" or any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        return {}
    return dict(DRJIT_OPENMP)


def _openmp_setting(environment: dict) -> str:
    """The OpenMP wait setting a worker ran with, for the report."""
    merged = {**os.environ, **environment}
    settings = [f"{name}={merged[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if name in merged]
    return " ".join(settings) or "default"


def _measure_interleaved(case: BenchCase, device: str, precision: str, threads: list, repeats: int) -> list[dict]:
    """Medians of ``repeats`` rounds, each one torch-eager block and one Dr.Jit block per thread count."""
    spec = {"case": case.name, "device": device, "precision": precision, "threads": threads}
    workers = {backend: _Worker({**spec, "backend": backend}) for backend in ("torch", "drjit")}
    times: dict = {("torch", None): [], **{("drjit", n): [] for n in threads}}
    for _ in range(repeats):
        if workers["torch"].available:
            times["torch", None].append(workers["torch"].request(threads=None)["seconds"])
        for n in threads:
            times["drjit", n].append(workers["drjit"].request(threads=n)["seconds"])
    memory = {backend: worker.close() for backend, worker in workers.items()}
    rows = []
    for (backend, n), seconds in times.items():
        if seconds:
            reported_threads = (os.cpu_count() if device == "cpu" else None) if backend == "torch" else n
            rows.append({**_row(case, device, precision, backend, reported_threads, statistics.median(seconds)),
                         "openmp": _openmp_setting(workers[backend].environment), **memory[backend]})
    return rows


def _serve(spec: dict) -> None:
    """Child process: set the case up, warm it up (also JIT-compiles), then time one call per request."""
    protocol, sys.stdout = sys.stdout, sys.stderr  # anything the case prints must not reach the protocol

    def reply(**message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    case = load_cases()[spec["case"]]
    device = spec["device"]
    drjit_call, torch_call = case.setup(device, spec["precision"], case.batch_on(device))
    set_up_rss, reset = _status_mb("VmRSS"), _reset_peak_rss()
    set_up_gpu = _reset_cuda_peak() if device == "cuda" else None
    call = torch_call if spec["backend"] == "torch" else drjit_call
    set_threads = None
    if call is not None and spec["backend"] == "drjit" and device == "cpu":
        import drjit as dr

        set_threads = dr.set_thread_count
    if call is not None:
        for n in spec["threads"] if set_threads else [None]:
            if n is not None:
                set_threads(n)
            call()
    reply(available=call is not None)
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("stop"):
            memory = _memory_report(set_up_rss, reset)
            if device == "cuda":
                memory.update(_cuda_memory_report(set_up_gpu))
            reply(**memory)
            return
        if set_threads is not None and message["threads"] is not None:
            set_threads(message["threads"])
        time.sleep(IDLE_PAUSE)
        reply(seconds=_block_seconds(call))


def _block_seconds(call: Callable[[], None]) -> float:
    """Time per call in steady state: calls back to back for at least BLOCK_SECONDS, the median
    without the first one (which wakes the idle thread pools up), or the one call if it is longer."""
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < BLOCK_SECONDS:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times)


def _cuda_peak_bytes() -> int:
    """GPU memory high-water mark since the last :func:`_reset_cuda_peak`: torch's caching allocator
    plus Dr.Jit's (the two peaks are added, an upper bound when they do not coincide)."""
    import drjit as dr
    import torch

    torch_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
    return torch_peak + dr.detail.malloc_watermark(dr.JitBackend.CUDA)


def _reset_cuda_peak() -> int:
    """Restart both GPU allocators' peak counts at their current use, which is returned [bytes].
    Dr.Jit counts its allocation cache as in use: emptied first, so that what the calls allocate
    counts as theirs."""
    import drjit as dr
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dr.sync_thread()
    dr.flush_malloc_cache()
    dr.detail.malloc_clear_statistics()
    return _cuda_peak_bytes()


def _cuda_memory_report(set_up_bytes: int) -> dict:
    """GPU peak of the calls [MB]: ``cuda_peak_mb`` with the set-up's data, ``cuda_calls_mb`` above it."""
    peak = _cuda_peak_bytes()
    return {"cuda_peak_mb": round(peak / 2**20, 1), "cuda_calls_mb": round((peak - set_up_bytes) / 2**20, 1)}


def _row(case: BenchCase, device, precision, backend, threads, seconds) -> dict:
    return {"case": case.name, "unit": case.unit, "grad": case.grad, "device": device,
            "precision": precision, "backend": backend, "threads": threads,
            "seconds": seconds, "rate": case.work_on(device) / seconds}


def run_all(case_names: list[str], devices: list[str], precisions: list[str], max_threads: int,
            repeats: int) -> list[dict]:
    """All cases, devices and precisions (see :class:`_Worker`); rows with ratios vs torch eager."""
    cases = load_cases()
    rows: list[dict] = []
    for name in case_names:
        for device in devices:
            for precision in precisions:
                threads = list(range(1, max_threads + 1)) if device == "cpu" else [None]
                rows += _measure_interleaved(cases[name], device, precision, threads, repeats)
    _add_ratios(rows)
    return rows


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


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
