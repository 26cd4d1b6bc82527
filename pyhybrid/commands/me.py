"""``pyhybrid run me``: LO cross sections with Monte Carlo errors and unweighted events (no torch).

Integrates |M|^2 over phase space with VEGAS, prints sigma +- error [pb], then
generates unweighted events by hit-or-miss on the adapted grid and writes them
to HDF5 (``pyhybrid.io``) and optionally to a Les Houches event file.

HDF5 layout (fixed arrays, one row per event):
``momenta`` (n_particles, 4) float64 [GeV], ``pdg`` (n_particles,) int32,
``colour`` (n_particles, 2) int32 (LHE colour/anticolour tags, 0 = none).
Metadata ``parameters``: process, flavour, sqrt_s and the SM inputs; extra
attributes: cross_section_pb, cross_section_error_pb, chi2_per_dof, max_weight_pb
(the w_max of the hit-or-miss; the number of trials and of trial points above
w_max are printed at the end).
"""
from __future__ import annotations

import contextlib
import os

import click
import numpy as np

from pyhybrid.commands.common import finite, output_option, refuse_existing, seed_option, writable_location
from pyhybrid.kernels.backend import BackendUnavailable, kernel_types
from pyhybrid.kernels.electroweak import DEFAULTS, GF, SMParameters, alpha_from_gf
from pyhybrid.kernels.hard_process import MAPPINGS, HardProcess
from pyhybrid.kernels.matrix_elements import PROCESSES

__all__ = ["command", "colour_tags", "LHEWriter"]


def colour_tags(process: str, n_events: int, colour_flow: np.ndarray) -> np.ndarray:
    """LHE colour tags (n_events, n_particles, 2) for the processes' leading-colour flows."""
    flows = {
        "ee_mumu": [(0, 0)] * 4,
        "ee_qq": [(0, 0), (0, 0), (501, 0), (0, 501)],
        "ee_qqg": [(0, 0), (0, 0), (501, 0), (0, 502), (502, 501)],
        "qq_tt": [(501, 0), (0, 502), (501, 0), (0, 502)],
    }
    if process == "gg_tt":  # flow 0: top colour-connected to gluon 1; flow 1: to gluon 2
        tags = np.array([[(501, 502), (502, 503), (501, 0), (0, 503)],
                         [(502, 503), (501, 502), (501, 0), (0, 503)]], dtype=np.int32)
        return tags[np.asarray(colour_flow, dtype=np.int64)]
    return np.broadcast_to(np.array(flows[process], dtype=np.int32), (n_events, len(flows[process]), 2)).copy()


class LHEWriter:
    """Les Houches event file (LHEF 3.0) for unweighted events; event weights sum to sigma [pb].

    ``masses``: the nominal mass [GeV] of each particle (written as PUP5).

    Use as a context manager: the header and <init> block are written on entry,
    :meth:`write` appends events, the closing tag is written on a normal exit. A run that is
    interrupted keeps its events but gets a comment instead of the closing tag: its weights assume
    all requested events, so the file must not pass for a complete sample (LHE readers reject it).
    """

    def __init__(self, path: str, *, beams: tuple[int, int], masses: list[float], sqrt_s: float,
                 cross_section: float, error: float, n_events: int, alpha: float, alpha_s: float, description: str):
        self.path = path
        self.masses = masses
        self.sqrt_s, self.alpha, self.alpha_s = sqrt_s, alpha, alpha_s
        self.weight = cross_section / max(n_events, 1)
        self.n_requested, self.n_written = n_events, 0
        self._file = open(path, "w")
        self._file.write('<LesHouchesEvents version="3.0">\n<header>\n'
                         f"<!-- pyhybrid LO matrix elements: {description}; sqrt(s) = {sqrt_s:g} GeV -->\n"
                         "</header>\n<init>\n"
                         f"{beams[0]:d} {beams[1]:d} {sqrt_s / 2:.10e} {sqrt_s / 2:.10e} 0 0 0 0 3 1\n"
                         f"{cross_section:.10e} {error:.10e} {self.weight:.10e} 1\n</init>\n")

    def write(self, momenta: np.ndarray, pdg: np.ndarray, colour: np.ndarray) -> None:
        """Append events: momenta (n, n_particles, 4) [GeV], pdg (n, n_particles), colour (n, n_particles, 2)."""
        n_events, n_particles, _ = momenta.shape
        lines = []
        for i in range(n_events):
            lines.append(f"<event>\n{n_particles} 1 {self.weight:.10e} {self.sqrt_s:.10e} "
                         f"{self.alpha:.10e} {self.alpha_s:.10e}")
            for j in range(n_particles):
                e, px, py, pz = momenta[i, j]
                status = "-1 0 0" if j < 2 else "1 1 2"  # ISTUP MOTHUP1 MOTHUP2
                lines.append(f"{pdg[i, j]:d} {status} {colour[i, j, 0]:d} {colour[i, j, 1]:d} {px:.10e} {py:.10e} "
                             f"{pz:.10e} {e:.10e} {self.masses[j]:.10e} 0 9")
            lines.append("</event>")
        if lines:
            self._file.write("\n".join(lines) + "\n")
        self.n_written += n_events

    def close(self, complete: bool = True) -> None:
        if not self._file.closed:
            self._file.write("</LesHouchesEvents>\n" if complete else
                             f"<!-- INCOMPLETE: the run stopped after {self.n_written} of {self.n_requested} events; "
                             "the weights assume all of them -->\n")
            self._file.close()

    def __enter__(self) -> "LHEWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(complete=exc_type is None)


