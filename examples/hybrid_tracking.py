#!/usr/bin/env python
"""Example A: a network + the differentiable propagator, trained on hit residuals only.

Task: estimate the perigee parameters (d0, z0, phi, theta, q/p) of muons from
their noisy hits on the 10 barrel layers of an ACTS-like silicon tracker in a
2 T solenoid. Compared, for several training-set sizes N:

* ``hybrid``          network (hits -> parameters) followed by the Propagator
                      (parameters -> predicted hits); trained on the chi^2 of the
                      hit residuals only -- no truth labels -- with Gauss-Newton
                      preconditioning (:func:`pyhybrid.nn.hybrid.fit_through_physics`).
* ``hybrid+refine``   the same trained model, plus two Gauss-Newton steps through
                      the propagator at inference time (physics also at test time).
* ``surrogate``       the same training, with the propagator swapped for a network
                      surrogate fitted to it on simulated tracks (``Component`` in
                      ``surrogate`` mode): how much exact physics is worth
                      (full scan only; ``--quick`` skips it).
* ``supervised``      pure network trained on the truth parameters (labels a real
                      detector does not have).
* ``direct``          pure network predicting the hits directly (5-number bottleneck,
                      no physics), trained on the same hit residuals; its bottleneck
                      is not identifiable as track parameters, so only its hit
                      resolution is reported.
* ``least-squares``   no network: a per-track Gauss-Newton fit through the propagator
                      from a straight-line seed (the reference resolution).

The data are simulated with the same propagator, with multiple scattering sampled
in 0.3 mm of silicon per layer (the models propagate without it, as a simple
track fit would) and Gaussian measurement noise. All numbers are measured on
held-out tracks: sigma68 = half-width of the central 68 % interval of
(estimate - truth). Everything is seeded.

Run:  .venv/bin/python examples/hybrid_tracking.py --quick -o out/   (< 2 min on 2 CPU cores)
      .venv/bin/python examples/hybrid_tracking.py -o out/           (the full scan, ~10 min)
Writes out/hybrid_tracking.png, out/hybrid_tracking.h5 (pyhybrid.io layout) and
prints the comparison table.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from pyhybrid.engine import set_threads
from pyhybrid.io import EventWriter
from pyhybrid.nn.hybrid import (PERIGEE_NAMES, Component, PerigeeHits, Surrogate, TrackEncoder, canonical_frame, fit,
                                fit_surrogate, fit_through_physics, gauss_newton_step, local_residuals, rotate_hits,
                                rotate_perigee, wrap_angle)
from pyhybrid.nn.propagator import RK4, Propagator, SolenoidField, barrel
from pyhybrid.progress import progress_bar

PARAMETERS = PERIGEE_NAMES
#: How each parameter's sigma68 is reported: (label, factor from the internal unit).
REPORTED = {"d0": ("d0 [um]", 1e3), "z0": ("z0 [um]", 1e3), "phi": ("phi [mrad]", 1e3),
            "theta": ("theta [mrad]", 1e3), "qop": ("q/p [%]", 100.0)}


@dataclass(frozen=True)
class Setup:
    """Detector, data and training settings (lengths in mm, momenta in GeV, field in T)."""

    radii: tuple = (32.0, 72.0, 116.0, 172.0, 260.0, 360.0, 500.0, 660.0, 820.0, 1020.0)
    half_length: float = 3000.0
    pixel_layers: int = 4
    sigma_pixel: tuple = (0.015, 0.050)   # (r*phi, z) resolution of pixel layers
    sigma_strip: tuple = (0.050, 0.500)   # (r*phi, z) resolution of strip layers (stereo z)
    thickness: float = 0.3               # silicon per layer; multiple scattering sampled in the data
    b_field: float = 2.0
    step_size: float = 50.0              # RK4 step [mm]
    pt_range: tuple = (1.0, 10.0)
    eta_max: float = 1.0
    d0_sigma: float = 0.1
    z0_sigma: float = 50.0
    sizes: tuple = (100, 300, 1000, 3000, 10000)
    n_test: int = 2000
    n_simulated: int = 20000             # tracks to fit the surrogate on
    rounds: int = 5                      # Gauss-Newton rounds of the hybrid training
    steps_per_round: int = 400
    network_steps: int = 2000            # Adam steps of the supervised and direct networks
    surrogate_steps: int = 4000
    with_surrogate: bool = True          # the surrogate method (skipped in --quick to stay within 2 minutes)
    batch_size: int = 256
    hidden: tuple = (128, 128)
    seed: int = 7


QUICK = dict(sizes=(200, 800, 2400), n_test=1000, rounds=4, steps_per_round=100, network_steps=400,
             with_surrogate=False)


def sigma_per_layer(setup: Setup, dtype) -> torch.Tensor:
    rows = [setup.sigma_pixel] * setup.pixel_layers + [setup.sigma_strip] * (len(setup.radii) - setup.pixel_layers)
    return torch.tensor(rows, dtype=dtype)


def make_physics(setup: Setup, scattering: str) -> PerigeeHits:
    layers = barrel(setup.radii, half_length=setup.half_length, thickness=setup.thickness)
    return PerigeeHits(Propagator(SolenoidField(setup.b_field), layers, stepper=RK4(step_size=setup.step_size),
                                  energy_loss=True, scattering=scattering))


def sample_truth(setup: Setup, n: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """Perigee parameters (n, 5) of muons: pT, eta uniform; phi uniform; d0, z0 Gaussian."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=dtype)

    pt = uniform(*setup.pt_range)
    theta = 2 * torch.atan(torch.exp(-uniform(-setup.eta_max, setup.eta_max)))
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    d0 = setup.d0_sigma * torch.randn(n, generator=generator, dtype=dtype)
    z0 = setup.z0_sigma * torch.randn(n, generator=generator, dtype=dtype)
    return torch.stack([d0, z0, uniform(-math.pi, math.pi), theta, charge * torch.sin(theta) / pt], dim=1)


