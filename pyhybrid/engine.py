"""The one place where torch meets Dr.Jit.

* Device and precision: torch ``cpu`` tensors map to Dr.Jit's LLVM backend,
  ``cuda`` tensors to its CUDA backend; float32 and float64 are supported.
* Zero-copy conversion: :func:`to_drjit` wraps a contiguous torch tensor's
  memory as a flat Dr.Jit array (DLPack), :func:`to_torch` does the reverse.
* :func:`kernel_function` turns a Dr.Jit kernel into a differentiable torch
  callable (a ``torch.autograd.Function``, differentiable once: differentiating a
  gradient taken with ``create_graph=True`` raises instead of dropping second-order
  terms; ``torch.func.grad``, ``vjp`` and ``jacrev`` work, ``vmap`` over the inputs does
  not; under ``torch.compile`` a call is a graph break). The vector-Jacobian product comes
  either from Dr.Jit's reverse-mode AD (the forward is re-run under AD in the
  backward pass, so no graph is kept alive between passes and repeated backward
  calls are exact) or from an adjoint/Jacobian the kernel supplies.

Tensor layout at the boundary: a tensor of shape ``(N,)`` becomes one Dr.Jit
array of N lanes; ``(N, k)`` becomes a tuple of k arrays (structure of arrays);
a 0-d tensor becomes a 1-lane array that broadcasts against N lanes (its
gradient is summed over lanes, as for a broadcast parameter in torch). A kernel
output that is a Dr.Jit mask (Bool) array becomes a ``torch.bool`` tensor, which has no gradient.
"""
from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import drjit as dr
import torch
from torch.autograd import forward_ad

from pyhybrid.kernels.backend import KernelTypes, check_integer, cuda_available, kernel_types, llvm_version

__all__ = ["set_threads", "get_threads", "llvm_version", "cuda_available", "types_for", "check_tensor",
           "autocast_input", "empty_batch", "to_drjit", "to_torch", "kernel_function", "KERNEL_DTYPES",
           "check_kernel_dtype", "Leading"]

_DTYPE_TO_PRECISION = {torch.float32: "float32", torch.float64: "float64"}
#: The dtypes the kernels run in.
KERNEL_DTYPES = tuple(_DTYPE_TO_PRECISION)

# ---------------------------------------------------------------- device / threads


def set_threads(n: int) -> None:
    """Set the number of CPU worker threads of Dr.Jit's LLVM backend (>= 1)."""
    dr.set_thread_count(check_integer(n, "threads", 1))


def get_threads() -> int:
    """Number of CPU worker threads Dr.Jit's LLVM backend uses."""
    return dr.thread_count()


def check_kernel_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A module's ``dtype`` argument, which must be one the kernels run in (float32 or float64)."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def types_for(device: str | torch.device, dtype: torch.dtype, name: str = "tensor") -> KernelTypes:
    """Dr.Jit types for a torch device and dtype (float32 or float64) of the argument ``name``."""
    device = torch.device(device)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must have dtype torch.float32 or torch.float64, got {dtype}")
    if device.type == "cuda" and device.index not in (None, 0):
        # Dr.Jit's CUDA backend runs on the first visible GPU; a kernel there cannot use another GPU's memory.
        raise ValueError(f"{name} is on {device}, but Dr.Jit runs on cuda:0: run one process per GPU with "
                         "CUDA_VISIBLE_DEVICES=<its GPU> (then its tensors are on cuda:0)")
    return kernel_types(device.type, _DTYPE_TO_PRECISION[dtype])


# ---------------------------------------------------------------- validation


