"""Matrix-element inference: measure (mZ, sin^2 thetaW) from e+e- -> mu+mu- events.

A LEP-style Z line-shape scan: at five centre-of-mass energies, pseudo-data are
unweighted events from pyhybrid's generator (Dr.Jit kernels, VEGAS + hit-or-miss)
at the true parameters, with Poisson-fluctuated event counts for an integrated
luminosity per point. Each pseudo-experiment is fitted back by minimising the
extended unbinned negative log-likelihood of the matrix element,

    -ln L(theta) = sum_k [ lumi sigma_k(theta) - sum_{i in k} ln(lumi d sigma/d cos theta (cos theta_i; theta)) ],

where d sigma / d cos theta and sigma_k (exact Gauss-Legendre integral) come from
the differentiable :class:`pyhybrid.nn.TwoBodyCrossSection` module, with torch's
L-BFGS optimiser. Errors come from the inverse Hessian (finite differences of
the autograd gradient). The pulls (fit - truth) / error over the
pseudo-experiments should have mean 0 and width 1; they are plotted to a PNG.

Run:  .venv/bin/python examples/me_inference.py [--quick] [--experiments N] [-o out/]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.electroweak import SMParameters
from pyhybrid.kernels.hard_process import HardProcess
from pyhybrid.nn.matrix_element import TwoBodyCrossSection

TRUTH = {"mz": 91.1876, "sin2_theta_w": 0.2312}
SCAN = (88.0, 89.5, 91.2, 92.8, 94.5)  # GeV
FIT_PARAMETERS = ("mz", "sin2_theta_w")
SCALES = np.array([0.02, 0.002])  # typical errors [GeV, 1]: the optimiser's units


def cos_theta_of_muon(momenta: np.ndarray) -> np.ndarray:
    """cos theta of the mu- (particle 3) w.r.t. the e- beam (+z)."""
    return momenta[:, 2, 3] / np.linalg.norm(momenta[:, 2, 1:], axis=1)


def generate_pool(sqrt_s: float, n_events: int, seed: int) -> np.ndarray:
    """cos theta of ``n_events`` unweighted e+e- -> mu+mu- events at the true parameters."""
    types = kernel_types("cpu", "float64")
    hard = HardProcess("ee_mumu", sqrt_s, SMParameters(**TRUTH))
    result = hard.cross_section(types, n_points=50_000, adapt_iterations=2, iterations=2, seed=seed)
    events = hard.unweighted_events(types, result, n_events, seed=seed + 1)
    return cos_theta_of_muon(events.momenta)


def negative_log_likelihood(model: TwoBodyCrossSection, values: dict[str, torch.Tensor],
                            data: tuple[torch.Tensor, torch.Tensor], lumi: float) -> torch.Tensor:
    """Extended unbinned -ln L of all scan points (constants dropped) at parameter ``values``.

    ``data``: (cos theta, sqrt(s)) of all events; the sigma_k use 4-point
    Gauss-Legendre quadrature, exact for this quadratic polynomial in cos theta.
    """

    def dsigma(cos_theta, sqrt_s):
        return torch.func.functional_call(model, values, (cos_theta, sqrt_s))

    nodes, weights = (torch.as_tensor(a) for a in np.polynomial.legendre.leggauss(4))
    energies = torch.as_tensor(SCAN, dtype=torch.float64)
    sigmas = dsigma(nodes.repeat(len(SCAN)), energies.repeat_interleave(len(nodes))) * weights.repeat(len(SCAN))
    cos_theta, sqrt_s = data
    return lumi * sigmas.sum() - torch.log(lumi * dsigma(cos_theta, sqrt_s)).sum()


def fit(data: tuple[torch.Tensor, torch.Tensor], lumi: float, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood (mZ, sin^2 thetaW) and their errors from the inverse Hessian.

    The optimiser works on shifts in units of SCALES (about one standard error)
    so that both directions are equally well conditioned.
    """
    model = TwoBodyCrossSection("ee_mumu", mz=TRUTH["mz"], sin2_theta_w=TRUTH["sin2_theta_w"])
    origin = torch.as_tensor(start, dtype=torch.float64)
    scales = torch.as_tensor(SCALES, dtype=torch.float64)
    shift = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def nll_at(shift):
        values = origin + scales * shift
        return negative_log_likelihood(model, dict(zip(FIT_PARAMETERS, values)), data, lumi)

    optimizer = torch.optim.LBFGS([shift], lr=1.0, max_iter=200, tolerance_grad=1e-7, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll_at(shift)
        loss.backward()
        return loss

    optimizer.step(closure)
    best = shift.detach().clone()
    covariance = np.linalg.inv(_hessian(nll_at, best)) * np.outer(SCALES, SCALES)
    return (origin + scales * best).numpy(), np.sqrt(np.diag(covariance))


def _hessian(function, at: torch.Tensor, step: float = 1e-3) -> np.ndarray:
    """Hessian of ``function`` at ``at``: central differences of its autograd gradient."""

    def gradient(x):
        x = x.clone().requires_grad_()
        function(x).backward()
        return x.grad.numpy()

    columns = []
    for j in range(len(at)):
        delta = torch.zeros_like(at)
        delta[j] = step
        columns.append((gradient(at + delta) - gradient(at - delta)) / (2 * step))
    hessian = np.stack(columns, axis=1)
    return 0.5 * (hessian + hessian.T)


def plot(pulls: np.ndarray, fits: np.ndarray, errors: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = (r"$m_Z$", r"$\sin^2\theta_W$")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    grid = np.linspace(-4, 4, 200)
    for k, ax in enumerate(axes[:2]):
        ax.hist(pulls[:, k], bins=np.linspace(-4, 4, 17), density=True, alpha=0.6, label="pseudo-experiments")
        ax.plot(grid, np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), "k--", label="N(0, 1)")
        ax.set_xlabel(f"pull of {labels[k]}")
        ax.set_title(f"mean {pulls[:, k].mean():+.2f}, width {pulls[:, k].std(ddof=1):.2f}")
        ax.legend(fontsize=8)
    axes[2].errorbar(fits[:, 0], fits[:, 1], xerr=errors[:, 0], yerr=errors[:, 1], fmt=".", alpha=0.5)
    axes[2].plot(TRUTH["mz"], TRUTH["sin2_theta_w"], "r*", markersize=14, label="truth")
    axes[2].set_xlabel(r"fitted $m_Z$ [GeV]")
    axes[2].set_ylabel(r"fitted $\sin^2\theta_W$")
    axes[2].legend(fontsize=8)
    fig.suptitle(r"$e^+e^-\to\mu^+\mu^-$ line-shape scan: matrix-element likelihood fits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pseudo-experiments and events (CI smoke run)")
    parser.add_argument("--experiments", type=int, default=None, help="number of pseudo-experiments")
    parser.add_argument("--lumi", type=float, default=None, help="integrated luminosity per scan point [pb^-1]")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("-o", "--output", default="out", help="output folder (me_inference_pulls.png)")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    png = os.path.join(args.output, "me_inference_pulls.png")
    n_experiments = args.experiments or (20 if args.quick else 100)
    lumi = args.lumi or (1.0 if args.quick else 3.0)
    start_time = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    truth_model = TwoBodyCrossSection("ee_mumu", **TRUTH)
    truth = np.array([TRUTH[name] for name in FIT_PARAMETERS])
    with torch.no_grad():
        expected = [float(truth_model.cross_section(sqrt_s, n_nodes=4)) * lumi for sqrt_s in SCAN]
    pool_size = [int(n_experiments * (mu + 6 * math.sqrt(mu)) + 100) for mu in expected]
    pools = [generate_pool(sqrt_s, size, seed=args.seed * 1000 + 10 * k)
             for k, (sqrt_s, size) in enumerate(zip(SCAN, pool_size))]
    print(f"generated {sum(pool_size)} events at {len(SCAN)} energies "
          f"({', '.join(f'{e:.0f}' for e in expected)} expected per experiment) "
          f"in {time.perf_counter() - start_time:.1f} s")

    fits, errors = [], []
    used = [0] * len(SCAN)
    for experiment in range(n_experiments):
        cos_theta, sqrt_s = [], []
        for k, pool in enumerate(pools):
            n = rng.poisson(expected[k])
            cos_theta.append(pool[used[k]: used[k] + n])
            sqrt_s.append(np.full(n, SCAN[k]))
            used[k] += n
        data = (torch.as_tensor(np.concatenate(cos_theta)), torch.as_tensor(np.concatenate(sqrt_s)))
        # Start away from the truth so that the optimiser has work to do.
        start = truth + rng.normal(0, 5 * SCALES)
        best, error = fit(data, lumi, start)
        fits.append(best)
        errors.append(error)
        if experiment < 3 or experiment == n_experiments - 1:
            print(f"experiment {experiment:3d}: mZ = {best[0]:.4f} +- {error[0]:.4f} GeV, "
                  f"sin2thetaW = {best[1]:.5f} +- {error[1]:.5f}")
    fits, errors = np.array(fits), np.array(errors)
    pulls = (fits - truth) / errors
    for k, name in enumerate(FIT_PARAMETERS):
        print(f"{name:13s}: mean fit {fits[:, k].mean():.5f} (truth {truth[k]}), mean error {errors[:, k].mean():.5f}, "
              f"pull mean {pulls[:, k].mean():+.2f} +- {pulls[:, k].std(ddof=1) / math.sqrt(n_experiments):.2f}, "
              f"pull width {pulls[:, k].std(ddof=1):.2f}")
    plot(pulls, fits, errors, png)
    print(f"wrote {png}; total time {time.perf_counter() - start_time:.1f} s")


if __name__ == "__main__":
    main()
