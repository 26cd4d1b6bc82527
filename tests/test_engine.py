"""The torch <-> Dr.Jit bridge: zero copy, errors, and both VJP paths under gradcheck."""
import drjit as dr
import pytest
import torch

from pyhybrid import engine
from pyhybrid.kernels import backend
from pyhybrid.kernels.backend import BackendUnavailable, types_of

STEPS = 40


def oscillator_reverse_ad(state, omega, damping, *, dt):
    """Damped oscillator x'' = -omega^2 x - 2 damping x', velocity-Verlet, STEPS steps (symbolic loop)."""
    x, v = state
    types = types_of(x)

    def body(i, x, v):
        a = -omega * omega * x - 2 * damping * v
        x = x + v * dt + 0.5 * a * dt * dt
        a_new = -omega * omega * x - 2 * damping * v
        v = v + 0.5 * (a + a_new) * dt
        return i + 1, x, v

    i = dr.zeros(types.UInt32, dr.width(x))
    _, x, v = dr.while_loop((i, types.Float(x), types.Float(v)), lambda i, x, v: i < STEPS, body,
                            max_iterations=STEPS)
    return [x, v]


def oscillator_forward_jacobian(state, omega, damping, *, dt):
    """Same kernel, the Jacobian carried forward through the loop (ACTS style); VJP = J^T g."""
    x0, v0 = state
    inputs = (x0, v0, omega, damping)
    jac = []
    for k in range(4):  # one forward-mode pass per input column: d(x, v)/d input_k
        seeds = [type(x0)(a) for a in inputs]
        dr.enable_grad(seeds[k])
        dr.set_grad(seeds[k], 1.0)
        x, v = oscillator_reverse_ad((seeds[0], seeds[1]), seeds[2], seeds[3], dt=dt)
        dr.forward_to(x, v)
        jac.append((dr.detach(dr.grad(x)), dr.detach(dr.grad(v))))
        values = [dr.detach(x), dr.detach(v)]
    dr.eval(values, jac)
    return values, jac


def vjp_from_jacobian(jac, grad_outputs, needs, *, dt):
    gx, gv = grad_outputs[0]
    grads = [gx * dx + gv * dv for dx, dv in jac]
    return (grads[0], grads[1]), grads[2], grads[3]


reverse_fn = engine.kernel_function(oscillator_reverse_ad, dt=0.05)
forward_fn = engine.kernel_function(oscillator_forward_jacobian, vjp=vjp_from_jacobian, dt=0.05)


def _inputs(dtype=torch.float64, n=6):
    state = torch.randn(n, 2, dtype=dtype, requires_grad=True)
    omega = torch.rand(n, dtype=dtype) + 0.5
    omega.requires_grad_()
    damping = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    return state, omega, damping


def test_oscillator_matches_analytic_solution():
    state = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    omega = torch.tensor([2.0], dtype=torch.float64)
    out = reverse_fn(state, omega, torch.tensor(0.0, dtype=torch.float64))
    t = STEPS * 0.05
    assert out[0, 0].item() == pytest.approx(torch.cos(torch.tensor(2.0 * t)).item(), abs=2e-3)


@pytest.mark.parametrize("fn", [reverse_fn, forward_fn], ids=["reverse-ad", "supplied-jacobian"])
def test_gradcheck_both_vjp_paths(fn):
    assert torch.autograd.gradcheck(fn, _inputs(), eps=1e-6, atol=1e-7)