def check_tensor(
    value: Any,
    name: str,
    *,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    device: torch.device | str | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Validate a tensor argument and return it; errors name the argument.

    ``shape`` entries of None match any size (named N in the error for the first dimension);
    ``dtype``: one dtype or a tuple of the allowed ones (e.g. :data:`KERNEL_DTYPES`). ``finite``
    rejects NaN/inf.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            want is None or want == got for want, got in zip(shape, value.shape)
        )
        if not ok:
            # "N" for the batch dimension, "*" for another dimension of any size
            want = "(" + ", ".join(str(s) if s is not None else "N" if i == 0 else "*" for i, s in enumerate(shape)) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if dtype is not None and value.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {value.dtype}")
    if device is not None and value.device.type != torch.device(device).type:
        raise ValueError(f"{name} must be on device {torch.device(device).type}, got {value.device}")
    if finite and value.is_floating_point() and not _all_finite(value.detach()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def _all_finite(value: torch.Tensor) -> bool:
    """Exact, and usually one cheap reduction: a NaN or inf element makes the sum NaN or inf, so a
    finite sum proves every element finite (``isfinite(x).all()`` writes a boolean temporary: 70 ms
    for 64 MB on a 2-core VM, against 4 ms for the sum). An overflowing sum of finite values falls
    back to the element-wise test."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def autocast_input(value, dtype: torch.dtype = torch.float32):
    """Under ``torch.autocast``, a float16/bfloat16 activation as ``dtype``: the kernels run in
    float32/float64, as autocast runs its float32-only ops on upcast inputs. Anything else unchanged
    (outside autocast a low-precision input stays an error of the module's checks)."""
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16) and \
            torch.is_autocast_enabled(value.device.type):
        return value.to(dtype)
    return value


def empty_batch(shape: Sequence[int], *inputs: torch.Tensor) -> torch.Tensor:
    """The output of shape ``shape`` (batch size 0) for an empty batch, without a kernel call: in the
    autograd graph of ``inputs`` (zero gradients), so that a selection that kept no event trains like
    any other batch (a data-parallel run sees every parameter used)."""
    first = inputs[0]
    anchor = sum((t.sum() * 0.0 for t in inputs if t.requires_grad), first.new_zeros(()))
    return first.new_zeros(tuple(shape)) + anchor


# ---------------------------------------------------------------- conversion


def to_drjit(tensor: torch.Tensor, name: str = "tensor"):
    """Flat Dr.Jit view of a float32/float64 torch tensor, without copying.

    The tensor is flattened (copied only if not contiguous); cpu -> LLVM
    backend, cuda -> CUDA backend. Returns the AD-capable ``Float`` type of
    the matching precision.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    types = types_for(tensor.device, tensor.dtype, name)
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return types.Float(flat)


def to_torch(array, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Torch view of an evaluated Dr.Jit array (zero-copy), optionally reshaped."""
    out = array.torch()
    return out if shape is None else out.reshape(tuple(shape))


def _split(flat, shape: tuple[int, ...]):
    """Flat array of a (N,), (N, k) or () tensor -> array / tuple of column arrays."""
    if len(shape) <= 1:
        return flat
    n, k = shape
    index = dr.arange(dr.uint32_array_t(type(flat)), n) * k
    return tuple(dr.gather(type(flat), flat, index + j) for j in range(k))


@dataclass
class Leading:
    """A kernel output of which torch gets the first ``length`` entries (a tensor on the array's
    memory, no copy): for an array allocated longer than the result (e.g. output rows allocated
    once for a class of batch sizes). The entries are selected inside the autograd node, so the
    backward pass gets a gradient of ``length`` entries (a slice outside it would fill a zero
    gradient of the whole array on every backward)."""

    array: Any
    length: int


def _join(value, types: KernelTypes, owners: "_Owners") -> torch.Tensor:
    """Kernel output (array, :class:`Leading` array, or list/vector of column arrays) -> torch tensor
    of its own; a single mask (Bool) array becomes a bool tensor (columns are always floating point)."""
    if isinstance(value, Leading):
        whole = _join(value.array, types, owners)
        if value.length == whole.numel():
            return whole
        # A tensor of its own on the same memory, not a slice: torch lets a caller modify an autograd
        # node's outputs in place, but not views made inside the node.
        return whole.new_empty(0).set_(whole.untyped_storage(), whole.storage_offset(), (value.length,), (1,))
    if _is_columns(value):
        columns = [dr.detach(types.Float(c)) for c in value]
        dr.eval(*columns)
        return torch.stack([c.torch() for c in columns], dim=-1)
    array = value if isinstance(value, types.Bool) else dr.detach(types.Float(value))
    dr.eval(array)
    return owners.hand_over(array)


class _Owners:
    """Hands evaluated Dr.Jit arrays to torch, copying only memory that is not the array's alone.

    On the CPU, a copy of a large result costs more than the kernel that made it
    (fresh pages: ~1 GB/s on a small VM), so an evaluated array is handed over
    zero-copy (torch then holds the Dr.Jit reference, and freed memory returns to
    Dr.Jit's allocator cache). It is copied when torch could otherwise modify
    memory that is still in use: memory of the ``tensors`` it wraps (a kernel
    returning its input), an array the kernel keeps in ``saved`` for its VJP,
    or an array already handed over. On CUDA it is always copied: torch's caching
    allocator makes that cheap and keeps lifetimes ordered on torch's stream.
    """

    def __init__(self, tensors, saved=None):
        # Memory [start, end) of the CPU tensors and of the arrays handed over so far (computed once:
        # a gradient call hands over ~7 arrays and compares each with ~12 spans).
        self._spans = [_span(t) for t in tensors if t is not None and t.device.type == "cpu" and t.numel()]
        self._saved = saved

    @functools.cached_property
    def saved_indices(self) -> set:
        """JIT indices of the arrays in ``saved`` (collected when first needed: never on CUDA)."""
        if self._saved is None:
            return set()
        return {i & 0xFFFFFFFF for i in dr.detail.collect_indices(self._saved)}

    def hand_over(self, array) -> torch.Tensor:
        out = array.torch()
        if out.device.type != "cpu" or array.index in self.saved_indices:
            return out.clone()
        if out.numel():
            start, end = _span(out)
            if any(start < other_end and other_start < end for other_start, other_end in self._spans):
                out = out.clone()
            else:
                self._spans.append((start, end))
        return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


# ---------------------------------------------------------------- autograd bridge


@dataclass
class _Call:
    """What one forward pass needs to remember for its backward pass."""

    forward: Callable
    vjp: Callable | None
    static: dict
    types: KernelTypes
    saved: Any = None
    lane_broadcast_grads: bool = False  # the VJP takes a broadcast incoming gradient as one lane


def _new_scope(types: KernelTypes) -> None:
    """Start a new Dr.Jit scope: torch runs the backward of CUDA tensors on its own device thread,
    and Dr.Jit must see the arrays one thread built as ordered before what another builds from them."""
    dr.detail.new_scope(dr.backend_v(types.Float))


def _flat_inputs(tensors, types: KernelTypes) -> list:
    """One flat Dr.Jit array per tensor, sharing its memory."""
    return [types.Float(t.detach().reshape(-1).contiguous()) for t in tensors]


def _kernel_inputs(flats, tensors) -> list:
    """Flat arrays -> the kernel's layout (array, or tuple of columns for (N, k))."""
    return [_split(f, tuple(t.shape)) for f, t in zip(flats, tensors)]


def _outputs_tuple(result) -> tuple:
    """A kernel returns one output or a tuple of outputs."""
    return result if isinstance(result, tuple) else (result,)


def _is_columns(value) -> bool:
    """An (N, k) output: a list of k arrays or a Dr.Jit k-vector (e.g. Array3f)."""
    return isinstance(value, list) or (dr.is_array_v(value) and dr.depth_v(value) > 1)


def _run_forward(call: _Call, tensors):
    """The kernel on the tensors' memory; its output as a torch tensor, or a tuple of them when it
    has several (sets ``call.saved``)."""
    # No dr.suspend_grad here: a kernel may use forward-mode AD internally to build its Jacobian.
    _new_scope(call.types)
    inputs = _kernel_inputs(_flat_inputs(tensors, call.types), tensors)
    if call.vjp is None:
        outputs = _outputs_tuple(call.forward(*inputs, **call.static))
    else:
        result, call.saved = call.forward(*inputs, **call.static)
        outputs = _outputs_tuple(result)
    owners = _Owners(tensors, call.saved)
    results = tuple(_join(o, call.types, owners) for o in outputs)
    return results if len(results) > 1 else results[0]


class _KernelFunction(torch.autograd.Function):
    """A kernel call in the torch graph (forward and ``setup_context`` separate, as torch.func needs)."""

    @staticmethod
    def forward(call: _Call, *tensors):
        return _run_forward(call, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, *tensors = inputs
        ctx.call = call
        ctx.save_for_backward(*tensors)
        # An output the loss does not use gets None, not a tensor of zeros: the VJP skips its terms
        # (e.g. the propagator's free parameters per layer, (N, L, 8), when the loss uses the hits).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():
            # A backward pass that is itself differentiated (create_graph=True, torch.func.grad/vjp/jacrev):
            # the gradients come out of a node of their own whose derivative raises. It depends on
            # the inputs and the incoming gradients, so torch cannot prune it from a second derivative
            # (as it prunes ``once_differentiable``'s error node from autograd.grad(..., inputs)).
            grads = _KernelGradient.apply(ctx.call, needs, len(tensors), *tensors, *grad_outputs)
        else:
            grads = _kernel_gradients(ctx.call, tensors, grad_outputs, needs)
        return (None, *in_place_of_needed(grads, needs))

    @staticmethod
    def vmap(info, in_dims, call, *tensors):
        raise NotImplementedError("torch.func.vmap over a pyhybrid kernel is not supported: kernels are "
                                  "batched already (one lane per track or event), pass the batch as N")

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) through "
                                  "pyhybrid kernels is not supported: use reverse mode (backward, torch.func.vjp / jacrev)")