def simulate(setup: Setup, n: int, seed: int, dtype=torch.float64) -> dict:
    """Truth parameters, true hits (with sampled scattering) and measured hits, in the canonical frame."""
    generator = torch.Generator().manual_seed(seed)
    truth = sample_truth(setup, n, generator, dtype)
    physics = make_physics(setup, scattering="sample")
    with torch.no_grad():
        true_hits = physics(truth, seed=seed)
    if not bool(physics.valid.all()):
        raise RuntimeError("a simulated track missed a layer; check the acceptance settings")
    noise = sigma_per_layer(setup, dtype) * torch.randn(true_hits.shape, generator=generator, dtype=dtype)
    radii = torch.tensor(setup.radii, dtype=dtype)
    measured, phi_ref = canonical_frame(true_hits + noise, radii)
    return {"truth": rotate_perigee(truth, -phi_ref), "measured": measured,
            "true_hits": rotate_hits(true_hits, -phi_ref, radii)}


# ---------------------------------------------------------------- the methods


def residuals_against(physics, measured: torch.Tensor, sigma: torch.Tensor, radii: torch.Tensor):
    """``residuals_of(params, idx)``: normalised hit residuals (N_idx, 2L) of samples idx under ``physics``."""
    def residuals_of(params, indices):
        return (local_residuals(physics(params), measured[indices], radii) / sigma).flatten(1)

    return residuals_of


def new_encoder(setup: Setup, train_hits: torch.Tensor, seed: int, reduce=None) -> TrackEncoder:
    """The encoder all methods share, whitened on ``train_hits`` (``reduce``: sum over processes)."""
    torch.manual_seed(seed)
    encoder = TrackEncoder(len(setup.radii), setup.hidden, d0_scale=setup.d0_sigma, z0_scale=setup.z0_sigma,
                           phi_scale=0.01, cot_scale=1.0, qpt_max=2.0 / setup.pt_range[0])
    return encoder.to(train_hits.dtype).calibrate(train_hits, reduce=reduce)