def test_both_paths_agree_and_float32_runs():
    inputs = _inputs()
    torch.testing.assert_close(reverse_fn(*inputs), forward_fn(*inputs))
    g1 = torch.autograd.grad(reverse_fn(*inputs).sum(), inputs)
    g2 = torch.autograd.grad(forward_fn(*inputs).sum(), inputs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    out = reverse_fn(*f32)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert f32[0].grad.dtype == torch.float32


def test_inputs_without_grad_and_repeated_backward():
    state, omega, damping = _inputs()
    omega = omega.detach()
    out = forward_fn(state, omega, damping).pow(2).sum()
    out.backward(retain_graph=True)
    first = state.grad.clone(), damping.grad.clone()
    out.backward()
    torch.testing.assert_close(state.grad, 2 * first[0])
    torch.testing.assert_close(damping.grad, 2 * first[1])
    assert omega.grad is None


@pytest.mark.parametrize("fn", [reverse_fn, forward_fn], ids=["reverse-ad", "vjp"])
def test_second_derivatives_raise_instead_of_missing_the_kernels_part(fn):
    """A gradient taken with create_graph=True is the plain gradient; differentiating it must not
    silently leave out the kernel's second-order terms (torch prunes once_differentiable's error
    node from autograd.grad(..., inputs)): it raises."""
    state, omega, damping = _inputs()
    plain = torch.autograd.grad(fn(state, omega, damping).pow(2).sum(), state)[0]
    loss = fn(state, omega, damping).pow(2).sum() + state.pow(3).sum()
    (graph,) = torch.autograd.grad(loss, state, create_graph=True)
    torch.testing.assert_close(graph, plain + 3 * state.detach() ** 2)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(graph.sum(), state)
    loss = fn(state, omega, damping).sum()  # linear in the output: the incoming gradient is a constant
    (graph,) = torch.autograd.grad(loss, state, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(graph.sum(), (omega, damping))
    with pytest.raises(RuntimeError, match="differentiable once"):  # the same through torch.func
        torch.func.grad(lambda s: torch.func.grad(lambda t: fn(t, omega, damping).sum())(s).sum())(state)
    # a loss on a jacrev Jacobian: its derivative raises, through autograd and nested transforms
    jacobian = torch.func.jacrev(lambda s: fn(s, omega, damping).sum(1) + s.square().sum(1))(state)
    assert jacobian.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(jacobian.sum(), state)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacrev(torch.func.jacrev(lambda s: fn(s, omega, damping).sum(1)))(state.detach())


@pytest.mark.parametrize("fn", [reverse_fn, forward_fn], ids=["reverse-ad", "vjp"])
def test_torch_func_grad_vjp_and_jacrev_match_autograd(fn):
    state, omega, damping = (t.detach() for t in _inputs())
    expected = torch.autograd.functional.jacobian(fn, (state, omega, damping))  # (N, 2) output
    jacobians = torch.func.jacrev(fn, argnums=(0, 1, 2))(state, omega, damping)
    for got, want in zip(jacobians, expected):
        torch.testing.assert_close(got, want)
    weights = torch.randn(len(state), 2, dtype=state.dtype)
    grads = torch.func.grad(lambda *x: (fn(*x) * weights).sum(), argnums=(0, 1, 2))(state, omega, damping)
    value, pullback = torch.func.vjp(fn, state, omega, damping)
    torch.testing.assert_close(value, fn(state, omega, damping))
    for got, pulled, want in zip(grads, pullback(weights), expected):
        reduced = (want * weights.reshape(*weights.shape, *(1,) * (want.dim() - 2))).sum((0, 1))
        torch.testing.assert_close(got, reduced)
        torch.testing.assert_close(pulled, reduced)
    with pytest.raises(NotImplementedError, match="batched already"):
        torch.func.vmap(fn, in_dims=(0, None, None))(state[None], omega, damping)


def test_torch_compile_runs_the_kernel_eagerly_with_the_same_values_and_gradients():
    state, omega, damping = _inputs()
    compiled = torch.compile(lambda *x: 3.0 * forward_fn(*x).pow(2).sum(), backend="eager")
    value = compiled(state, omega, damping)
    grads = torch.autograd.grad(value, (state, omega, damping))
    expected = 3.0 * forward_fn(state, omega, damping).pow(2).sum()
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (state, omega, damping))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn", [reverse_fn, forward_fn], ids=["reverse-ad", "vjp"])
def test_without_anything_to_differentiate_no_autograd_node_and_the_same_values(fn):
    """No grad mode, or no input requiring grad: the kernel runs without torch.autograd.Function."""
    state, omega, damping = _inputs()
    differentiable = fn(state, omega, damping)
    assert differentiable.grad_fn is not None
    with torch.no_grad():
        plain = fn(state, omega, damping)
    detached = fn(state.detach(), omega.detach(), damping.detach())
    for out in (plain, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, differentiable.detach())


def _product_and_sum(x, y):
    return x * y, dr.sin(x) + y


_received = []


def _product_and_sum_vjp(saved, grad_outputs, needs):
    _received.append([g is None for g in grad_outputs])
    x, y = saved
    g_product, g_sum = (0.0 if g is None else g for g in grad_outputs)
    return g_product * y + g_sum * dr.cos(x), g_product * x + g_sum


def test_an_output_the_loss_does_not_use_reaches_the_vjp_as_none():
    """Generic reverse AD and a supplied VJP: an unused output gives None (no zeros are made), and the
    gradient equals that of a loss using it with weight 0."""
    supplied = engine.kernel_function(lambda x, y: (_product_and_sum(x, y), (x, y)), vjp=_product_and_sum_vjp)
    generic = engine.kernel_function(_product_and_sum)
    x, y = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for fn in (supplied, generic):
        for used in (0, 1):
            _received.clear()
            one = torch.autograd.grad(fn(x, y)[used].pow(2).sum(), (x, y))
            outputs = fn(x, y)
            both = torch.autograd.grad(outputs[used].pow(2).sum() + 0.0 * outputs[1 - used].sum(), (x, y))
            for a, b in zip(one, both):
                torch.testing.assert_close(a, b, rtol=1e-15, atol=0.0)
            if fn is supplied:
                assert _received == [[i != used for i in range(2)], [False, False]]
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b)[1], (x, y))


