"""``pyhybrid run propagate``: tracks through a field and a barrel (+ endcap) tracker, hits to HDF5.

Standalone (Dr.Jit only, no torch). Tracks start at the origin (optionally smeared),
with p_T uniform in [pt-min, pt-max], eta uniform in [-eta-max, eta-max], random
phi and charge sign. Each event is one track; the file holds per event:

* ``initial`` (8,): free parameters (x, y, z, t, tx, ty, tz, q/p) at the start,
* ``free`` (L, 8): free parameters on each layer (before its material),
* ``local`` (L, 2): local hit coordinates (cylinders: R phi, z [mm]; disks: rho [mm], phi [rad]),
* ``path_length`` (L,): path from the start [mm]; ``valid`` (L,): 1 where the layer was hit.

Layer order: barrel cylinders (``--radii``, sorted), then disks at +z, then disks at -z
(``--disks``, sorted by |z|, all beyond the barrel's half-length), the order in which tracks
from the origin cross them.
"""
from __future__ import annotations

import math

import click
import drjit as dr
import numpy as np

from pyhybrid.commands.common import batch_seed, batch_size_option, finite, output_option, refuse_existing, seed_option
from pyhybrid.io import EventWriter
from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.fields import SolenoidField, UniformField
from pyhybrid.kernels.material import MATERIALS
from pyhybrid.kernels.propagation import PARTICLES, Layer, PropagationOptions, propagate_layers, random_tracks
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN
from pyhybrid.kernels.surfaces import Cylinder, Disk
from pyhybrid.progress import progress_bar

DEFAULT_RADII = "32,72,116,172,260,360,500,660,820,1020"


