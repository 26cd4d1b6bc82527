"""Detector design end to end: a sampling calorimeter optimised together with its reconstruction.

A lead/scintillator calorimeter (30 layers, 6 readout segments, 3 x 3 cells of 60 mm, 10 MeV of
visible-energy noise per cell) measures electrons of 2-100 GeV (log-uniform). Its absorber and
active plate thicknesses are optimised jointly with an energy-regression network:

    J = < ((E_reco - E) / E)^2 >  +  1.5e-5 * 30 * (1 * d_absorber + 2 * d_active)   [mm]

(resolution^2 plus a material cost, scintillator twice the price of lead per mm), with pathwise
gradients through the differentiable GFLASH shower simulation. The optimum is then checked with a
grid scan of the same objective (network retrained at every grid point, common random numbers):
the two must agree within the scan's step. Writes a PNG with the design parameters and the
resolution against iteration, the scanned objective with the optimisation path, and sigma/E(E) of
the start and optimised designs.

    .venv/bin/python examples/detector_design.py --quick      # ~ 2 minutes on 2 CPU cores, 5 x 5 grid
    .venv/bin/python examples/detector_design.py              # ~ 8 minutes: 600 steps, 9 x 9 grid
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyhybrid.nn.calorimeter import SamplingCalorimeter  # noqa: E402
from pyhybrid.nn.detector_design import (CalorimeterDesign, evaluate, fit_regression,  # noqa: E402
                                         fit_resolution_terms, grid_scan, train_jointly)

START = {"absorber_thickness": 1.5, "active_thickness": 7.0}
BOUNDS = {"absorber_thickness": (0.5, 6.0), "active_thickness": (0.5, 8.0)}
LABELS = {"absorber_thickness": "lead thickness [mm]", "active_thickness": "scintillator thickness [mm]"}


def make_design() -> CalorimeterDesign:
    calo = SamplingCalorimeter("lead", "scintillator", **START, n_layers=30, layers_per_segment=5, n_cells=3,
                               cell_size=60.0, noise=0.01, quadrature_points=4)
    return CalorimeterDesign(calo, cost_weight=1.5e-5, absorber_price=1.0, active_price=2.0, bounds=BOUNDS)


def set_design(design: CalorimeterDesign, values: dict[str, float]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            design.calorimeter.get_parameter(name).fill_(value)


def resolution_curve(design: CalorimeterDesign, n: int, seed: int):
    """(energies, sigma/E per log bin, fitted terms) of the current design and network."""
    energy = design.sample_energies(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = design.regression(design.calorimeter(energy, seed=seed), design.calorimeter.visible_fraction())
    terms = fit_resolution_terms(energy, predicted)
    edges = np.geomspace(*design.energy_range, 9)
    centres, sigma = [], []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (energy >= low) & (energy < high)
        residual = ((predicted[inside] - energy[inside]) / energy[inside]).double()
        centres.append(float(energy[inside].mean()))
        sigma.append(float(residual.std()))
    return np.array(centres), np.array(sigma), terms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a coarser grid (a few minutes)")
    parser.add_argument("-o", "--output", default="out", help="output folder (detector_design.png)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    png = os.path.join(args.output, "detector_design.png")

    if args.quick:
        steps, train_steps, train_showers, validation = 250, 200, 4096, 8192
        grid = {"absorber_thickness": [1.5, 2.0, 2.5, 3.0, 3.5], "active_thickness": [2.0, 3.0, 4.0, 5.0, 6.0]}
    else:
        steps, train_steps, train_showers, validation = 600, 300, 8192, 32768
        grid = {"absorber_thickness": list(np.arange(1.5, 3.51, 0.25)),
                "active_thickness": list(np.arange(2.0, 6.01, 0.5))}
    # The network is small: one torch thread, so that idle OpenMP workers do not compete with Dr.Jit's pool.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    design = make_design()
    t0 = time.time()

    fit_regression(design, train_steps, batch=train_showers, seed=args.seed + 1)
    start_curve = resolution_curve(design, validation, seed=args.seed + 7)

    def progress(step, history):
        if step % 50 == 0 or step == steps - 1:
            values = ", ".join(f"{k} {v:.3f}" for k, v in history.design[-1].items())
            print(f"step {step:4d}  {values}  resolution {history.resolution[-1]:.4f}  "
                  f"loss {history.loss[-1]:.5f}  ({time.time() - t0:.0f} s)", flush=True)

    history = train_jointly(design, steps, batch=1024, pretrain_steps=0, seed=args.seed, callback=progress)
    optimum = history.averaged_design()
    set_design(design, optimum)
    fit_regression(design, train_steps, batch=train_showers, seed=args.seed + 1)
    at_optimum = evaluate(design, validation, seed=args.seed + 2)
    end_curve = resolution_curve(design, validation, seed=args.seed + 7)
    print("optimised design (mean of the last 30 % of steps): "
          + ", ".join(f"{k} = {v:.3f} mm" for k, v in optimum.items())
          + f";  J = {at_optimum['loss']:.5f}, resolution {at_optimum['resolution']:.4f}")

    print(f"grid scan of J: {' x '.join(str(len(v)) for v in grid.values())} points ...", flush=True)
    scan = grid_scan(design, grid, train_steps=train_steps, train_showers=train_showers,
                     validation_showers=validation, seed=args.seed + 1)
    steps_of_grid = {name: float(np.diff(values).min()) for name, values in zip(scan["names"], scan["values"])}
    agree = all(abs(optimum[name] - scan["best"][name]) <= steps_of_grid[name] + 1e-9 for name in scan["names"])
    print("grid minimum: " + ", ".join(f"{k} = {v:.3f} mm" for k, v in scan["best"].items())
          + f";  J = {scan['loss'].min():.5f}")
    print("optimum vs grid: " + ", ".join(
        f"|d {k}| = {abs(optimum[k] - scan['best'][k]):.3f} (step {steps_of_grid[k]:.3f})" for k in scan["names"])
        + ("  -> AGREE within the scan step" if agree else "  -> DISAGREE"))
    # The three terms are a least-squares fit to the resolution curve: where leakage dominates (a thin
    # start design), the fit can put everything into the noise and constant terms (stochastic 0).
    print("resolution fitted as a/sqrt(E) (+) b/E (+) c:")
    for label, (_, _, terms) in (("start", start_curve), ("optimum", end_curve)):
        print(f"  sigma/E at {label}: {100 * terms['stochastic']:.1f} %/sqrt(E) (+) {1000 * terms['noise']:.0f} MeV/E "
              f"(+) {100 * terms['constant']:.2f} %")

    plot(history, scan, optimum, start_curve, end_curve, png)
    print(f"wrote {png}  ({time.time() - t0:.0f} s)")
    return 0 if agree else 1


def plot(history, scan, optimum, start_curve, end_curve, path):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    steps = np.array(history.steps)
    ax = axes[0, 0]
    for name in scan["names"]:
        line, = ax.plot(steps, [d[name] for d in history.design], label=LABELS[name])
        ax.axhline(scan["best"][name], color=line.get_color(), ls="--", lw=1,
                   label=f"grid-scan minimum ({LABELS[name].split()[0]})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("thickness [mm]")
    ax.set_title("design parameters")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    resolution = np.array(history.resolution)
    window = 20
    smooth = np.convolve(resolution, np.ones(window) / window, mode="valid")
    ax.plot(steps, 100 * resolution, color="0.75", lw=0.8, label="per batch (1024 showers)")
    ax.plot(steps[window - 1:], 100 * smooth, color="C3", label=f"running mean ({window})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("RMS relative energy error [%]")
    ax.set_title("resolution (2-100 GeV, log-uniform)")
    cost_axis = ax.twinx()
    cost_axis.plot(steps, history.cost, color="C2", lw=1)
    cost_axis.set_ylabel("material cost [a.u.]", color="C2")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    x_name, y_name = scan["names"]
    xs, ys = np.array(scan["values"][0]), np.array(scan["values"][1])
    mesh = ax.pcolormesh(xs, ys, scan["loss"].T, shading="nearest", cmap="viridis",
                         norm=matplotlib.colors.LogNorm())
    fig.colorbar(mesh, ax=ax, label="J = resolution$^2$ + cost term")
    ax.plot([d[x_name] for d in history.design], [d[y_name] for d in history.design], color="tab:orange", lw=1.2,
            label="joint optimisation")
    ax.plot(scan["best"][x_name], scan["best"][y_name], "s", mfc="none", mec="r", ms=14, label="grid minimum")
    ax.plot(optimum[x_name], optimum[y_name], "*", color="r", ms=12, label="optimum (averaged)")
    ax.set_xlabel(LABELS[x_name])
    ax.set_ylabel(LABELS[y_name])
    ax.set_title("grid scan of the same objective")
    ax.legend(fontsize=8, loc="upper right")

    ax = axes[1, 1]
    for label, (centres, sigma, terms), style in (("start", start_curve, "o--"), ("optimum", end_curve, "s-")):
        ax.plot(centres, 100 * sigma, style, label=f"{label}: {100 * terms['stochastic']:.1f}%/$\\sqrt{{E}}$ "
                                                  f"$\\oplus$ {1000 * terms['noise']:.0f} MeV/E "
                                                  f"$\\oplus$ {100 * terms['constant']:.1f}%")
    ax.set_xscale("log")
    ax.set_xticks([2, 5, 10, 20, 50, 100], labels=["2", "5", "10", "20", "50", "100"])
    ax.minorticks_off()
    ax.set_xlabel("E [GeV]")
    ax.set_ylabel(r"$\sigma_E / E$ [%]")
    ax.set_title("energy resolution of the reconstructed energy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
