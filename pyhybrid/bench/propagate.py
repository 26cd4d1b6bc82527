"""Benchmark cases: track propagation through a barrel tracker (Dr.Jit Propagator vs torch eager).

Workload: WORKLOAD_TRACKS (100 000; GRADIENT_TRACKS = 5000 for the gradient cases; on CUDA
1 000 000 and 50 000) muons from the origin, p_T uniform in [1, 10] GeV, |eta| < 1,
2 T solenoid (R = 1.2 m, L = 3 m, paraxial model), ten silicon barrel layers (0.3 mm,
radii 30-850 mm, |z| < 1 m), classic RK4 with 10 mm steps, mean energy loss at each
layer. The torch-eager baseline is ``tests/reference/torch_rk4.py``: the same
algorithm and the same steps, one torch op at a time; its gradient is torch autograd
through every step. ``work`` counts RK4 steps (track-steps): STEPS_PER_TRACK is the
mean number of RK4 steps per track of this workload (both implementations take the
same steps; tests/test_propagation_module.py checks the constant).

Cases: forward; forward + gradient with respect to the track parameters (hybrid
training); forward + gradient with respect to track parameters, field parameters,
layer radii and thicknesses (detector optimisation). The gradient cases run with the
exact transport Jacobian and (suffix ``-acts``) with ACTS' one that neglects dB/dr.
"""
from __future__ import annotations

import math

from pyhybrid.bench.harness import BenchCase, load_reference

WORKLOAD_TRACKS = 100_000
# torch eager's autograd tapes every step (~2 GB at 5000 tracks in float64), so the gradient
# cases use a smaller batch to stay within a 24 GB machine.
GRADIENT_TRACKS = 5000
# On CUDA: batches that fill a GPU; the gradient batch keeps torch eager's tape under ~20 GB.
CUDA_WORKLOAD_TRACKS = 1_000_000
CUDA_GRADIENT_TRACKS = 50_000
STEPS_PER_TRACK = 106.1
RADII = (30.0, 60.0, 100.0, 150.0, 200.0, 300.0, 400.0, 550.0, 700.0, 850.0)
HALF_LENGTH = 1000.0
THICKNESS = 0.3
SOLENOID = (2.0, 1200.0, 3000.0)
STEP = 10.0


def workload(n: int, device: str, precision: str):
    """The benchmark's track parameters (n, 8), deterministic."""
    import torch

    dtype = getattr(torch, precision)
    generator = torch.Generator().manual_seed(2024)
    eta = torch.empty(n, dtype=torch.float64).uniform_(-1.0, 1.0, generator=generator)
    phi = torch.empty(n, dtype=torch.float64).uniform_(-math.pi, math.pi, generator=generator)
    pt = torch.empty(n, dtype=torch.float64).uniform_(1.0, 10.0, generator=generator)
    charge = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    theta = 2 * torch.atan(torch.exp(-eta))
    direction = torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi), torch.cos(theta)], 1)
    vertex = 0.01 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    params = torch.cat([vertex, torch.zeros(n, 1, dtype=torch.float64), direction,
                        (charge * torch.sin(theta) / pt)[:, None]], 1)
    return params.to(device=device, dtype=dtype)


def _reference():
    return load_reference("torch_rk4")


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _setup(gradient: str | None, jacobian: str = "exact"):
    def setup(device: str, precision: str, n_tracks: int):
        import torch

        from pyhybrid.nn.propagator import RK4, Propagator, SolenoidField, barrel

        reference = _reference()
        params = workload(n_tracks, device, precision)
        everything = gradient == "all"
        prop = Propagator(SolenoidField(*SOLENOID, requires_grad=everything),
                          barrel(RADII, half_length=HALF_LENGTH, thickness=THICKNESS), stepper=RK4(STEP),
                          trainable_positions=everything, trainable_thickness=everything,
                          jacobian=jacobian).to(device)

        def drjit_call():
            if gradient is None:
                with torch.no_grad():
                    out = prop(params)
            else:
                prop.zero_grad()
                p = params.detach().requires_grad_()
                out = prop(p)
                (out.local.square().sum() + out.path_length.sum()).backward()
            _synchronize(device)
            return out

        def torch_call():
            like = dict(dtype=params.dtype, device=device)
            p = params.detach().requires_grad_(gradient is not None)
            thickness = torch.full((len(RADII),), THICKNESS, **like).requires_grad_(everything)
            field_params, radii = SOLENOID, list(RADII)
            if everything:  # leaves for torch autograd
                field_params = torch.tensor(SOLENOID, **like, requires_grad=True)
                radii = list(torch.tensor(RADII, **like, requires_grad=True))
            with torch.set_grad_enabled(gradient is not None):
                out = reference.propagate_cylinders(p, radii, [HALF_LENGTH] * len(RADII),
                                                    reference.solenoid_field(*field_params), STEP,
                                                    thickness=thickness)
                if gradient is not None:
                    (out["local"].square().sum() + out["path"].sum()).backward()
            _synchronize(device)
            return out

        return drjit_call, torch_call
    return setup


CASES = [
    BenchCase("propagate-rk4-forward", "track-steps", WORKLOAD_TRACKS, _setup(None),
              cuda_batch=CUDA_WORKLOAD_TRACKS, work_per_item=STEPS_PER_TRACK),
    *[BenchCase(f"propagate-rk4-gradient-{gradient}{'' if jacobian == 'exact' else '-' + jacobian}", "track-steps",
                GRADIENT_TRACKS, _setup(gradient, jacobian), grad=True, cuda_batch=CUDA_GRADIENT_TRACKS,
                work_per_item=STEPS_PER_TRACK)
      for jacobian in ("exact", "acts") for gradient in ("tracks", "all")],
]