class _KernelGradient(torch.autograd.Function):
    """The backward pass of :class:`_KernelFunction` when it is recorded in a graph: differentiating
    it raises (the kernels are differentiable once). ``torch.func.vmap`` over it (``jacrev``) runs
    the VJP once per cotangent."""

    @staticmethod
    def forward(call: _Call, needs, n_tensors: int, *tensors_and_grads):
        tensors, grad_outputs = tensors_and_grads[:n_tensors], tensors_and_grads[n_tensors:]
        grads = _kernel_gradients(call, tensors, grad_outputs, needs)
        needed = [t for t, need in zip(tensors, needs) if need]
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, needed))  # tensors only

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("pyhybrid kernels are differentiable once: higher-order gradients (a derivative "
                           "of a gradient taken with create_graph=True or a torch.func transform) are not supported")

    @staticmethod
    def vmap(info, in_dims, call, needs, n_tensors, *tensors_and_grads):
        if any(dim is not None for dim in in_dims[3:3 + n_tensors]):
            raise NotImplementedError("torch.func.vmap over a pyhybrid kernel's inputs is not supported")
        grad_dims = in_dims[3 + n_tensors:]
        # ``apply``, not ``forward``: each result stays a node whose derivative raises, also for
        # autograd or transforms below this vmap (a loss on a jacrev Jacobian must not lose the kernel's part).
        per_cotangent = [
            _KernelGradient.apply(call, needs, n_tensors, *tensors_and_grads[:n_tensors],
                                  *(g if dim is None else g.select(dim, b)
                                    for g, dim in zip(tensors_and_grads[n_tensors:], grad_dims)))
            for b in range(info.batch_size)]
        return tuple(torch.stack(grads) for grads in zip(*per_cotangent)), 0