def _squares_in_longer_rows(x):
    """x^2 written into rows with three spare entries, of which torch gets the first N."""
    rows = dr.empty(type(x), dr.width(x) + 3)
    dr.scatter(rows, x * x, dr.arange(dr.uint32_array_t(type(x)), dr.width(x)))
    return engine.Leading(rows, dr.width(x)), (x,)


def _squares_vjp(saved, grad_outputs, needs):
    (x,), (g,) = saved, grad_outputs
    _received.append(dr.width(g))
    return [2.0 * x * g]


def test_a_leading_output_is_sliced_inside_the_autograd_node():
    """engine.Leading: torch gets the first N entries, the slice is part of the kernel's node (no
    SliceBackward filling a zero gradient of the whole rows), the VJP gets an N-entry gradient, the
    output may be modified in place like any output of a node, and generic reverse AD works too."""
    supplied = engine.kernel_function(_squares_in_longer_rows, vjp=_squares_vjp)
    generic = engine.kernel_function(lambda x: _squares_in_longer_rows(x)[0])
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for fn in (supplied, generic):
        out = fn(x)
        assert out.shape == (6,) and type(out.grad_fn).__name__ == "_KernelFunctionBackward"
        torch.testing.assert_close(out, x.detach() ** 2, rtol=0, atol=0)
        _received.clear()
        (grad,) = torch.autograd.grad((3.0 * out).sum(), x)
        assert _received == ([6] if fn is supplied else [])
        torch.testing.assert_close(grad, 6.0 * x.detach(), rtol=0, atol=0)
        out = fn(x)
        out.view(2, 3).transpose(0, 1).mul_(2.0)  # in place through a view, as on the propagator's (N, L, ...) rows
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, 4.0 * x.detach(), rtol=0, atol=0)


def test_zero_copy_on_cpu():
    t = torch.arange(12, dtype=torch.float32)
    array = engine.to_drjit(t)
    assert array.torch().data_ptr() == t.data_ptr()
    t[3] = 42.0  # the Dr.Jit array sees the torch write: same memory
    assert array[3] == 42.0


def test_summed_output_gradient_equals_explicit_ones():
    # out.sum().backward() hands the kernel a broadcast (stride-0) gradient, kept lazy on the Dr.Jit side.
    for fn in (reverse_fn, forward_fn):
        inputs = _inputs()
        summed = torch.autograd.grad(fn(*inputs).sum(), inputs)
        out = fn(*inputs)
        explicit = torch.autograd.grad(out, inputs, torch.ones(out.shape, dtype=out.dtype).contiguous())
        for a, b in zip(summed, explicit):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _square_and_mask(x):
    return x * x, x > 0.0


def test_mask_outputs_become_bool_tensors_without_gradient():
    square_and_mask = engine.kernel_function(_square_and_mask)
    x = torch.tensor([-1.5, 0.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    square, mask = square_and_mask(x)
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert mask.tolist() == [False, False, True, True]
    (grad,) = torch.autograd.grad((square * mask).sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 4.0, 6.0], dtype=torch.float64))
    with torch.no_grad():
        assert square_and_mask(x)[1].tolist() == mask.tolist()


