"""``pyhybrid run calorimeter``: electromagnetic showers in a sampling calorimeter (no torch).

Simulates electrons entering a GFLASH sampling calorimeter (:mod:`pyhybrid.kernels.calorimeter`; the
electron parametrisation: photons peak ~1 X0 deeper) and writes the measured cell energies.

HDF5 layout (fixed arrays, one row per event):
``cells`` (n_segments, n_cells, n_cells) [GeV, visible energy; axes: longitudinal segment, x, y],
``energy`` () incident energy [GeV],
``impact`` (2,) entry point (x, y) [mm]. Metadata ``parameters``: the design (materials, thicknesses,
segmentation, noise, ...) and derived quantities (``visible_fraction`` -- divide the cell sum by it to
calibrate --, ``stochastic_term``, ``radiation_length_eff``, ``moliere_radius_eff``, depth in X0).
Sampling fluctuations are Gaussian per cell, so nearly empty cells can hold small negative
energies (also with ``--noise 0``); sums over cells are unbiased.
"""
from __future__ import annotations

import math

import click
import numpy as np

from pyhybrid.commands.common import batch_seed, batch_size_option, finite, output_option, refuse_existing, seed_option
from pyhybrid.io import EventWriter
from pyhybrid.kernels import calorimeter as kernel
from pyhybrid.kernels.backend import BackendUnavailable, kernel_types
from pyhybrid.progress import progress_bar

__all__ = ["command"]