def train_through(hits_of, setup: Setup, train: dict, sigma, seed: int, advance) -> tuple[TrackEncoder, list]:
    """hybrid / surrogate: encoder -> ``hits_of`` (physics or surrogate), chi^2 of the hit residuals only."""
    encoder = new_encoder(setup, train["measured"], seed)
    residuals_of = residuals_against(hits_of, train["measured"], sigma, torch.tensor(setup.radii))
    history = fit_through_physics(encoder, residuals_of, train["measured"],
                                  rounds=setup.rounds, steps_per_round=setup.steps_per_round,
                                  batch_size=setup.batch_size, seed=seed, advance=advance)
    return encoder, history


def train_supervised(setup: Setup, train: dict, seed: int, advance) -> TrackEncoder:
    """Pure network on the truth parameters (closed-form linear part + Adam on the MLP)."""
    encoder = new_encoder(setup, train["measured"], seed)
    encoder.fit_targets(train["measured"], train["truth"], steps=setup.network_steps, batch_size=setup.batch_size,
                        seed=seed, advance=advance)
    return encoder


def train_direct(setup: Setup, train: dict, sigma, seed: int, advance) -> torch.nn.Module:
    """Pure network predicting hits: encoder -> 5 numbers -> decoder network, chi^2 of the hit residuals."""
    encoder = new_encoder(setup, train["measured"], seed)
    decoder = Surrogate((5,), (len(setup.radii), 2), setup.hidden).to(train["measured"].dtype)
    with torch.no_grad():
        decoder.calibrate(encoder(train["measured"]), train["measured"])
    model = torch.nn.Sequential(encoder, decoder)
    n_measurements = 2 * len(setup.radii)

    def loss_of_batch(indices):
        pulls = (model(train["measured"][indices]) - train["measured"][indices]) / sigma
        return pulls.pow(2).sum((1, 2)).mean() / n_measurements

    fit(model.parameters(), loss_of_batch, train["measured"].shape[0], steps=setup.network_steps,
        batch_size=setup.batch_size, seed=seed, advance=advance)
    return model


