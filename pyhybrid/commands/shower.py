"""``pyhybrid run shower``: e+e- -> q qbar events with the dipole parton shower (no torch).

Events are written in batches to HDF5 (``pyhybrid.io``) as variable-length
particle lists (jagged arrays, one entry per final-state parton):
``E``, ``px``, ``py``, ``pz`` [GeV] (float64 or float32 as ``--precision``),
``pid`` (int32 PDG id), ``col``, ``acol`` (int32 LHE colour tags, 0 = none).
Fixed per-event arrays: ``n_emissions`` (int32) and, unless
``--no-observables``, the event shapes ``y23``, ``y34``, ``y45``, ``y56``
(Durham, 0 if the event has too few partons) and ``thrust``.
Metadata ``parameters``: alpha_s(mZ), t0 [GeV^2], sqrt_s [GeV], max_particles,
precision, device, batch_size.
"""
from __future__ import annotations

import click
import numpy as np

from pyhybrid.commands.common import batch_seed, batch_size_option, finite, output_option, refuse_existing, seed_option
from pyhybrid.kernels.backend import BackendUnavailable, kernel_types
from pyhybrid.kernels.shower import ShowerSettings

__all__ = ["command"]

SHAPES = ("y23", "y34", "y45", "y56", "thrust")


@click.command(name="shower")
@click.option("--events", "n_events", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Number of events.")
@click.option("--alpha-s", "alpha_s", type=finite(), default=0.118, show_default=True, help="alpha_s(mZ), in [0.05, 0.14] (two-loop running).")
@click.option("--t0", type=finite(), default=1.0, show_default=True, help="Shower cutoff in kT^2 [GeV^2]: above the scale where alpha_s reaches 1 (~0.24 GeV^2 at alpha_s = 0.118) and below s / 4.")
@click.option("--sqrt-s", "sqrt_s", type=finite(), default=91.2, show_default=True, help="Collision energy [GeV], in [10, 340] (five massless flavours).")
@click.option("--max-particles", "max_particles", type=click.IntRange(min=4, max=1024), default=64, show_default=True,
              help="Parton slots per event.")
@batch_size_option(100_000, "Events (memory ~ batch size x max-particles)")
@click.option("--observables/--no-observables", default=True, show_default=True,
              help="Also store Durham y23..y56 and thrust.")
@output_option("shower_events.h5")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float64", show_default=True)
@seed_option()
def command(n_events, alpha_s, t0, sqrt_s, max_particles, batch_size, observables, output, overwrite, device, precision, seed):
    """Shower e+e- -> q qbar events and write their parton lists (and event shapes)."""
    refuse_existing(overwrite, output=output)
    from pyhybrid.io import EventWriter
    from pyhybrid.kernels.observables import event_shapes
    from pyhybrid.kernels.shower import run_shower
    from pyhybrid.progress import progress_bar

    try:
        settings = ShowerSettings(alpha_s_mz=alpha_s, t0=t0, sqrt_s=sqrt_s, max_particles=max_particles)
        types = kernel_types(device, precision)
    except (ValueError, BackendUnavailable) as error:
        raise click.UsageError(str(error)) from None
    dtype = np.float64 if precision == "float64" else np.float32
    jagged = {"E": dtype, "px": dtype, "py": dtype, "pz": dtype, "pid": np.int32, "col": np.int32, "acol": np.int32}
    fixed = {"n_emissions": ((), np.int32)}
    if observables:
        fixed.update({name: ((), dtype) for name in SHAPES})
    parameters = {"alpha_s_mz": alpha_s, "t0": t0, "sqrt_s": sqrt_s, "max_particles": max_particles,
                  "precision": precision, "device": device, "batch_size": batch_size}
    metadata = {"parameters": parameters, "seed": seed, "generator": "pyhybrid run shower",
                "units": {"t0": "GeV^2"}}
    with EventWriter(output, fixed=fixed, jagged=jagged, metadata=metadata, overwrite=overwrite) as writer, \
            progress_bar(n_events, "showering") as advance:
        done, batch_index = 0, 0
        while done < n_events:
            n = min(batch_size, n_events - done)
            # Disjoint random streams per batch: the seed of batch k is derived from (seed, k).
            result = run_shower(types, n, settings, seed=batch_seed(seed, batch_index))
            if bool(np.any(result.overflow.numpy())):
                raise click.ClickException(f"an event needed more than --max-particles = {max_particles} partons; "
                                           "increase it")
            counts = result.n_particles.numpy().astype(np.int64)
            keep = np.arange(max_particles)[None, :] < counts[:, None]
            record = result.record
            lists = {name: getattr(record, name).numpy().reshape(n, max_particles)[keep]
                     for name in ("E", "px", "py", "pz", "pid", "col", "acol")}
            lists = {name: (counts, values.astype(jagged[name])) for name, values in lists.items()}
            per_event = {"n_emissions": result.n_emissions.numpy().astype(np.int32)}
            if observables:
                shapes = event_shapes([record.E, record.px, record.py, record.pz], result.n_particles, settings.s)
                for name, values in zip(SHAPES, [*shapes.y, shapes.thrust]):
                    per_event[name] = values.numpy().astype(dtype)
            writer.append(n, per_event, lists)
            done += n
            batch_index += 1
            advance(n)
    click.echo(f"{n_events} events (alpha_s(mZ) = {alpha_s:g}, t0 = {t0:g} GeV^2, sqrt(s) = {sqrt_s:g} GeV) "
               f"-> {output}")
