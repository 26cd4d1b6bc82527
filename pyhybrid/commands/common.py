"""Options and helpers shared by the ``pyhybrid run`` commands (no torch)."""
from __future__ import annotations

import math
import os
import tempfile

import click

_MASK64 = (1 << 64) - 1


class _FiniteFloatRange(click.FloatRange):
    name = "finite float"

    def _describe_range(self) -> str:
        return "finite" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def finite(min: float | None = None, max: float | None = None, *, min_open: bool = False,
           max_open: bool = False) -> click.ParamType:
    """Type of a float option that must be finite, optionally within a range (click's FloatRange
    lets nan and inf through: nan fails no comparison)."""
    return _FiniteFloatRange(min, max, min_open=min_open, max_open=max_open)


def writable_location(ctx, param, path: str | None) -> str | None:
    """Click callback: an output file must be creatable in its directory (fail before any kernel runs)."""
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise click.BadParameter(f"directory {directory!r} does not exist", ctx=ctx, param=param)
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise click.BadParameter(f"cannot write in {directory!r}: {error.strerror}", ctx=ctx, param=param) from None
    return path


def output_option(default: str, help: str = "HDF5 event file."):
    """``-o/--output``: the HDF5 file a command writes (its directory must exist), and ``--overwrite``."""
    output = click.option("-o", "--output", type=click.Path(dir_okay=False), default=default, show_default=True,
                          callback=writable_location, help=help)
    overwrite = click.option("--overwrite", is_flag=True,
                             help="Replace existing output files (default: refuse, so that no earlier run is lost).")
    return lambda command: output(overwrite(command))


def refuse_existing(overwrite: bool, **paths: str | None) -> None:
    """Fail (before any kernel runs) if an output file exists and ``--overwrite`` was not given.

    ``paths``: option name (``output``, ``lhe``) -> path or None."""
    if overwrite:
        return
    for option, path in paths.items():
        if path is not None and os.path.exists(path):
            raise click.BadParameter(f"{path!r} exists; pass --overwrite to replace it",
                                     param_hint="-o/--output" if option == "output" else f"--{option}")


def seed_option(default: int = 0):
    """``--seed``: a non-negative integer that fits the files' int64 metadata."""
    return click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=default, show_default=True,
                        help="Random seed (batches draw from streams derived from it).")


def batch_size_option(default: int, per: str):
    """``--batch-size`` (also ``--batch``): the items (``per``: "Tracks", "Events", ...) of one kernel
    launch and one write."""
    return click.option("--batch-size", "--batch", "batch_size", type=click.IntRange(min=1), default=default,
                        show_default=True, help=f"{per} per kernel launch and per write. Each batch draws its own "
                                                "random streams: keep it to reproduce a file.")


def batch_seed(seed: int, batch: int) -> int:
    """The 64-bit seed of batch ``batch`` of a run seeded with ``seed``.

    A hash of both (splitmix64's finaliser of seed * golden ratio + batch), so that batches of
    one run and runs with nearby seeds draw unrelated random streams (``seed + batch`` would
    give batch 1 of seed 0 the numbers of batch 0 of seed 1). A run's events therefore depend on
    its batch size.
    """
    x = (seed * 0x9E3779B97F4A7C15 + batch) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
