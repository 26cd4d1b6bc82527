"""The ``pyhybrid`` command line: ``info``, ``run KERNEL ...``, ``bench``.

``run`` executes Dr.Jit kernels standalone (no torch import) and writes HDF5
event files; each kernel's command lives in ``pyhybrid/commands/<name>.py`` and
is loaded only when used.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shutil

import click

RUN_COMMANDS = {
    "propagate": "charged-particle propagation through a tracker (hits)",
    "me": "matrix elements: cross sections and unweighted events",
    "shower": "e+e- -> q qbar dipole parton shower (particle lists)",
    "calorimeter": "electromagnetic showers in a sampling calorimeter (cell energies)",
}


class _LazyRunGroup(click.Group):
    """Subcommands imported on demand, so ``pyhybrid run X`` loads only X."""

    def list_commands(self, ctx):
        return sorted(RUN_COMMANDS)

    def get_command(self, ctx, name):
        if name not in RUN_COMMANDS:
            return None
        return importlib.import_module(f"pyhybrid.commands.{name}").command

    def format_commands(self, ctx, formatter):
        with formatter.section("Kernels"):
            formatter.write_dl([(name, RUN_COMMANDS[name]) for name in sorted(RUN_COMMANDS)])


@click.group()
@click.version_option(package_name="pyhybrid")
def main():
    """pyhybrid: differentiable particle-physics kernels (Dr.Jit) inside PyTorch models."""


@main.command()
def info():
    """Versions, devices, LLVM/CUDA availability and CPU threads."""
    import drjit as dr

    import pyhybrid
    from pyhybrid.kernels.backend import MIN_LLVM_MAJOR, cuda_available, llvm_version

    llvm = llvm_version()
    lines = {
        "pyhybrid": pyhybrid.__version__,
        "python": platform.python_version(),
        "drjit": dr.__version__,
        "libLLVM (cpu backend)": ("not found" if llvm is None else ".".join(map(str, llvm)))
        + ("" if llvm and llvm[0] >= MIN_LLVM_MAJOR else f"  [needs >= {MIN_LLVM_MAJOR}: apt-get install libllvm19]"),
        "CUDA (cuda backend)": "available" if cuda_available() else "not available",
        "cpu threads (Dr.Jit)": str(dr.thread_count()) if llvm else "-",
        "cpu cores": str(os.cpu_count()),
    }
    try:
        import torch

        lines["torch"] = f"{torch.__version__} (cuda: {torch.cuda.is_available()})"
    except ImportError:
        lines["torch"] = "not installed (kernels still run standalone)"
    import h5py

    lines["h5py / HDF5"] = f"{h5py.__version__} / {h5py.version.hdf5_version}"
    width = max(map(len, lines))
    for key, value in lines.items():
        click.echo(f"{key:<{width}}  {value}")


@main.group(cls=_LazyRunGroup)
def run():
    """Run a kernel standalone (no torch) and write an HDF5 event file."""


@main.command()
@click.option("--case", "cases", multiple=True, help="Case name (repeatable); default: all registered.")
@click.option("--device", "devices", multiple=True, type=click.Choice(["cpu", "cuda"]),
              help="Devices (repeatable); default: cpu, plus cuda when available.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["float32", "float64"]),
              default=("float32",), show_default=True)
@click.option("--threads", "max_threads", type=click.IntRange(min=1), default=None,
              help="Largest CPU thread count (default: all cores).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats (median).")
@click.option("-o", "--output", default="bench-results", show_default=True, help="Output folder for JSON and PNG.")
@click.option("--list", "list_only", is_flag=True, help="List registered cases and exit.")
def bench(cases, devices, precisions, max_threads, repeats, output, list_only):
    """Time kernels for CPU threads 1..N (and CUDA) against torch eager; write JSON + PNG."""
    from rich.console import Console
    from rich.table import Table

    from pyhybrid.bench import harness
    from pyhybrid.kernels.backend import cuda_available

    registered = harness.load_cases()
    if list_only:
        for name, case in registered.items():
            click.echo(f"{name}  ({case.unit}, work={case.work_on('cpu')}{', with gradient' if case.grad else ''})")
        return
    unknown = [c for c in cases if c not in registered]
    if unknown:
        raise click.BadParameter(f"unknown case(s) {unknown}; see `pyhybrid bench --list`", param_hint="--case")
    if repeats < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeats")
    devices = list(devices) or (["cpu", "cuda"] if cuda_available() else ["cpu"])
    if "cuda" in devices and not cuda_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    max_threads = max_threads or os.cpu_count()
    rows = harness.run_all(list(cases) or list(registered), devices, list(precisions), max_threads, repeats)
    os.makedirs(output, exist_ok=True)
    json_path = os.path.join(output, "bench.json")
    png_path = os.path.join(output, "bench.png")
    with open(json_path, "w") as f:
        json.dump({"cpu_cores": os.cpu_count(), "repeats": repeats, "rows": rows}, f, indent=1)
    harness.plot(rows, png_path)
    table = Table(title="pyhybrid bench (median of repeats)")
    for column in ("case", "device", "precision", "backend", "threads", "rate", "x torch eager",
                   "MB: calls / peak (RSS | GPU)", "OpenMP wait"):
        table.add_column(column)
    for r in rows:
        ratio = "-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.1f}"
        calls, peak = ("cuda_calls_mb", "cuda_peak_mb") if r["device"] == "cuda" else ("calls_rss_mb", "peak_rss_mb")
        memory = f"{r[calls]} / {r[peak]}" if calls in r else r[peak]
        table.add_row(r["case"], r["device"], r["precision"], r["backend"], str(r["threads"] or "-"),
                      f"{r['rate']:.3g} {r['unit']}/s", ratio, str(memory), r["openmp"])
    # Wide enough for the case names when the output is not a terminal (rich would assume 80 columns).
    Console(width=shutil.get_terminal_size((180, 24)).columns).print(table)
    click.echo(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