def _identity(x):
    return x


def _keep_output(x):
    y = x * 2.0
    dr.eval(y)
    return y, y  # the VJP's saved state is the output array itself


def _vjp_from_saved_output(saved, grad_outputs, needs):
    return (saved,)  # the same Dr.Jit array on every backward call


def _twice(x):
    y = x * 2.0
    return y, y


def test_results_handed_to_torch_never_share_memory_in_use():
    x = torch.arange(4.0, dtype=torch.float64)
    out = engine.kernel_function(_identity)(x)
    out += 1.0  # must not write into the input
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]

    first, second = engine.kernel_function(_twice)(x)
    first += 1.0  # the same array handed over twice: the second is a copy
    assert second.tolist() == [0.0, 2.0, 4.0, 6.0] and first.tolist() == [1.0, 3.0, 5.0, 7.0]

    keep = engine.kernel_function(_keep_output, vjp=_vjp_from_saved_output)
    x = torch.arange(4.0, dtype=torch.float64, requires_grad=True)
    y = keep(x)
    y.detach().zero_()  # must not change the state saved for the backward pass
    y.backward(torch.ones(4, dtype=torch.float64), retain_graph=True)
    assert x.grad.tolist() == [0.0, 2.0, 4.0, 6.0]
    x.grad.zero_()  # an in-place change of a handed-over gradient must not reach the saved state either
    y.backward(torch.ones(4, dtype=torch.float64))
    assert x.grad.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_bad_inputs_name_the_problem():
    state, omega, damping = _inputs()
    with pytest.raises(TypeError, match="input 1 has dtype torch.float32"):
        reverse_fn(state, omega.float(), damping)
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        reverse_fn(state.long(), omega.long(), damping.long())
    with pytest.raises(ValueError, match="x must have shape \\(N, 3\\)"):
        engine.check_tensor(torch.zeros(4, 2), "x", shape=(None, 3))
    with pytest.raises(ValueError, match="qop contains NaN"):
        engine.check_tensor(torch.tensor([1.0, float("nan")]), "qop")
    with pytest.raises(TypeError, match="hits must have dtype torch.float32 or torch.float64, got torch.int64"):
        engine.to_drjit(torch.zeros(3, dtype=torch.int64), "hits")
    with pytest.raises(TypeError, match="hits must be a torch.Tensor, got list"):
        engine.to_drjit([1.0], "hits")
    # Dr.Jit runs on the first visible GPU: another GPU's tensors are refused before any kernel runs
    with pytest.raises(ValueError, match="hits is on cuda:1, but Dr.Jit runs on cuda:0.*CUDA_VISIBLE_DEVICES"):
        engine.types_for("cuda:1", torch.float32, "hits")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's make_dual uses it
@pytest.mark.parametrize("fn", [reverse_fn, forward_fn], ids=["reverse-ad", "vjp"])
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(fn):
    import torch.autograd.forward_ad as fwAD

    state, omega, damping = (t.detach() for t in _inputs())
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(fwAD.make_dual(state, torch.ones_like(state)), omega, damping)
        torch.testing.assert_close(fn(state, omega, damping), reverse_fn(state, omega, damping))  # no tangents
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda s: fn(s, omega, damping), (state,), (torch.ones_like(state),))


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]])
def test_finiteness_check_catches_every_non_finite_value(bad):
    values = torch.ones(1000, dtype=torch.float32)
    values[[10, 500][:len(bad)]] = torch.tensor(bad)
    with pytest.raises(ValueError, match="p contains NaN or infinite"):
        engine.check_tensor(values, "p")


def test_finiteness_check_accepts_finite_values_whose_sum_overflows():
    huge = torch.full((4,), 3e38, dtype=torch.float32)  # sum = inf in float32, every element finite
    assert not torch.isfinite(huge.sum())
    assert engine.check_tensor(huge, "p") is huge


def test_cuda_backend_or_a_clear_error():
    if not engine.cuda_available():
        with pytest.raises(BackendUnavailable, match="device='cuda' is unavailable"):
            backend.kernel_types("cuda")
        return
    t = torch.arange(12, dtype=torch.float32, device="cuda")
    array = engine.to_drjit(t)
    assert type(array).__module__.startswith("drjit.cuda")
    assert array.torch().data_ptr() == t.data_ptr()
    state, omega, damping = (x.detach().cuda().requires_grad_() for x in _inputs())
    reverse_fn(state, omega, damping).sum().backward()
    assert state.grad.device.type == "cuda"