POSITIVE = finite(min=0, min_open=True)


@click.command(name="me")
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="ee_mumu", show_default=True,
              help="LO process (see docs/matrix_elements.md).")
@click.option("--flavour", default=None,
              help="Quark flavour: d u s c b or 'all' (ee_qq, ee_qqg; default all), initial quark for qq_tt.")
@click.option("--sqrt-s", "sqrt_s", type=POSITIVE, default=91.2, show_default=True, help="Collision energy [GeV].")
@click.option("--events", "n_events", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Unweighted events to generate (0: cross section only).")
@output_option("me_events.h5")
@click.option("--lhe", type=click.Path(dir_okay=False), default=None, callback=writable_location,
              help="Also write a Les Houches event file.")
@click.option("--mz", type=POSITIVE, default=DEFAULTS.mz, show_default=True, help="Z mass [GeV].")
@click.option("--gamma-z", "gamma_z", type=POSITIVE, default=DEFAULTS.gamma_z, show_default=True, help="Z width [GeV].")
@click.option("--alpha", type=POSITIVE, default=None, help=f"alpha (default {DEFAULTS.alpha:.6g}).")
@click.option("--gf", type=POSITIVE, default=None, help=f"G_F [GeV^-2] (G_mu scheme, e.g. {GF}); excludes --alpha.")
@click.option("--sin2w", "sin2_theta_w", type=finite(0, 1, min_open=True, max_open=True),
              default=DEFAULTS.sin2_theta_w, show_default=True,
              help="sin^2 theta_W.")
@click.option("--alpha-s", "alpha_s", type=POSITIVE, default=DEFAULTS.alpha_s, show_default=True, help="alpha_s.")
@click.option("--top-mass", "top_mass", type=POSITIVE, default=DEFAULTS.top_mass, show_default=True,
              help="Top mass [GeV].")
@click.option("--y-cut", "y_cut", type=finite(), default=0.01, show_default=True,
              help="ee_qqg: minimum s_ij / s of every parton pair, in (0, 1/3).")
@click.option("--mapping", type=click.Choice(MAPPINGS), default="angles", show_default=True,
              help="Phase-space mapping of the unit cube.")
@click.option("--points", "n_points", type=click.IntRange(min=100), default=100_000, show_default=True,
              help="Points per VEGAS iteration.")
@click.option("--adapt", "adapt_iterations", type=click.IntRange(min=0), default=5, show_default=True,
              help="VEGAS grid-training iterations.")
@click.option("--iterations", type=click.IntRange(min=1), default=5, show_default=True,
              help="VEGAS iterations of the estimate.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float64", show_default=True)
@seed_option()
def command(process, flavour, sqrt_s, n_events, output, overwrite, lhe, mz, gamma_z, alpha, gf, sin2_theta_w, alpha_s,
            top_mass, y_cut, mapping, n_points, adapt_iterations, iterations, device, precision, seed):
    """LO cross section (VEGAS, with MC error) and unweighted events of one process at fixed sqrt(s)."""
    from pyhybrid.io import EventWriter
    from pyhybrid.progress import progress_bar

    if alpha is not None and gf is not None:
        raise click.BadParameter("give either --alpha or --gf, not both", param_hint="--gf")
    if lhe is not None and n_events == 0:
        raise click.BadParameter("an LHE file needs events (--events > 0)", param_hint="--lhe")
    if lhe is not None and os.path.abspath(lhe) == os.path.abspath(output):
        raise click.BadParameter("the LHE file must differ from the HDF5 output (-o)", param_hint="--lhe")
    if n_events > 0:  # (no file is written for the cross section alone)
        refuse_existing(overwrite, output=output, lhe=lhe)
    if gf is not None:
        alpha = alpha_from_gf(gf, mz, sin2_theta_w)
    params = SMParameters(mz=mz, gamma_z=gamma_z, alpha=DEFAULTS.alpha if alpha is None else alpha,
                          sin2_theta_w=sin2_theta_w, alpha_s=alpha_s, top_mass=top_mass)
    if mapping == "rambo" and precision == "float32":
        # RAMBO's conformal transformation cancels digits: in float32 ~1 % of the events break momentum
        # conservation or the on-shell masses by up to 1e-2 sqrt(s).
        raise click.BadParameter("the rambo mapping needs --precision float64", param_hint="--mapping")
    try:
        types = kernel_types(device, precision)
        hard = HardProcess(process, sqrt_s, params, flavour=flavour, mapping=mapping, y_cut=y_cut)
    except (ValueError, BackendUnavailable) as error:
        raise click.UsageError(str(error)) from None

    with progress_bar(adapt_iterations + iterations, f"VEGAS {process}") as advance:
        result = hard.cross_section(types, n_points=n_points, adapt_iterations=adapt_iterations,
                                    iterations=iterations, seed=seed, advance=advance)
    click.echo(f"{hard.process.description}, flavour {hard.flavour or '-'}, sqrt(s) = {sqrt_s:g} GeV")
    click.echo(f"sigma = {result.integral:.6g} +- {result.error:.3g} pb  "
               f"(VEGAS, {iterations} x {n_points} points, chi2/dof = "
               f"{'n/a' if result.chi2_per_dof is None else format(result.chi2_per_dof, '.2f')})")
    if n_events == 0:
        return

    parameters = {"process": process, "flavour": hard.flavour, "sqrt_s": sqrt_s, "mz": mz, "gamma_z": gamma_z,
                  "alpha": params.alpha, "gf": gf, "sin2_theta_w": sin2_theta_w, "alpha_s": alpha_s,
                  "top_mass": top_mass, "y_cut": y_cut if hard.process.n_out == 3 else None, "mapping": mapping,
                  "precision": precision, "device": device}
    metadata = {"parameters": parameters, "seed": seed, "generator": "pyhybrid run me",
                "cross_section_pb": result.integral, "cross_section_error_pb": result.error,
                "chi2_per_dof": result.chi2_per_dof, "max_weight_pb": result.max_weight,
                "units": {"cross_section": "pb"}}
    n_particles = hard.process.n_particles
    fixed = {"momenta": ((n_particles, 4), np.float64), "pdg": ((n_particles,), np.int32),
             "colour": ((n_particles, 2), np.int32)}
    n_trials = n_overweight = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(EventWriter(output, fixed=fixed, metadata=metadata, overwrite=overwrite))
        lhe_writer = None if lhe is None else stack.enter_context(LHEWriter(
            lhe, beams=hard.process.pdg_ids(hard.flavour)[:2], masses=[0.0, 0.0] + hard.process.outgoing_masses(params),
            sqrt_s=sqrt_s, cross_section=result.integral,
            error=result.error, n_events=n_events, alpha=params.alpha, alpha_s=alpha_s,
            description=hard.process.description))
        advance = stack.enter_context(progress_bar(n_events, "unweighting"))
        for chunk in hard.unweighted_batches(types, result, n_events, seed=seed):
            n_trials += chunk.n_trials
            n_overweight += chunk.n_overweight
            n = len(chunk.momenta)
            if n == 0:
                continue
            colour = colour_tags(process, n, chunk.colour_flow)
            writer.append(n, {"momenta": chunk.momenta, "pdg": chunk.pdg, "colour": colour})
            if lhe_writer is not None:
                lhe_writer.write(chunk.momenta, chunk.pdg, colour)
            advance(n)
    click.echo(f"{n_events} unweighted events -> {output}" + (f" and {lhe}" if lhe else "")
               + f"  (efficiency {n_events / n_trials:.3g}, {n_overweight} trial points above w_max)")