def _floats(text: str, name: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise click.BadParameter(f"values must be positive and finite (mm), got {text!r}", param_hint=name)
    return values


@click.command("propagate")
@click.option("--tracks", type=click.IntRange(min=1), default=10000, show_default=True, help="Number of tracks (events).")
@click.option("--field", "field_kind", type=click.Choice(["solenoid", "uniform"]), default="solenoid", show_default=True)
@click.option("--bfield", "--b0", "bfield", type=finite(), default=2.0, show_default=True,
              help="Central / uniform field B_z [T] (b0 of the Python field classes).")
@click.option("--solenoid-radius", type=finite(min=0, min_open=True), default=1200.0, show_default=True,
              help="Coil radius [mm].")
@click.option("--solenoid-half-length", type=finite(min=0, min_open=True), default=3000.0,
              show_default=True, help="Coil half-length [mm].")
@click.option("--stepper", type=click.Choice(["rk4", "adaptive"]), default="rk4", show_default=True)
@click.option("--step-size", type=finite(min=0, min_open=True), default=10.0, show_default=True,
              help="RK4 step [mm].")
@click.option("--tolerance", type=finite(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adaptive stepper local error tolerance [mm].")
@click.option("--radii", default=DEFAULT_RADII, show_default=True, help="Barrel layer radii [mm], comma separated.")
@click.option("--half-length", type=finite(min=0, min_open=True), default=1200.0, show_default=True,
              help="Half-length of the barrel layers [mm].")
@click.option("--disks", default="", help="|z| of endcap disks [mm], comma separated (placed at +z and -z; "
              "beyond --half-length).")
@click.option("--disk-rmin", type=finite(min=0), default=30.0, show_default=True, help="Disk inner radius [mm].")
@click.option("--disk-rmax", type=finite(min=0, min_open=True), default=1000.0, show_default=True,
              help="Disk outer radius [mm].")
@click.option("--thickness", type=finite(min=0, min_open=True), default=0.3, show_default=True,
              help="Material thickness of every layer [mm].")
@click.option("--material", type=click.Choice([*MATERIALS, "none"]), default="silicon", show_default=True)
@click.option("--particle", type=click.Choice(sorted(PARTICLES)), default="muon", show_default=True)
@click.option("--pt-min", type=finite(min=0, min_open=True), default=1.0, show_default=True, help="GeV")
@click.option("--pt-max", type=finite(min=0, min_open=True), default=10.0, show_default=True, help="GeV")
@click.option("--eta-max", type=finite(min=0, max=10), default=1.0, show_default=True,
              help="Largest |pseudorapidity|.")
@click.option("--scattering", type=click.Choice(["none", "sample"]), default="none", show_default=True,
              help="sample: random multiple-scattering deflections (Highland).")
@click.option("--energy-loss/--no-energy-loss", default=True, show_default=True)
@batch_size_option(100_000, "Tracks")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@seed_option()
@output_option("hits.h5")
def command(tracks, field_kind, bfield, solenoid_radius, solenoid_half_length, stepper, step_size, tolerance, radii,
            half_length, disks, disk_rmin, disk_rmax, thickness, material, particle, pt_min, pt_max, eta_max,
            scattering, energy_loss, batch_size, device, precision, seed, output, overwrite):
    """Propagate charged tracks through a field and detector layers; write hits to HDF5."""
    refuse_existing(overwrite, output=output)
    if pt_min > pt_max:
        raise click.BadParameter(f"--pt-min ({pt_min}) must not exceed --pt-max ({pt_max})", param_hint="--pt-min")
    if disk_rmin >= disk_rmax:
        raise click.BadParameter("--disk-rmin must be below --disk-rmax", param_hint="--disk-rmin")
    # Tracks from the origin cross the layers in increasing radius (|z|): the order they are stepped to.
    radii_list, disk_list = sorted(_floats(radii, "--radii")), sorted(_floats(disks, "--disks"))
    if not radii_list and not disk_list:
        raise click.BadParameter("give at least one layer (--radii or --disks)", param_hint="--radii")
    for values, hint in ((radii_list, "--radii"), (disk_list, "--disks")):
        repeated = sorted({v for v, w in zip(values, values[1:]) if v == w})
        if repeated:  # two layers at one place: the same hit twice and the material counted twice
            raise click.BadParameter(f"layers listed twice: {', '.join(f'{v:g}' for v in repeated)} mm",
                                     param_hint=hint)
    if radii_list and disk_list and disk_list[0] <= half_length:
        # Tracks cross the layers in the order given: a disk inside the barrel's z range would be
        # reached before barrel layers that are listed before it, and then missed.
        raise click.BadParameter(f"endcap disks must lie beyond the barrel (|z| > --half-length = {half_length:g} mm), "
                                 f"got {disk_list[0]:g} mm", param_hint="--disks")
    try:
        types = kernel_types(device, precision)
    except Exception as error:  # BackendUnavailable: a clear message, not a traceback
        raise click.ClickException(str(error)) from None

    layer_material = None if material == "none" else MATERIALS[material]
    layers = [Layer(Cylinder(half_length=half_length), layer_material) for _ in radii_list]
    layers += [Layer(Disk(r_min=disk_rmin, r_max=disk_rmax), layer_material) for _ in range(2 * len(disk_list))]
    positions = radii_list + disk_list + [-z for z in disk_list]
    outermost = max(radii_list + disk_list)  # no track reaches the last layer on a shorter path
    if stepper == "rk4" and step_size * PropagationOptions.max_steps < outermost:
        raise click.BadParameter(f"{PropagationOptions.max_steps} steps of {step_size:g} mm end before the last "
                                 f"layer (at least {outermost:g} mm away): every track would stop short of it",
                                 param_hint="--step-size")
    kernel_stepper = RK4(step_size) if stepper == "rk4" else AdaptiveRKN(tolerance=tolerance)
    options = PropagationOptions(stepper=kernel_stepper, particle=PARTICLES[particle], energy_loss=energy_loss,
                                 scattering=scattering, world_radius=2.0 * max(positions + [disk_rmax]),
                                 world_half_length=2.0 * max(disk_list + [half_length]))
    # opaque: field values are kernel inputs, not constants compiled into the kernels
    if field_kind == "uniform":
        field = UniformField(*(dr.opaque(types.Float, b) for b in (0.0, 0.0, bfield)))
    else:
        field = SolenoidField(*(dr.opaque(types.Float, v) for v in (bfield, solenoid_radius, solenoid_half_length)))
    positions_array = types.Float(positions)
    thickness_array = types.Float([thickness] * len(layers))

    n_layers = len(layers)
    dtype = np.float32 if precision == "float32" else np.float64
    fixed = {"initial": ((8,), dtype), "free": ((n_layers, 8), dtype), "local": ((n_layers, 2), dtype),
             "path_length": ((n_layers,), dtype), "valid": ((n_layers,), np.uint8)}
    parameters = {"tracks": tracks, "field": field_kind, "bfield": bfield, "solenoid_radius": solenoid_radius,
                  "solenoid_half_length": solenoid_half_length, "stepper": stepper, "step_size": step_size,
                  "tolerance": tolerance, "radii": radii_list, "half_length": half_length, "disks": disk_list,
                  "disk_rmin": disk_rmin, "disk_rmax": disk_rmax, "thickness": thickness, "material": material,
                  "particle": particle, "pt_min": pt_min, "pt_max": pt_max, "eta_max": eta_max,
                  "scattering": scattering, "energy_loss": energy_loss, "precision": precision, "device": device,
                  "batch_size": batch_size,
                  "layer_order": "barrel radii (increasing), then disks at +z, then disks at -z (increasing |z|)"}
    metadata = {"parameters": parameters, "seed": seed, "generator": "pyhybrid run propagate",
                "units": {"local_disk_phi": "rad"}}
    with EventWriter(output, fixed=fixed, metadata=metadata, overwrite=overwrite) as writer, \
            progress_bar(tracks, "propagating tracks") as advance:
        for batch, start in enumerate(range(0, tracks, batch_size)):
            n = min(batch_size, tracks - start)
            seed_of_batch = batch_seed(seed, batch)
            initial = random_tracks(types, n, seed_of_batch, pt_range=(pt_min, pt_max), eta_max=eta_max)
            dr.eval(initial.columns())
            hits = propagate_layers(initial, field, layers, positions_array, thickness_array, options,
                                    seed=seed_of_batch)
            writer.append(n, {
                "initial": _matrix(initial.columns(), dtype),
                "free": np.stack([_matrix(f, dtype) for f in hits.free], axis=1),
                "local": np.stack([_matrix(v, dtype) for v in hits.local], axis=1),
                "path_length": _matrix(hits.path, dtype),
                "valid": _matrix(hits.valid, np.uint8)})
            advance(n)
    click.echo(f"wrote {tracks} tracks x {n_layers} layers to {output}")


def _matrix(columns, dtype) -> np.ndarray:
    """(n, k) numpy array from k Dr.Jit arrays."""
    dr.eval(columns)
    return np.stack([np.asarray(c, dtype=dtype) for c in columns], axis=1)
