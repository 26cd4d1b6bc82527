"""Benchmark cases: GFLASH sampling calorimeter, Dr.Jit module vs the torch-eager reference.

Work unit: showers. The Dr.Jit side is the user-facing
:class:`pyhybrid.nn.calorimeter.SamplingCalorimeter` (input validation, seed,
conversion included); the baseline is ``tests/reference/torch_calorimeter.py``
(the same model on dense torch tensors, torch's own random numbers). Geometry:
lead/scintillator 2 mm / 4 mm, 30 layers read out one by one, 5 x 5 cells of
30 mm (750 cells per shower), 6 Gauss-Legendre points per layer, energies
uniform in [1, 100] GeV, impact spread 5 mm. ``grad`` cases time forward +
backward of a weighted cell sum w.r.t. all design parameters (the
detector-design use).
"""
from __future__ import annotations


from pyhybrid.bench.harness import BenchCase, load_reference

N_SHOWERS = 2000
N_GRAD_SHOWERS = 250  # the torch-eager backward takes ~10 ms per shower
CUDA_SHOWERS = 50_000
CUDA_GRAD_SHOWERS = 10_000
GEOMETRY = dict(absorber_thickness=2.0, active_thickness=4.0, n_layers=30, layers_per_segment=1, n_cells=5,
                cell_size=30.0, noise=0.001, quadrature_points=6)


def _reference():
    return load_reference("torch_calorimeter")


def _setup(grad: bool):
    def setup(device: str, precision: str, n_showers: int):
        import torch

        from pyhybrid.kernels.calorimeter import Design
        from pyhybrid.nn.calorimeter import SamplingCalorimeter

        dtype = getattr(torch, precision)
        generator = torch.Generator().manual_seed(1)
        energy = (1.0 + 99.0 * torch.rand(n_showers, generator=generator, dtype=torch.float64)).to(device, dtype)
        impact = (5.0 * torch.randn(n_showers, 2, generator=generator, dtype=torch.float64)).to(device, dtype)
        calo = SamplingCalorimeter("lead", "scintillator", trainable=Design.field_names(), dtype=dtype,
                                   **GEOMETRY).to(device)
        s = calo.segmentation
        weights = torch.rand(n_showers, s.n_segments, s.n_cells, s.n_cells, generator=generator,
                             dtype=torch.float64).to(device, dtype)
        design = {name: p.detach().clone().requires_grad_() for name, p in calo.named_parameters()}
        reference = _reference()
        torch_generator = torch.Generator(device=device).manual_seed(2)
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        calls = iter(range(1 << 62))

        def drjit_call():
            seed = next(calls)
            if grad:
                calo.zero_grad(set_to_none=True)
                (calo(energy, impact, seed=seed) * weights).sum().backward()
            else:
                with torch.no_grad():
                    calo(energy, impact, seed=seed)
            synchronize()

        def torch_call():
            args = (energy, impact, design, s.n_layers, s.layers_per_segment, s.n_cells, calo.quadrature_points)
            if grad:
                for p in design.values():
                    p.grad = None
                (reference.simulate(*args, generator=torch_generator) * weights).sum().backward()
            else:
                with torch.no_grad():
                    reference.simulate(*args, generator=torch_generator)
            synchronize()

        return drjit_call, torch_call

    return setup


CASES = [
    BenchCase("calorimeter-showers", "showers", N_SHOWERS, _setup(False), cuda_batch=CUDA_SHOWERS),
    BenchCase("calorimeter-showers-grad", "showers", N_GRAD_SHOWERS, _setup(True), grad=True,
              cuda_batch=CUDA_GRAD_SHOWERS),
]