def _kernel_gradients(call: _Call, tensors, grad_outputs, needs) -> tuple:
    """The gradients of the inputs that ``needs``: one tensor (or None: zero) per needed input."""
    if all(g is None for g in grad_outputs):
        return tuple(None for need in needs if need)
    _new_scope(call.types)
    grads_out = tuple(None if g is None else _grad_output(g, call.types, call.lane_broadcast_grads)
                      for g in grad_outputs)
    if call.vjp is not None:
        grads_in = call.vjp(call.saved, grads_out, needs, **call.static)
    else:
        grads_in = _reverse_ad(call, tensors, grads_out, needs)
    owners = _Owners([*tensors, *grad_outputs], call.saved)
    return tuple(None if g is None else _grad_tensor(g, t, owners) for g, t, need in zip(grads_in, tensors, needs)
                 if need)


def _grad_output(g: torch.Tensor, types: KernelTypes, lane_broadcast: bool = False):
    """Incoming gradient -> kernel layout. A broadcast scalar (``out.sum().backward()`` gives
    one, all strides 0) stays a lazy Dr.Jit broadcast instead of N materialised copies, or with
    ``lane_broadcast`` one lane (see :func:`kernel_function`)."""
    g = g.detach()
    if g.dim() == 0 or any(stride != 0 for stride in g.stride()):
        return _split(types.Float(g.reshape(-1).contiguous()), tuple(g.shape))
    column = types.Float(g.reshape(-1)[:1].clone())
    if not lane_broadcast:
        column = column + dr.zeros(types.Float, g.shape[0])
    return column if g.dim() == 1 else (column,) * g.shape[1]


