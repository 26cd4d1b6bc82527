"""Every torch module of pyhybrid survives torch.save / torch.load of the whole module and
copy.deepcopy (checkpoints of whole models, EMA copies, best-model snapshots), with the same
outputs afterwards; and under torch.compile each physics call is one clean graph break."""
import copy
import io
import subprocess
import sys

import pytest
import torch

import pyhybrid.nn as pn
from pyhybrid.nn.matrix_element import rambo_momenta


def _tracks():
    direction = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.8, 0.6]], dtype=torch.float64)
    qop = torch.tensor([[0.5], [-0.25]], dtype=torch.float64)
    return torch.cat([torch.zeros(2, 4, dtype=torch.float64), direction, qop], 1)


def _propagator():
    field = pn.SolenoidField(requires_grad=True)
    return pn.Propagator(field, pn.barrel([30.0, 60.0], half_length=500.0), trainable_positions=True), (_tracks(),)


def _matrix_element(cls):
    def make():
        momenta, _ = rambo_momenta(91.2, torch.zeros(2, dtype=torch.float64), 4, seed=1)
        return cls("ee_mumu", mz=91.2), (momenta,)
    return make


def _two_body():
    return pn.TwoBodyCrossSection("ee_mumu"), (torch.tensor([-0.5, 0.3], dtype=torch.float64), 91.0)


def _calorimeter():
    return pn.SamplingCalorimeter(n_layers=4, dtype=torch.float64), ()


def _tracker_design():
    return pn.TrackerDesign([40.0, 80.0, 120.0]), ()


CASES = {
    "Propagator": _propagator,
    "MatrixElement": _matrix_element(pn.MatrixElement),
    "DifferentialCrossSection": _matrix_element(pn.DifferentialCrossSection),
    "TwoBodyCrossSection": _two_body,
    "SamplingCalorimeter": _calorimeter,
    "TrackerDesign": _tracker_design,
    "PartonShower": lambda: (pn.PartonShower(), ()),
}


def _outputs(module, inputs):
    if isinstance(module, pn.Propagator):
        return module(*inputs).local
    if isinstance(module, pn.SamplingCalorimeter):
        return module.expected_cells(torch.tensor([10.0, 50.0], dtype=torch.float64))
    if isinstance(module, pn.TrackerDesign):
        pt, eta = torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
        return torch.stack(list(module.resolutions(pt, eta).values()))
    if isinstance(module, pn.PartonShower):
        return torch.stack(module.parameter_tensors())
    return module(*inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_module_save_load_and_deepcopy_keep_outputs(name):
    module, inputs = CASES[name]()
    expected = _outputs(module, inputs)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (loaded, copy.deepcopy(module)):
        assert type(copied) is type(module)
        torch.testing.assert_close(_outputs(copied, inputs), expected, rtol=0, atol=0)
        assert [n for n, _ in copied.named_parameters()] == [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("name", ["Propagator", "MatrixElement", "TwoBodyCrossSection", "SamplingCalorimeter"])
def test_under_torch_compile_a_module_call_is_one_skipped_call_with_eager_values(name):
    """The input checks (Python bools of tensors) and the kernel run eagerly as one call that Dynamo
    skips, instead of being traced (a graph break at every check); the values and gradients equal
    eager ones."""
    from torch._dynamo.utils import counters

    module, inputs = CASES[name]()
    inputs = tuple(x.detach().requires_grad_() if isinstance(x, torch.Tensor) else x for x in inputs)

    def model(*tensors):
        return _outputs(module, tensors).sum() * 2.0

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    value = compiled(*inputs)  # the module's first call under Dynamo
    with torch.compiler.set_stance("fail_on_recompile"):  # the wrapper keeps no state that Dynamo guards
        value = compiled(*inputs)
    reasons = list(counters["graph_break"])
    assert any("torch.compiler.disable" in reason for reason in reasons)
    assert all("skip" in reason.lower() for reason in reasons)  # skipped calls only: nothing in them traced
    assert any("sum" in g.code for g in graphs)  # the torch code after the call was compiled
    expected = model(*inputs)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    leaves = [x for x in (*inputs, *module.parameters()) if isinstance(x, torch.Tensor) and x.requires_grad]
    if leaves:
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        for got, want in zip(grads, torch.autograd.grad(expected, leaves, allow_unused=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_importing_the_modules_does_not_load_dynamo():
    """torch.compile support costs nothing at import (torch._dynamo takes ~1.4 s to import)."""
    code = "import sys, pyhybrid.nn, pyhybrid.estimators; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
