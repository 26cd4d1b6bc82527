#!/usr/bin/env python
"""Example B: an unknown detector distortion learned by a small network inside the physics pipeline.

The tracker of Example A (10 barrel layers, 2 T solenoid), but its six strip
layers are deformed in a way the reconstruction does not know: each has an
elliptical deformation (a shift along r*phi of A_l sin(2 phi + a_l)) and a tilt
(a shift along z of B_l cos(phi + b_l)), with amplitudes of 100-300 um and
300-1000 um that differ from layer to layer -- several times the hit resolution.
The four pixel layers are taken as aligned (the reference). Fitting tracks with
the nominal geometry gives a bad chi^2 and degraded parameters.

The model is the physics pipeline with a network inside it::

    perigee parameters -> Propagator -> hits -> + HitCorrection(hit position) -> predicted measurements

i.e. ``Component(physics=PerigeeHits(propagator), correction=HitCorrection(radii))``
in ``residual`` mode. Neither the track parameters nor the distortion are known:
training alternates, as track-based alignment does, between

* fitting every training track (Gauss-Newton through propagator + correction; the
  Jacobian comes from the propagator's adjoint and torch autograd of the network), and
* Adam steps of the network on the hit residuals with the tracks fixed.

Recovered truth, on held-out tracks: chi^2 / ndf and track-parameter resolution
and bias of fits with (a) the nominal geometry, (b) the learned correction, (c)
the true distortion (oracle); and the learned distortion against the true one.
A distortion that every track can absorb by changing its own parameters (a
"weak mode": e.g. a shift growing linearly with radius looks like a change of
phi) cannot be measured by tracks at all; the comparison is therefore made on
the observable part -- what is left after projecting out, track by track, the
directions the track's own parameters can produce -- and the raw difference is
printed too.

Run:  .venv/bin/python examples/learned_correction.py [--quick] [-o out/]
Writes out/learned_correction.png and prints the results.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from pyhybrid.engine import set_threads
from pyhybrid.nn.hybrid import (Component, HitCorrection, fit, gauss_newton_step, local_residuals, residual_jacobian,
                                wrap_angle)
from pyhybrid.progress import progress_bar

from hybrid_tracking import (PARAMETERS, REPORTED, Setup, least_squares, make_physics, sample_truth,
                             sigma_per_layer, straight_line_start)


class LayerDistortion(torch.nn.Module):
    """The true (unknown to the fit) distortion: per-layer elliptical deformation and tilt [mm].

    Layers ``first_distorted`` and above are distorted. As a :class:`Component`
    correction ``(x, hits) -> shift`` it gives the oracle fit.
    """

    def __init__(self, radii, first_distorted: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        n = len(radii)
        signs = torch.tensor([(-1.0) ** k if k >= first_distorted else 0.0 for k in range(n)], dtype=torch.float64)
        self.register_buffer("radii", torch.tensor(radii, dtype=torch.float64))
        self.register_buffer("rphi_amplitude", signs * (0.1 + 0.2 * torch.rand(n, generator=generator,
                                                                                 dtype=torch.float64)))
        self.register_buffer("rphi_phase", 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64))
        self.register_buffer("z_amplitude", -signs * (0.3 + 0.7 * torch.rand(n, generator=generator,
                                                                             dtype=torch.float64)))
        self.register_buffer("z_phase", 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64))

    def forward(self, x, hits: torch.Tensor) -> torch.Tensor:
        phi = hits[..., 0] / self.radii.to(hits.dtype)
        rphi = self.rphi_amplitude * torch.sin(2 * phi + self.rphi_phase)
        z = self.z_amplitude * torch.cos(phi + self.z_phase)
        return torch.stack([rphi, z], dim=-1).to(hits.dtype)


#: Relative resolution of the independent momentum measurement of the training tracks.
QOP_RESOLUTION = 0.02


def simulate(setup: Setup, distortion: LayerDistortion, n: int, seed: int) -> dict:
    """Truth, true hits, measured hits = true hits + distortion + noise (global frame), measured q/p."""
    generator = torch.Generator().manual_seed(seed)
    truth = sample_truth(setup, n, generator, torch.float64)
    physics = make_physics(setup, scattering="sample")
    with torch.no_grad():
        true_hits = physics(truth, seed=seed)
        shifted = true_hits + distortion(None, true_hits)
    noise = sigma_per_layer(setup, torch.float64) * torch.randn(true_hits.shape, generator=generator,
                                                                dtype=torch.float64)
    qop_measured = truth[:, 4] * (1 + QOP_RESOLUTION * torch.randn(n, generator=generator, dtype=torch.float64))
    return {"truth": truth, "true_hits": true_hits, "measured": shifted + noise, "qop_measured": qop_measured}


def train_correction(setup, model: Component, train: dict, sigma, radii, *, rounds: int, steps: int, advance):
    """Learn the correction network and the training tracks together; returns the median chi2 per round.

    The training tracks' chi^2 has the hit residuals and one more term: an
    independent momentum measurement (``train["qop_measured"]``, e.g. E/p in a
    calorimeter or a muon spectrometer) with ``QOP_RESOLUTION`` relative error.
    Without it a distortion growing like r^2 along r*phi (a "sagitta" weak mode)
    would look exactly like a change of curvature and could not be learned.

    Each round: (1) the Jacobian J of every track's normalised residuals with
    respect to its own parameters (through propagator and correction); (2)
    Adam steps of the network on the residuals projected onto the complement
    of J's columns -- the chi^2 each track would have after re-fitting its
    parameters to first order (variable projection, what global alignment fits
    do), so the network does not fight the track parameters; (3) two
    Gauss-Newton steps of every track with the updated correction.
    """
    measured, qop_measured = train["measured"], train["qop_measured"]
    qop_sigma = QOP_RESOLUTION * qop_measured.abs()

    def residuals(p):
        hits = (local_residuals(model(p), measured, radii) / sigma).flatten(1)
        return torch.cat([hits, ((p[:, 4] - qop_measured) / qop_sigma)[:, None]], dim=1)

    def refit(params, iterations):
        for _ in range(iterations):
            params, _ = gauss_newton_step(residuals, params)
            advance(1)
        return params

    history = []
    model.use("physics")
    params = refit(straight_line_start(measured, radii), 5)
    model.use("residual")
    for round_index in range(rounds):
        r, jac = residual_jacobian(residuals, params)
        history.append(float(r.pow(2).sum(1).median()))
        eye = torch.eye(r.shape[1], dtype=r.dtype)
        complement = eye - jac @ torch.linalg.solve(jac.transpose(1, 2) @ jac, jac.transpose(1, 2))
        with torch.no_grad():
            physics_hits = model.physics(params)
        momentum_pulls = r[:, -1:]

        def loss_of_batch(indices):
            hits = physics_hits[indices]
            predicted = hits + model.correction(None, hits)
            pulls = (local_residuals(predicted, measured[indices], radii) / sigma).flatten(1)
            pulls = torch.cat([pulls, momentum_pulls[indices]], dim=1)
            return (complement[indices] @ pulls[..., None]).pow(2).sum((1, 2)).mean()

        fit(model.correction.parameters(), loss_of_batch, measured.shape[0], steps=steps,
            batch_size=setup.batch_size, lr=3e-3, seed=setup.seed + round_index, advance=advance)
        params = refit(params, 2)
    with torch.no_grad():
        history.append(float(residuals(params).pow(2).sum(1).median()))
    return history


def observable_part(shift: torch.Tensor, physics, params, sigma) -> torch.Tensor:
    """Per-track hit shifts (N, L, 2) / sigma minus what the track's own parameters can absorb.

    Projects the normalised shift onto the orthogonal complement of the columns
    of the track's Jacobian d(hits / sigma)/d(parameters): the part of a
    distortion that tracks can measure at all.
    """
    _, jac = residual_jacobian(lambda p: (physics(p) / sigma).flatten(1), params)
    v = (shift / sigma).flatten(1)[..., None]
    coefficients = torch.linalg.solve(jac.transpose(1, 2) @ jac, jac.transpose(1, 2) @ v)
    return (v - jac @ coefficients)[..., 0]


def fit_summary(name, params, model, test, sigma, radii) -> dict:
    with torch.no_grad():
        chi2 = (local_residuals(model(params), test["measured"], radii) / sigma).pow(2).sum((1, 2))
    n_dof = 2 * len(radii) - 5
    row = {"fit": name, "chi2/ndf (median)": float(chi2.median()) / n_dof}
    for k, parameter in enumerate(PARAMETERS):
        diff = params[:, k] - test["truth"][:, k]
        if parameter == "phi":
            diff = wrap_angle(diff)
        if parameter == "qop":
            diff = diff / test["truth"][:, k]
        label, factor = REPORTED[parameter]
        low, mid, high = torch.quantile(diff, torch.tensor([0.15865, 0.5, 0.84135], dtype=diff.dtype))
        row[f"{label} sigma68"] = float(0.5 * (high - low)) * factor
        row[f"{label} bias"] = float(mid) * factor
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tracks and rounds (about a minute)")
    parser.add_argument("-o", "--output", default="out")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Dr.Jit CPU threads")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.set_num_threads(1)
    setup = Setup(seed=args.seed)
    n_train, n_test, rounds, steps = (1500, 500, 4, 300) if args.quick else (5000, 2000, 8, 600)
    start_time = time.perf_counter()
    sigma = sigma_per_layer(setup, torch.float64)
    radii = torch.tensor(setup.radii, dtype=torch.float64)
    distortion = LayerDistortion(setup.radii, first_distorted=setup.pixel_layers, seed=args.seed)
    train = simulate(setup, distortion, n_train, seed=args.seed + 1)
    test = simulate(setup, distortion, n_test, seed=args.seed + 2)
    physics = make_physics(setup, scattering="none")
    strips = range(setup.pixel_layers, len(setup.radii))
    model = Component(physics=physics, correction=HitCorrection(setup.radii, layers=strips).double())
    oracle = Component(physics=physics, correction=distortion)

    total = 5 + rounds * (steps + 2) + 3 * 6
    with progress_bar(total, "learning the distortion") as advance:
        history = train_correction(setup, model, train, sigma, radii, rounds=rounds, steps=steps, advance=advance)
        nominal = least_squares(model.use("physics"), test["measured"], sigma, radii, 6, advance)
        learned = least_squares(model.use("residual"), test["measured"], sigma, radii, 6, advance)
        best = least_squares(oracle, test["measured"], sigma, radii, 6, advance)

    rows = [fit_summary("nominal geometry", nominal, model.use("physics"), test, sigma, radii),
            fit_summary("learned correction", learned, model.use("residual"), test, sigma, radii),
            fit_summary("true distortion (oracle)", best, oracle, test, sigma, radii)]
    with torch.no_grad():
        true_shift = distortion(None, test["true_hits"])
        learned_shift = model.correction(None, test["true_hits"])
    true_observable = observable_part(true_shift, physics, best, sigma)
    error_observable = observable_part(learned_shift - true_shift, physics, best, sigma)
    recovery = {
        "rms true distortion r*phi [um]": float(true_shift[..., 0].pow(2).mean().sqrt()) * 1e3,
        "rms true distortion z [um]": float(true_shift[..., 1].pow(2).mean().sqrt()) * 1e3,
        "rms (learned - true) r*phi [um]": float((learned_shift - true_shift)[..., 0].pow(2).mean().sqrt()) * 1e3,
        "rms (learned - true) z [um]": float((learned_shift - true_shift)[..., 1].pow(2).mean().sqrt()) * 1e3,
        "observable distortion per track [sigma]": float(true_observable.norm(dim=1).pow(2).mean().sqrt()),
        "observable error per track [sigma]": float(error_observable.norm(dim=1).pow(2).mean().sqrt()),
    }
    recovery["fraction of the observable distortion recovered"] = 1 - (
        recovery["observable error per track [sigma]"] / recovery["observable distortion per track [sigma]"])
    report(rows, recovery, history)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "learned_correction.png")
    plot(distortion, model.correction, setup, history, path)
    print(f"wrote {path} ({time.perf_counter() - start_time:.0f} s)")
    return {"rows": rows, "recovery": recovery, "history": history}


def report(rows, recovery, history) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title="Track fits on held-out tracks of the distorted detector")
    for key in rows[0]:
        header = key.replace(" sigma68", "\nsigma68").replace(" bias", "\nbias")
        table.add_column(escape(header), justify="right")
    for row in rows:
        table.add_row(*(value if isinstance(value, str) else f"{value:.3g}" for value in row.values()))
    console.print(table)
    for key, value in recovery.items():
        console.print(escape(f"{key}: {value:.3g}"))
    console.print("median chi2 of the training fits per round: " + " -> ".join(f"{h:.3g}" for h in history))


def plot(distortion, correction, setup: Setup, history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phi = torch.linspace(-math.pi, math.pi, 200, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for layer in (4, 6, 9):
        radius = setup.radii[layer]
        hits = torch.zeros(phi.numel(), len(setup.radii), 2, dtype=torch.float64)
        hits[..., 0] = phi[:, None] * torch.tensor(setup.radii, dtype=torch.float64)
        with torch.no_grad():
            true = distortion(None, hits)[:, layer] * 1e3
            learned = correction(None, hits)[:, layer] * 1e3
        for ax, coordinate in zip(axes[:2], (0, 1)):
            line, = ax.plot(phi, true[:, coordinate], "-", label=f"true, r = {radius:.0f} mm")
            ax.plot(phi, learned[:, coordinate], "--", color=line.get_color(), label="learned")
    for ax, name in zip(axes[:2], ("r*phi", "z")):
        ax.set_xlabel("phi [rad] (at z = 0)")
        ax.set_ylabel(f"{name} shift [um]")
        ax.legend(fontsize=7)
    axes[2].plot(range(len(history)), history, "o-")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("median chi2 of the training-track fits")
    fig.suptitle("Detector distortion learned by a network inside the propagation pipeline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