def test_old_llvm_gives_install_hint(monkeypatch):
    monkeypatch.setattr(backend, "llvm_version", lambda: (15, 0, 6))
    with pytest.raises(BackendUnavailable, match="apt-get install libllvm19"):
        backend.kernel_types("cpu")
    monkeypatch.setattr(backend, "llvm_version", lambda: None)
    with pytest.raises(BackendUnavailable, match="no libLLVM found"):
        backend.kernel_types("cpu")


def test_threads_can_be_set_and_read():
    before = engine.get_threads()
    try:
        engine.set_threads(1)
        assert engine.get_threads() == 1
    finally:
        engine.set_threads(before)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        engine.set_threads(0)


def test_rng_is_reproducible_and_lanes_differ():
    types = backend.kernel_types("cpu", "float64")
    a = types.uniform(types.rng(1000, seed=7))
    b = types.uniform(types.rng(1000, seed=7))
    c = types.uniform(types.rng(1000, seed=8))
    assert dr.all(a == b)
    assert not dr.all(a == c)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            types.rng(10, seed=bad)
    mean = dr.mean(types.normal(types.rng(100_000, seed=1)))[0]
    assert abs(mean) < 5 / 100_000 ** 0.5


def test_modules_upcast_low_precision_activations_under_autocast():
    """Under torch.autocast a network's bfloat16 output is computed in float32 (as autocast's
    float32-only ops); outside autocast it stays an error naming the argument."""
    from pyhybrid.nn import MatrixElement, Propagator, SolenoidField, barrel, free_parameters, rambo_momenta

    torch.manual_seed(0)
    momenta, _ = rambo_momenta(91.2, torch.zeros(2), 16, seed=1)
    layer = torch.nn.Linear(16, 16)
    with torch.no_grad():  # starts as the identity: physical momenta
        layer.weight.copy_(torch.eye(16))
        layer.bias.zero_()
    matrix_element = MatrixElement("ee_mumu", tolerance=0.05)
    propagator = Propagator(SolenoidField(b0=2.0), barrel([32.0, 72.0], half_length=600.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activations = layer(momenta.reshape(16, 16))
        assert activations.dtype == torch.bfloat16
        squared = matrix_element(activations.reshape(16, 4, 4))
        params = free_parameters(torch.zeros(16, 3), activations[:, 4:7].float() + 2.0, 1.0).bfloat16()
        hits = propagator(params).local
    assert squared.dtype == torch.float32 and hits.dtype == torch.float32
    torch.testing.assert_close(squared, matrix_element(momenta), rtol=0.2, atol=0)  # bfloat16 inputs near the Z pole
    (squared.sum() + hits.square().sum()).backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="momenta must be float32 or float64, got torch.bfloat16"):
        matrix_element(momenta.bfloat16())


def test_least_recently_used_cache_makes_missing_entries_and_drops_the_oldest():
    from pyhybrid.engine import LeastRecentlyUsed

    cache, made = LeastRecentlyUsed(2), []

    def make(key):
        made.append(key)
        return key.upper()

    assert [cache.get_or_make(k, lambda k=k: make(k)) for k in "abac"] == ["A", "B", "A", "C"]
    assert made == ["a", "b", "c"] and list(cache) == ["a", "c"]  # b was the least recently used


def _doubled(x):
    return [2.0 * c for c in x], None


def _doubled_vjp(saved, grad_outputs, needs):
    return [tuple(2.0 * g for g in grad_outputs[0])]


def test_a_one_lane_incoming_gradient_gives_full_gradients_of_every_input_shape():
    """lane_broadcast_grads: the VJP gets out.sum()'s gradient as one lane; gradients that follow from
    it alone (one lane per column) still come back with the input's shape, as with N lanes."""
    one_lane = engine.kernel_function(_doubled, vjp=_doubled_vjp, lane_broadcast_grads=True)
    n_lanes = engine.kernel_function(_doubled, vjp=_doubled_vjp)
    for shape in ((5, 3), (1, 3)):
        grads = []
        for fn in (one_lane, n_lanes):
            x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            (3.0 * fn(x).sum()).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], torch.full(shape, 6.0, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