def straight_line_start(measured: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Start of a track fit: a track through the origin towards the innermost hit, theta = pi/2, q/p ~ 0."""
    start = torch.zeros(measured.shape[0], 5, dtype=measured.dtype)
    start[:, 2] = measured[:, 0, 0] / radii[0]
    start[:, 3] = 0.5 * math.pi
    start[:, 4] = 1e-3  # q/p = 0 exactly is a neutral track, whose q/p derivative vanishes
    return start


def least_squares(physics, measured, sigma, radii, iterations: int, advance=None, start: torch.Tensor | None = None):
    """Per-track Gauss-Newton fit through ``physics``; from :func:`straight_line_start` unless ``start``."""
    if start is None:
        start = straight_line_start(measured, radii)
    residuals_of = residuals_against(physics, measured, sigma, radii)
    everything = torch.arange(measured.shape[0])
    params = start
    for _ in range(iterations):
        params, _ = gauss_newton_step(lambda p: residuals_of(p, everything), params)
        if advance is not None:
            advance(1)
    return params


# ---------------------------------------------------------------- metrics


def sigma68(values: torch.Tensor) -> float:
    """Half-width of the central 68.27 % interval (robust resolution; = sigma for a Gaussian)."""
    low, high = torch.quantile(values.flatten(), torch.tensor([0.15865, 0.84135], dtype=values.dtype))
    return float(0.5 * (high - low))


def parameter_resolution(estimate: torch.Tensor, truth: torch.Tensor) -> dict:
    """sigma68 of estimate - truth per parameter (q/p relative), in the reported units."""
    out = {}
    for k, name in enumerate(PARAMETERS):
        diff = estimate[:, k] - truth[:, k]
        if name == "phi":
            diff = wrap_angle(diff)
        if name == "qop":
            diff = diff / truth[:, k]
        out[name] = sigma68(diff) * REPORTED[name][1]
    return out


def hit_resolution(hits: torch.Tensor, true_hits: torch.Tensor) -> dict:
    """sigma68 [um] of predicted - true hit positions over all layers, r*phi and z."""
    diff = hits - true_hits
    return {"hit_rphi": sigma68(diff[..., 0]) * 1e3, "hit_z": sigma68(diff[..., 1]) * 1e3}


# ---------------------------------------------------------------- the study


def run_study(setup: Setup) -> dict:
    """Train and evaluate every method at every training-set size; returns rows, predictions and histories."""
    dtype = torch.float64
    sigma = sigma_per_layer(setup, dtype)
    radii = torch.tensor(setup.radii, dtype=dtype)
    largest = max(setup.sizes)
    train_all = simulate(setup, largest, seed=setup.seed)
    test = simulate(setup, setup.n_test, seed=setup.seed + 1)
    physics = make_physics(setup, scattering="none")
    surrogate = Surrogate((5,), (len(setup.radii), 2), setup.hidden).to(dtype)
    hits_of = Component(physics=physics, surrogate=surrogate)   # one slot, switched between the two below

    per_method = setup.rounds * (2 + setup.steps_per_round)
    per_size = per_method * (2 if setup.with_surrogate else 1) + 2 * setup.network_steps + 2
    total = (setup.surrogate_steps if setup.with_surrogate else 0) + 6 + per_size * len(setup.sizes)
    rows, predictions, histories = [], {}, {}

    def row(method, size, seconds, labels, params=None, hits=None):
        entry = {"method": method, "n_train": size, "train_seconds": round(seconds, 1), "truth_labels": labels}
        if params is not None:
            entry.update(parameter_resolution(params, test["truth"]))
            with torch.no_grad():
                hits = physics(params)
        entry.update(hit_resolution(hits, test["true_hits"]))
        rows.append(entry)
        key = method.replace("+", "_").replace("-", "_") + (f"_n{size}" if size else "")
        predictions[key] = params if params is not None else hits

    with progress_bar(total, "hybrid tracking study") as advance:
        start = time.perf_counter()
        fitted = least_squares(physics, test["measured"], sigma, radii, 6, advance)
        row("least-squares", 0, time.perf_counter() - start, False, params=fitted)

        fidelity = None
        if setup.with_surrogate:
            start = time.perf_counter()
            simulated = simulate(setup, setup.n_simulated, seed=setup.seed + 2)["truth"]
            fit_surrogate(surrogate, physics, simulated, steps=setup.surrogate_steps, batch_size=setup.batch_size,
                          seed=setup.seed, advance=advance)
            surrogate_seconds = time.perf_counter() - start
            with torch.no_grad():
                fidelity = hit_resolution(surrogate(test["truth"]), physics(test["truth"]))
        for size in setup.sizes:
            train = {key: value[:size] for key, value in train_all.items()}
            seed = setup.seed + size

            start = time.perf_counter()
            encoder, histories[f"hybrid_n{size}"] = train_through(hits_of.use("physics"), setup, train, sigma, seed,
                                                                  advance)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                estimate = encoder(test["measured"])
            row("hybrid", size, seconds, False, params=estimate)
            start = time.perf_counter()
            refined = least_squares(physics, test["measured"], sigma, radii, 2, advance, start=estimate)
            row("hybrid+refine", size, seconds + time.perf_counter() - start, False, params=refined)

            if setup.with_surrogate:
                start = time.perf_counter()
                encoder, histories[f"surrogate_n{size}"] = train_through(hits_of.use("surrogate"), setup, train,
                                                                         sigma, seed, advance)
                with torch.no_grad():
                    estimate = encoder(test["measured"])
                row("surrogate", size, time.perf_counter() - start + surrogate_seconds, False, params=estimate)

            start = time.perf_counter()
            encoder = train_supervised(setup, train, seed, advance)
            with torch.no_grad():
                estimate = encoder(test["measured"])
            row("supervised", size, time.perf_counter() - start, True, params=estimate)

            start = time.perf_counter()
            model = train_direct(setup, train, sigma, seed, advance)
            with torch.no_grad():
                hits = model(test["measured"])
            row("direct", size, time.perf_counter() - start, False, hits=hits)
    return {"rows": rows, "predictions": predictions, "histories": histories, "test": test,
            "surrogate_fidelity": fidelity}


# ---------------------------------------------------------------- output


COLUMNS = [(name, label) for name, (label, _) in REPORTED.items()] + [("hit_rphi", "hit r*phi [um]"),
                                                                      ("hit_z", "hit z [um]")]


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Track-parameter resolution on held-out tracks (sigma68; lower is better)")
    for header in ["method", "N train", "labels"] + [label for _, label in COLUMNS] + ["train s"]:
        table.add_column(escape(header), justify="right")
    for r in result["rows"]:
        cells = [f"{r[name]:.3g}" if name in r else "-" for name, _ in COLUMNS]
        table.add_row(r["method"], str(r["n_train"] or "-"), "truth" if r["truth_labels"] else "hits only", *cells,
                      f"{r['train_seconds']:.1f}")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    fidelity = result["surrogate_fidelity"]
    if fidelity is not None:
        console.print(f"surrogate vs propagator on test tracks: sigma68 r*phi {fidelity['hit_rphi']:.3g} um, "
                      f"z {fidelity['hit_z']:.3g} um")
    for key, history in result["histories"].items():
        if key.startswith("hybrid"):
            console.print(f"{key}: median chi2 (20 measurements) of the network's predictions per round: "
                          + " -> ".join(f"{h:.3g}" for h in history))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 4, figsize=(15, 7))
    styles = {"hybrid": "o-", "hybrid+refine": "s-", "surrogate": "v--", "supervised": "^-", "direct": "x:"}
    for ax, (name, label) in zip(axes.flat, COLUMNS):
        for method, style in styles.items():
            points = [(r["n_train"], r[name]) for r in result["rows"] if r["method"] == method and name in r]
            if points:
                ax.plot(*zip(*points), style, label=method)
        reference = [r[name] for r in result["rows"] if r["method"] == "least-squares"]
        ax.axhline(reference[0], color="k", ls="--", lw=1, label="least-squares fit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({r["n_train"] for r in result["rows"] if r["n_train"]})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("training tracks")
        ax.set_ylabel("sigma68 " + label)
    axes.flat[0].legend(fontsize=8)
    axes.flat[len(REPORTED)].legend(fontsize=8)
    ax = axes.flat[len(COLUMNS)]
    for key, history in result["histories"].items():
        ax.plot(range(len(history)), history, "o-", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("Gauss-Newton round")
    ax.set_ylabel("median chi2 of the network's predictions")
    ax.legend(fontsize=6)
    fig.suptitle("Hybrid (network + differentiable propagator) vs pure networks, 10-layer barrel, 2 T")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_events(result: dict, setup: Setup, path: str) -> None:
    """One event per test track: truth, hits, and every method's estimate (pyhybrid.io layout)."""
    test = result["test"]
    arrays = {"truth": test["truth"], "measured_hits": test["measured"], "true_hits": test["true_hits"],
              **result["predictions"]}
    arrays = {name: value.detach().numpy() for name, value in arrays.items()}
    fixed = {name: (value.shape[1:], "f8") for name, value in arrays.items()}
    metadata = {"parameters": asdict(setup), "seed": setup.seed, "kernel": "examples/hybrid_tracking.py",
                "frame": "canonical: each track rotated about z so that its innermost measured hit is at phi = 0",
                "parameter_order": list(PARAMETERS), "results": result["rows"], "histories": result["histories"],
                "surrogate_fidelity_um": result["surrogate_fidelity"]}
    with EventWriter(path, fixed=fixed, metadata=metadata, overwrite=True) as writer:  # a re-run replaces its file
        writer.append(setup.n_test, arrays)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short version (< 2 min on 2 CPU cores)")
    parser.add_argument("-o", "--output", default="out", help="output folder for the PNG and the HDF5 file")
    parser.add_argument("--seed", type=int, default=Setup.seed)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Dr.Jit CPU threads")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.set_num_threads(1)  # the networks are small: one torch thread is fastest and leaves the cores to Dr.Jit
    setup = Setup(seed=args.seed, **(QUICK if args.quick else {}))
    os.makedirs(args.output, exist_ok=True)
    start = time.perf_counter()
    result = run_study(setup)
    print_table(result)
    png = os.path.join(args.output, "hybrid_tracking.png")
    h5 = os.path.join(args.output, "hybrid_tracking.h5")
    plot(result, png)
    write_events(result, setup, h5)
    print(f"wrote {png} and {h5} ({time.perf_counter() - start:.0f} s)")
    return result


if __name__ == "__main__":
    main()
