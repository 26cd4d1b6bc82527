"""Benchmark cases: one training step of the hybrid tracking model vs pure-network and torch-eager versions.

The model is that of ``examples/hybrid_tracking.py``: a :class:`TrackEncoder`
(MLP 128 x 128 plus a linear part) maps the hits of a batch of BATCH tracks on
the ten barrel layers of :mod:`pyhybrid.bench.propagate` (2 T solenoid,
energy loss in 0.3 mm silicon) to perigee parameters; the
physics turns them into predicted hits; the loss is the chi^2 of the hit
residuals; one step = forward, backward and an Adam update. Work unit: tracks.

Cases (``drjit`` call vs ``torch`` call, the ratio reported by the harness is
drjit rate / torch rate):

* ``training-step-hybrid``: the hybrid step with the Dr.Jit
  :class:`pyhybrid.nn.propagator.Propagator` (backward = J^T g from the
  forward-mode transport Jacobian) vs the same step with the torch-eager
  reference propagator ``tests/reference/torch_rk4.py`` (autograd through every
  RK4 step).
* ``training-step-hybrid-vs-network``: the same hybrid step vs a pure network
  step on the same batch (encoder + a 128 x 128 decoder network predicting the
  hits directly, the "direct" model of the example). A ratio below 1 is the
  price of the physics in the loop.
* ``training-gauss-newton-targets``: the Gauss-Newton target computation of
  :func:`pyhybrid.nn.hybrid.fit_through_physics` (20 VJPs for the residual
  Jacobian + a 5 x 5 solve per track) with the Dr.Jit propagator vs the
  torch-eager one.
"""
from __future__ import annotations

import math

from pyhybrid.bench.harness import BenchCase
from pyhybrid.bench.propagate import HALF_LENGTH, RADII, SOLENOID, THICKNESS, _reference

BATCH = 512
STEP = 50.0           # RK4 step [mm], as in the example (the torch-eager baseline takes the same steps)
SIGMA = (0.02, 0.2)   # (r*phi, z) hit resolution [mm] used in the chi^2


def _tracks(n: int, device: str, dtype):
    """Perigee parameters (n, 5), deterministic: pT in [1, 10] GeV, |eta| < 1, phi near 0 (canonical frame)."""
    import torch

    generator = torch.Generator().manual_seed(11)
    pt = 1 + 9 * torch.rand(n, generator=generator, dtype=torch.float64)
    theta = 2 * torch.atan(torch.exp(-(2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)))
    charge = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    params = torch.stack([0.05 * torch.randn(n, generator=generator, dtype=torch.float64),
                          30 * torch.randn(n, generator=generator, dtype=torch.float64),
                          0.01 * torch.randn(n, generator=generator, dtype=torch.float64),
                          theta, charge * torch.sin(theta) / pt], dim=1)
    return params.to(device=device, dtype=dtype)


def _physics(kind: str, device: str, dtype):
    """perigee (N, 5) -> local hits (N, L, 2): the Dr.Jit Propagator or the torch-eager reference."""
    import torch

    from pyhybrid.nn.hybrid import PerigeeHits, perigee_to_free
    from pyhybrid.nn.propagator import RK4, Propagator, SolenoidField, barrel

    if kind == "drjit":
        return PerigeeHits(Propagator(SolenoidField(*SOLENOID), barrel(RADII, half_length=HALF_LENGTH,
                                                                         thickness=THICKNESS),
                                      stepper=RK4(STEP), scattering="none")).to(device)
    reference = _reference()
    like = dict(device=device, dtype=dtype)
    field = reference.solenoid_field(*(torch.tensor(v, **like) for v in SOLENOID))
    thickness = torch.full((len(RADII),), THICKNESS, **like)

    def hits(params):
        position, direction, qop = perigee_to_free(params)
        free = torch.cat([position, torch.zeros_like(qop)[:, None], direction, qop[:, None]], dim=1)
        return reference.propagate_cylinders(free, list(RADII), [HALF_LENGTH] * len(RADII), field, STEP,
                                             thickness=thickness)["local"]

    return hits


def _models(device: str, dtype, batch: int):
    import torch

    from pyhybrid.nn.hybrid import Surrogate, TrackEncoder

    truth = _tracks(batch, device, dtype)
    with torch.no_grad():
        measured = _physics("drjit", device, dtype)(truth)
    sigma = torch.tensor(SIGMA, device=device, dtype=dtype)
    torch.manual_seed(0)
    encoder = TrackEncoder(len(RADII), d0_scale=0.05, z0_scale=30.0).to(device=device, dtype=dtype)
    encoder.calibrate(measured)
    decoder = Surrogate((5,), (len(RADII), 2)).to(device=device, dtype=dtype)
    with torch.no_grad():
        decoder.calibrate(truth, measured)
    return truth, measured, sigma, encoder, decoder


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _step(model_of, parameters, measured, sigma, device):
    """One Adam training step on the chi^2 of ``model_of(measured)`` against ``measured``."""
    import torch

    optimizer = torch.optim.Adam(parameters, lr=1e-5)

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = ((model_of(measured) - measured) / sigma).pow(2).sum((1, 2)).mean()
        loss.backward()
        optimizer.step()
        _synchronize(device)

    return call


def _training_step(baseline: str):
    def setup(device: str, precision: str, batch: int):
        import torch

        dtype = getattr(torch, precision)
        _, measured, sigma, encoder, decoder = _models(device, dtype, batch)
        drjit_physics = _physics("drjit", device, dtype)
        hybrid = _step(lambda hits: drjit_physics(encoder(hits)), list(encoder.parameters()), measured, sigma,
                       device)
        if baseline == "eager":
            eager_physics = _physics("eager", device, dtype)
            other = _step(lambda hits: eager_physics(encoder(hits)), list(encoder.parameters()), measured, sigma,
                          device)
        else:
            other = _step(lambda hits: decoder(encoder(hits)), [*encoder.parameters(), *decoder.parameters()],
                          measured, sigma, device)
        return hybrid, other
    return setup


def _gauss_newton_targets(device: str, precision: str, batch: int):
    import torch

    from pyhybrid.nn.hybrid import gauss_newton_step

    dtype = getattr(torch, precision)
    truth, measured, sigma, _, _ = _models(device, dtype, batch)
    start = truth + torch.tensor([0.01, 0.1, 1e-4, 1e-4, 1e-3], device=device, dtype=dtype) * math.sqrt(2)

    def call_with(physics):
        def call():
            gauss_newton_step(lambda p: ((physics(p) - measured) / sigma).flatten(1), start)
            _synchronize(device)
        return call

    return call_with(_physics("drjit", device, dtype)), call_with(_physics("eager", device, dtype))


CASES = [
    BenchCase("training-step-hybrid", "tracks", BATCH, _training_step("eager"), grad=True),
    BenchCase("training-step-hybrid-vs-network", "tracks", BATCH, _training_step("network"), grad=True),
    BenchCase("training-gauss-newton-targets", "tracks", BATCH, _gauss_newton_targets, grad=True),
]