@click.command(name="calorimeter")
@click.option("--events", "n_events", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Number of showers.")
@click.option("--energy", type=finite(min=0.1), default=None,
              help="Fixed incident energy [GeV] (overrides the range).")
@click.option("--energy-min", type=finite(min=0.1), default=1.0, show_default=True,
              help="Uniform energy range, low [GeV].")
@click.option("--energy-max", type=finite(min=0.1), default=100.0, show_default=True,
              help="Uniform energy range, high [GeV].")
@click.option("--impact-spread", type=finite(min=0), default=0.0, show_default=True,
              help="Gaussian spread of the entry point in x and y [mm] (0: on the axis).")
@click.option("--absorber", type=click.Choice(sorted(kernel.MATERIALS)), default="lead", show_default=True)
@click.option("--active", type=click.Choice(sorted(kernel.MATERIALS)), default="scintillator", show_default=True)
@click.option("--absorber-thickness", type=finite(min=0, min_open=True), default=2.0, show_default=True, help="[mm]")
@click.option("--active-thickness", type=finite(min=0, min_open=True), default=4.0, show_default=True, help="[mm]")
@click.option("--layers", "--n-layers", "n_layers", type=click.IntRange(1, kernel.MAX_LAYERS), default=40,
              show_default=True, help="Sampling layers (absorber + active); n_layers in Python.")
@click.option("--layers-per-segment", type=click.IntRange(min=1), default=1, show_default=True,
              help="Layers summed into one longitudinal readout segment.")
@click.option("--cells", "n_cells", type=click.IntRange(1, kernel.MAX_CELLS), default=5, show_default=True,
              help="Transverse cells per side.")
@click.option("--cell-size", type=finite(min=0, min_open=True), default=30.0, show_default=True,
              help="Transverse cell side [mm].")
@click.option("--noise", type=finite(min=0), default=0.0, show_default=True,
              help="Electronic noise per readout cell [GeV of visible energy].")
@click.option("--quadrature-points", type=click.IntRange(1, 32), default=6, show_default=True,
              help="Gauss-Legendre points per segment for the depth integral (at least; one per 2.5 X0 of a "
                   "deeper segment).")
@batch_size_option(20_000, "Showers")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@seed_option(default=1)
@output_option("calorimeter.h5")
def command(n_events, energy, energy_min, energy_max, impact_spread, absorber, active, absorber_thickness,
            active_thickness, n_layers, layers_per_segment, n_cells, cell_size, noise, quadrature_points,
            batch_size, device, precision, seed, output, overwrite):
    """Electromagnetic showers (GFLASH) in a sampling calorimeter -> cell energies (HDF5).

    Cells (segment, x, y) hold visible energy [GeV] with Gaussian sampling fluctuations: nearly
    empty cells can be slightly negative (also without noise); sums over cells are unbiased."""
    refuse_existing(overwrite, output=output)
    if energy is not None:
        energy_min = energy_max = energy
    if not energy_min <= energy_max:
        raise click.BadParameter("need energy-min <= energy-max", param_hint="--energy-min/--energy-max")
    if n_layers % layers_per_segment:
        raise click.BadParameter(f"--layers ({n_layers}) must be a multiple of --layers-per-segment "
                                 f"({layers_per_segment})", param_hint="--layers/--layers-per-segment")
    try:
        types = kernel_types(device, precision)
        segmentation = kernel.Segmentation(n_layers, layers_per_segment, n_cells)
    except (ValueError, BackendUnavailable) as error:
        raise click.UsageError(str(error)) from None

    materials = kernel.MATERIALS[absorber], kernel.MATERIALS[active]
    try:
        design = kernel.Design.from_materials(*materials, absorber_thickness=absorber_thickness,
                                              active_thickness=active_thickness, cell_size=cell_size, noise=noise)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    medium = kernel.effective_medium(design)
    stochastic_term = kernel.SAMPLING_COEFFICIENT * math.sqrt(active_thickness / medium.mip_fraction)
    depth_x0 = n_layers * (absorber_thickness / materials[0].radiation_length
                           + active_thickness / materials[1].radiation_length)
    nodes = kernel.nodes_per_segment(depth_x0 / segmentation.n_segments, quadrature_points)
    parameters = {"absorber": absorber, "active": active, "absorber_thickness": absorber_thickness,
                  "active_thickness": active_thickness, "n_layers": n_layers,
                  "layers_per_segment": layers_per_segment, "n_cells": n_cells, "cell_size": cell_size,
                  "noise": noise, "energy_min": energy_min, "energy_max": energy_max, "batch_size": batch_size,
                  "impact_spread": impact_spread, "quadrature_points": quadrature_points,
                  "quadrature_nodes_per_segment": nodes,
                  "sampling_coefficient": kernel.SAMPLING_COEFFICIENT, "device": device, "precision": precision,
                  "visible_fraction": medium.visible_fraction, "stochastic_term": stochastic_term,
                  "radiation_length_eff": medium.radiation_length, "moliere_radius_eff": medium.moliere_radius,
                  "depth_radiation_lengths": depth_x0}
    dtype = np.float64 if precision == "float64" else np.float32
    shape = (segmentation.n_segments, n_cells, n_cells)
    fixed = {"cells": (shape, dtype), "energy": ((), dtype), "impact": ((2,), dtype)}
    metadata = {"parameters": parameters, "seed": seed, "generator": "pyhybrid run calorimeter"}

    with EventWriter(output, fixed=fixed, metadata=metadata, overwrite=overwrite) as writer, \
            progress_bar(n_events, "showers") as advance:
        for batch, start in enumerate(range(0, n_events, batch_size)):
            n = min(batch_size, n_events - start)
            seed_of_batch = batch_seed(seed, batch)
            rng = types.rng(n, seed_of_batch, stream=2)  # streams 0 and 1 belong to the shower kernel
            e = energy_min + (energy_max - energy_min) * types.uniform(rng)
            x = impact_spread * types.normal(rng)
            y = impact_spread * types.normal(rng)
            cells = kernel.cell_energies(e, x, y, design, segmentation, seed_of_batch, nodes)
            rows = np.stack([np.asarray(c) for c in cells], axis=-1).reshape(n, *shape)
            writer.append(n, {"cells": rows.astype(dtype, copy=False), "energy": np.asarray(e, dtype=dtype),
                              "impact": np.stack([np.asarray(x), np.asarray(y)], axis=-1).astype(dtype)})
            advance(n)
    click.echo(f"{n_events} showers -> {output}  (visible fraction {medium.visible_fraction:.4f}, "
               f"stochastic term {100 * stochastic_term:.1f} %/sqrt(E), depth {depth_x0:.1f} X0)")