def _grad_tensor(g, like: torch.Tensor, owners: _Owners) -> torch.Tensor:
    """Gradient (array, tuple of columns, 1-lane broadcast or tensor) -> tensor like ``like``."""
    if isinstance(g, (tuple, list)):
        dr.eval(*g)
        columns = [c.torch() for c in g]
        if like.dim() == 2:  # a column from a one-lane incoming gradient alone (lane_broadcast_grads) has one lane
            columns = [c.expand(like.shape[0]) if c.numel() == 1 else c for c in columns]
        out = torch.stack(columns, dim=-1)
    elif isinstance(g, torch.Tensor):
        out = g.clone()  # the VJP's own tensor: it may keep and reuse it
    else:
        dr.eval(g)
        out = owners.hand_over(g)
    if out.numel() == 1 and like.numel() != 1:
        out = out.reshape(()).expand(like.shape)
    elif like.numel() == 1 and out.numel() != 1:
        out = out.sum()  # per-lane contributions to a broadcast parameter
    return out.reshape(like.shape).to(like.dtype)


def _reverse_ad(call: _Call, tensors, grads_out, needs):
    """VJP by re-running the kernel under Dr.Jit reverse-mode AD."""
    flats = _flat_inputs(tensors, call.types)
    for flat, need in zip(flats, needs):
        if need:
            dr.enable_grad(flat)
    inputs = _kernel_inputs(flats, tensors)
    outputs = _outputs_tuple(call.forward(*inputs, **call.static))
    for out, grad in zip(outputs, grads_out):
        if grad is None:
            continue
        if isinstance(out, Leading):  # zero gradient for the entries torch did not get
            padded = dr.zeros(type(grad), dr.width(out.array))
            dr.scatter(padded, grad, dr.arange(dr.uint32_array_t(type(grad)), out.length))
            out, grad = out.array, padded
        if _is_columns(out):
            for column, column_grad in zip(out, grad):
                _seed(column, column_grad)
        else:
            _seed(out, grad)
    dr.traverse(dr.ADMode.Backward)
    grads = [dr.grad(f) if need else None for f, need in zip(flats, needs)]
    dr.eval(*[g for g in grads if g is not None])
    return grads


def _seed(output, grad) -> None:
    if dr.grad_enabled(output):
        dr.set_grad(output, grad)
        dr.enqueue(dr.ADMode.Backward, output)


def in_place_of_needed(gradients, needs) -> list:
    """The gradients of the inputs that need one (in input order), at their places in a list over
    all inputs, None elsewhere."""
    gradients = iter(gradients)
    return [next(gradients) if need else None for need in needs]


