"""Benchmark cases: LO matrix elements, Dr.Jit module vs the torch-eager reference.

Work unit: matrix-element evaluations (events), 2^20 per call (2^23 on CUDA). The Dr.Jit side is the
user-facing :class:`pyhybrid.nn.MatrixElement` with its default input
validation; the baseline is ``tests/reference/torch_me.py`` (the same formulas,
one torch op each). Gradient cases time forward + backward: ``grad-params``
w.r.t. the six SM parameters (the matrix-element-inference use), ``grad-all``
also w.r.t. every momentum component.
"""
from __future__ import annotations


from pyhybrid.bench.harness import BenchCase, load_reference

N_EVENTS = 1 << 20
CUDA_EVENTS = 1 << 23
_SQRT_S = {"ee_mumu": 91.2, "ee_qqg": 91.2, "gg_tt": 500.0}


def _reference():
    return load_reference("torch_me")


def _setup(process: str, mode: str):
    def setup(device: str, precision: str, n_events: int):
        import torch

        from pyhybrid.kernels.matrix_elements import get_process
        from pyhybrid.nn.matrix_element import MatrixElement, rambo_momenta

        dtype = getattr(torch, precision)
        masses = torch.tensor([172.5 if get_process(process).massive_top else 0.0] * get_process(process).n_out,
                              dtype=torch.float64)
        momenta, _ = rambo_momenta(_SQRT_S[process], masses, n_events, seed=1)
        momenta = momenta.detach().to(device=device, dtype=dtype)
        module = MatrixElement(process).to(device=device, dtype=dtype)
        params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
        reference = _reference()
        if mode == "grad-all":
            momenta.requires_grad_()
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def drjit_call():
            if mode == "forward":
                with torch.no_grad():
                    module(momenta)
            else:
                module.zero_grad(set_to_none=True)
                momenta.grad = None
                module(momenta).sum().backward()
            synchronize()

        def torch_call():
            if mode == "forward":
                with torch.no_grad():
                    reference.squared_matrix_element(process, momenta, params)
            else:
                for p in params.values():
                    p.grad = None
                momenta.grad = None
                reference.squared_matrix_element(process, momenta, params).sum().backward()
            synchronize()

        return drjit_call, torch_call

    return setup


CASES = [
    BenchCase(f"me-{process}-{mode}", "events", N_EVENTS, _setup(process, mode), grad=mode != "forward",
              cuda_batch=CUDA_EVENTS)
    for process in ("ee_mumu", "ee_qqg", "gg_tt")
    for mode in ("forward", "grad-params", "grad-all")
]