class LeastRecentlyUsed(OrderedDict):
    """At most ``limit`` entries, least recently used first: the modules' caches of ``dr.freeze``
    functions, each of which holds its recorded kernels."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_or_make(self, key, make: Callable[[], Any]):
        """The entry for ``key`` (``make()`` when there is none), now the most recently used."""
        entry = self.pop(key) if key in self else make()
        self[key] = entry
        if len(self) > self.limit:
            self.popitem(last=False)
        return entry


def eager_under_compile(function: Callable) -> Callable:
    """``torch.compiler.disable(function)`` without importing ``torch._dynamo`` (~1.4 s) at import:
    under ``torch.compile`` a call is one graph break and runs eagerly (Dynamo cannot trace into
    Dr.Jit, and the input checks read tensor values).

    Until Dynamo is loaded nothing can be compiling, and the wrapper calls ``function`` directly;
    afterwards through torch's own lazily made ``torch.compiler.disable`` wrapper, which Dynamo
    skips as torch code. The wrapper carries the mark of ``torch.compiler.disable``'s wrappers, so
    that Dynamo skips it too instead of inlining it.
    """
    disabled = torch._disable_dynamo(function)  # imports Dynamo on its first call, not here

    @functools.wraps(function)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return function(*args, **kwargs)
        return disabled(*args, **kwargs)

    call._torchdynamo_disable = True
    return call


def kernel_function(forward: Callable, *, vjp: Callable | None = None, lane_broadcast_grads: bool = False,
                    **static) -> Callable:
    """Make a differentiable torch callable from a Dr.Jit kernel.

    Parameters
    ----------
    forward:
        ``forward(*inputs, **static)``. Each input is the Dr.Jit form of one
        tensor argument (see the module docstring for the layout). Without
        ``vjp`` it returns an output or a tuple of outputs, each an array
        (-> tensor ``(N,)``) or a *list* of k arrays / a Dr.Jit k-vector such
        as ``Array3f`` (-> tensor ``(N, k)``). With ``vjp`` it returns
        ``(outputs, saved)``.
    vjp:
        Optional ``vjp(saved, grad_outputs, needs_input_grad, **static)``;
        ``grad_outputs`` has one entry per output in the input layout (array,
        or tuple of column arrays for an (N, k) output), None for an output that
        received no gradient (the loss does not depend on it). It returns one
        gradient per input (Dr.Jit array, tuple/list of columns, torch tensor,
        or None); for a 0-d input a per-lane gradient is summed over lanes. When omitted, Dr.Jit reverse-mode AD supplies it.
    lane_broadcast_grads:
        The ``vjp`` takes an incoming gradient that is the same for every lane
        (``out.sum().backward()`` gives one) as a one-lane array, which Dr.Jit
        broadcasts in the expressions that use it (one kernel fewer, and no
        N-lane array of copies written and read back). Otherwise it gets N lanes.
    static:
        Non-differentiable keyword arguments passed to ``forward``/``vjp``
        (seeds, step counts, flags). Kernels with randomness must take their
        seed here so that the backward pass reproduces the forward.

    Returns
    -------
    ``apply(*tensors)``: all tensors must be float32 or float64 with one common
    dtype and device; the result has their dtype and device. When grad mode is off
    or no input requires grad, the kernel runs without an autograd node.
    """

    @eager_under_compile
    def apply(*tensors: torch.Tensor, **more_static):
        if not tensors:
            raise ValueError("kernel_function needs at least one tensor input")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() > 2:
                raise ValueError(f"input {i} must have shape (), (N,) or (N, k), got {tuple(t.shape)}")
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=1):
            if t.dtype != first.dtype:
                raise TypeError(f"input {i} has dtype {t.dtype}, input 0 has {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"input {i} is on {t.device}, input 0 on {first.device}")
        call = _Call(forward, vjp, {**static, **more_static}, types_for(first.device, first.dtype),
                     lane_broadcast_grads=lane_broadcast_grads)
        # torch.func transforms (whose wrapped tensors Dr.Jit cannot read) and forward-mode dual tensors
        # go through the Function's rules (the latter to its error, not to a result without tangents).
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or \
                torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
            return _KernelFunction.apply(call, *tensors)
        # Nothing to differentiate: the kernel without torch.autograd.Function's bookkeeping
        # (0.05-0.15 ms a call, ~10 % of a 4096-event matrix-element forward on 2 cores).
        return _run_forward(call, tensors)

    return apply
