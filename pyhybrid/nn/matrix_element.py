"""Differentiable LO matrix elements, cross sections and phase space as torch modules.

The physics is in :mod:`pyhybrid.kernels.matrix_elements` and
:mod:`pyhybrid.kernels.phase_space` (Dr.Jit); these modules validate their
inputs, hold the Standard-Model inputs as ``nn.Parameter`` s and call the
kernels through :func:`pyhybrid.engine.kernel_function`, so gradients flow to
the parameters and to the momenta/angles (Dr.Jit reverse-mode AD).

Units: GeV for energies, momenta and masses; cross sections in pb.
Momenta: tensors of shape (N, n_particles, 4), rows (E, px, py, pz), incoming
particles first (see :data:`pyhybrid.kernels.matrix_elements.PROCESSES`).

Modules
-------
* :class:`MatrixElement` -- <|M|^2> of N phase-space points.
* :class:`DifferentialCrossSection` -- d sigma / d Phi_n = (hbar c)^2 <|M|^2> / (2 s) [pb]
  (per unit of Lorentz-invariant phase space, normalised as in ``phase_space``).
* :class:`TwoBodyCrossSection` -- d sigma / d cos theta [pb] of a 2 -> 2 process
  at given sqrt(s), and its integral sigma (Gauss-Legendre).
Functions :func:`two_body_momenta` and :func:`rambo_momenta` give differentiable
phase-space points.

Parameters (all 0-d ``nn.Parameter``, cast to the dtype/device of the input in
``forward``): ``mz``, ``gamma_z`` [GeV], ``alpha`` (or ``gf`` [GeV^-2] in the
G_mu scheme, where alpha = sqrt(2) G_F mZ^2 sin^2 cos^2 / pi; G_F =
``pyhybrid.kernels.electroweak.GF`` = 1.1663788e-5), ``sin2_theta_w``,
``alpha_s``, ``top_mass`` [GeV]. Freeze any with ``requires_grad_(False)``.
"""
from __future__ import annotations

import math

import drjit as dr
import numpy as np
import torch
from torch import nn

from pyhybrid.engine import (KERNEL_DTYPES, LeastRecentlyUsed, autocast_input, check_tensor, eager_under_compile,
                             empty_batch, in_place_of_needed, kernel_function)
from pyhybrid.kernels import dual as dm
from pyhybrid.kernels.backend import any_lane_flag, check_integer, types_of
from pyhybrid.kernels.electroweak import DEFAULTS, SMParameters, alpha_from_gf, check_parameter_value
from pyhybrid.kernels.lorentz import FourVector
from pyhybrid.kernels.matrix_elements import GEV2_TO_PB, get_process
from pyhybrid.kernels.phase_space import flux_factor, incoming_momenta, kinematic_residuals, rambo, two_body
from pyhybrid.kernels.vegas import uniform_points

__all__ = ["MatrixElement", "DifferentialCrossSection", "TwoBodyCrossSection", "two_body_momenta",
           "rambo_momenta"]


# ---------------------------------------------------------------- kernels (Dr.Jit side)


def _sm_parameters(mz, gamma_z, coupling, sin2_theta_w, alpha_s, top_mass, scheme: str) -> SMParameters:
    """Kernel parameters from the six inputs in module order (the coupling is alpha or G_F)."""
    alpha = coupling if scheme == "alpha" else alpha_from_gf(coupling, mz, sin2_theta_w)
    return SMParameters(mz=mz, gamma_z=gamma_z, alpha=alpha, sin2_theta_w=sin2_theta_w, alpha_s=alpha_s,
                        top_mass=top_mass)


def _matrix_element_value(vectors, proc, coefficients, output):
    """The value from the process's parameter-only coefficients (plain or Duals)."""
    value = proc.events(vectors, coefficients)
    if output == "dsigma":
        s = 2.0 * vectors[0].dot(vectors[1])
        value = value * ((GEV2_TO_PB * 0.5) / s)
    return value


def _matrix_element_forward(flat, *parameters, process, flavour, scheme, output, tolerance):
    """Forward pass of :class:`MatrixElement`: one kernel for the value and, with a ``tolerance``,
    the input validation (:func:`_checked_value`, replayed by ``dr.freeze``, see :func:`_frozen`);
    raises ValueError naming the first bad event. Returns (value, inputs): the backward pass
    recomputes what it needs from the inputs (see :func:`_matrix_element_vjp`)."""
    value, *failed = _frozen(_checked_value, (flat, *parameters), process=process, flavour=flavour,
                             scheme=scheme, output=output, tolerance=tolerance)(flat, *parameters)
    if failed and failed[0][0] != 0:
        _raise_for_bad_momenta(flat, parameters, process, scheme, tolerance)
    return value, (flat, *parameters)


def _checked_value(flat, *parameters, process, flavour, scheme, output, tolerance):
    """[value] or, with a ``tolerance``, [value, flag]: the flag (one lane) is 1 if some event fails
    the checks of :func:`_bad_momenta`, computed in the value's kernel."""
    proc = get_process(process)
    vectors = _four_vectors(_four_vector_columns(flat, proc.n_particles))
    params = _sm_parameters(*parameters, scheme)
    value = _matrix_element_value(vectors, proc, proc.coefficients_of(params, flavour), output)
    if tolerance is None:
        dr.eval(value)
        return [value]
    failed = any_lane_flag(_bad_momenta(vectors, proc, params, tolerance)[0], type(value))
    dr.eval(value, failed)
    return [value, failed]


def _four_vectors(columns) -> list:
    """(E, px, py, pz) columns of n particles -> n FourVectors."""
    return [FourVector.from_columns(columns[i: i + 4]) for i in range(0, len(columns), 4)]


def _matrix_element_vjp(saved, grad_outputs, needs, *, tolerance, process, flavour, scheme, output):
    """Backward pass of :class:`MatrixElement`: :func:`_matrix_element_gradients`, replayed by
    ``dr.freeze`` (see :func:`_frozen`)."""
    flat, *parameters = saved
    arrays = (flat, grad_outputs[0], *parameters)
    gradients = _frozen(_matrix_element_gradients, arrays, needs=tuple(needs), process=process, flavour=flavour,
                        scheme=scheme, output=output)(*arrays)
    return in_place_of_needed(gradients, needs)


class _Frozen:
    """A kernel function with fixed keyword arguments under ``dr.freeze`` (see :func:`_frozen`)."""

    def __init__(self, function, static: dict):
        self.function, self.static = function, static
        # A bound method, not a closure: dr.freeze walks what a closure captures on every call.
        self.run = dr.freeze(self._call)

    def _call(self, *arrays):
        return self.function(*arrays, **self.static)


# Frozen kernel functions by (function, array types and widths, keyword arguments).
_FROZEN = LeastRecentlyUsed(32)


def _frozen(function, arrays, **static):
    """``function`` with the keyword arguments ``static``, recorded with ``dr.freeze`` on the first
    call for this configuration and these array types and widths (the ``arrays`` it will be called
    with), and replayed on later calls.

    Tracing in Python costs more than the kernels below ~10^5 events (MatrixElement: ~0.3 ms for
    the value and validation, 1.5-3 ms for the backward's parameter duals and reverse-mode graph);
    a replay skips it. Everything the trace depends on is an input (momenta, angles, parameters,
    incoming gradient) or part of the key, which holds the widths because the kernels allocate
    arrays of the batch size (a recorded allocation keeps its size on replay) and treat one-lane
    inputs as broadcast. Turned off with Dr.Jit's ``KernelFreezing`` flag.
    """
    key = (function, tuple((type(a), dr.width(a)) for a in arrays), tuple(sorted(static.items())))
    return _FROZEN.get_or_make(key, lambda: _Frozen(function, static)).run


def _matrix_element_gradients(flat, weight, *parameters, needs, process, flavour, scheme, output):
    """Gradients of sum(weight * value) with respect to the flat momenta and the ``needs``-selected
    parameters (the arrays of those that need one, in input order), in one kernel that recomputes the
    value from the momenta. ``weight``: the incoming gradient, per event or one lane for all.

    Parameters: forward mode. Each parameter that needs a gradient is one Dual column; the process's
    parameter-only coefficients and their derivatives are evaluated first (a one-lane kernel), so that
    per event only the per-event part carries the derivatives (~40 operations for the four
    electroweak parameters of e+e- -> mu+mu-, against ~170 for a per-event reverse sweep).
    Momenta: Dr.Jit reverse-mode AD of the per-event part alone, the coefficients being constants
    of it (not recomputed and differentiated per event).
    """
    proc = get_process(process)
    needed = [i for i, need in enumerate(needs[1:]) if need]
    duals = [dm.Dual(p, [1.0 if j == i else None for j in needed]) for i, p in enumerate(parameters)]
    coefficients = proc.coefficients_of(_sm_parameters(*duals, scheme), flavour)
    dr.eval(*dm.arrays(coefficients))
    columns = _four_vector_columns(flat, proc.n_particles)
    if needs[0]:
        columns = tuple(type(c)(c) for c in columns)  # AD leaves: their gradients need no scatter into flat
        dr.enable_grad(columns)
    value = _matrix_element_value(_four_vectors(columns), proc, coefficients, output)
    grads = []
    if needs[0]:
        dr.set_grad(value.value, weight)
        dr.enqueue(dr.ADMode.Backward, value.value)
        dr.traverse(dr.ADMode.Backward)
        grads.append(_interleave_four_vectors([dr.grad(c) for c in columns]))
    for column in range(len(needed)):
        derivative = value.tangents[column]
        # Block sums of a 1-element input's gradient: the bridge adds them up (in torch: no more kernels).
        grads.append(dr.zeros(type(weight), 1) if derivative is None else _block_sums(weight * derivative))
    dr.eval(*grads)  # one kernel reading the momenta
    return grads


def _bad_momenta(vectors, proc, params, tolerance):
    """(bad, below, unbalanced, s, threshold, conservation, off_shell, masses): ``bad`` per event,
    True below threshold, off shell or not conserving momentum, with the masks and quantities it was
    decided on.

    Bounds: sqrt(s) > sum of outgoing masses; max |sum p_in - sum p_out| <= tol sqrt(s);
    |p_i^2 - m_i^2| <= tol s, and s finite. Written without divisions or square roots (they
    would cost more than the matrix element); NaN fails every comparison. An infinite component
    makes s infinite (or NaN), or, in an outgoing particle only, the conservation residual.
    """
    with dr.suspend_grad():
        outgoing = proc.outgoing_masses(params)
        masses = [0.0, 0.0] + outgoing
        threshold = sum(outgoing, 0.0)
        s, conservation, off_shell = kinematic_residuals(vectors, masses)
        below = ~((s > threshold * threshold) & (s < math.inf))
        unbalanced = ~(conservation * conservation <= (tolerance * tolerance) * s)
        bad = below | unbalanced
        for residual in off_shell:
            bad = bad | ~(residual <= tolerance * s)
        return bad, below, unbalanced, s, threshold, conservation, off_shell, masses


def _raise_for_bad_momenta(flat, parameters, process, scheme, tolerance) -> None:
    """Raise ValueError naming the first event of ``flat`` that :func:`_bad_momenta` rejects (traced,
    after the forward kernel's flag said there is one)."""
    proc = get_process(process)
    vectors = _four_vectors(_four_vector_columns(flat, proc.n_particles))
    bad, below, unbalanced, s, threshold, conservation, off_shell, masses = _bad_momenta(
        vectors, proc, _sm_parameters(*parameters, scheme), tolerance)
    i = int(dr.compress(bad)[0])

    def at(array) -> float:  # one lane of a (possibly broadcast) Dr.Jit array
        return float(dr.ravel(array + 0.0 * s)[i])

    s_i = at(s)
    if below[i]:
        raise ValueError(f"momenta: event {i} has s = {s_i:.6g} GeV^2, sqrt(s) not above the "
                         f"{proc.name} threshold {at(threshold):.6g} GeV (or not finite)")
    if unbalanced[i]:
        raise ValueError(f"momenta: event {i} violates energy-momentum conservation by "
                         f"{at(conservation) / math.sqrt(s_i):.3g} sqrt(s) (tolerance {tolerance:g}), "
                         "or is not finite")
    j = next(j for j, r in enumerate(off_shell) if not at(r) <= tolerance * s_i)
    raise ValueError(f"momenta: particle {j} of event {i} has mass^2 {at(vectors[j].mass2()):.6g} GeV^2 but "
                     f"must be on shell with mass {at(masses[j]):.6g} GeV (|p^2 - m^2| = "
                     f"{at(off_shell[j]) / s_i:.3g} s, tolerance {tolerance:g})")


def _two_body_cross_section_kernel(cos_theta, sqrt_s, *parameters, process, flavour, scheme):
    """d sigma / d cos theta [pb] (integrated over phi) at (sqrt_s, cos_theta)."""
    proc = get_process(process)
    params = _sm_parameters(*parameters, scheme)
    mass_a, mass_b = proc.outgoing_masses(params)
    p_a, p_b, density = two_body(sqrt_s, mass_a, mass_b, cos_theta, 0.0 * cos_theta)
    vectors = [*incoming_momenta(sqrt_s), p_a, p_b]
    return GEV2_TO_PB * flux_factor(sqrt_s) * 2.0 * math.pi * density * proc.squared(vectors, params, flavour)


def _full_width(value, like):
    return value + dr.zeros(type(like), dr.width(like))


def _two_body_momenta_kernel(sqrt_s, mass_a, mass_b, cos_theta, phi):
    p_a, p_b, density = two_body(sqrt_s, mass_a, mass_b, cos_theta, phi)
    vectors = [*incoming_momenta(sqrt_s), p_a, p_b]
    return [_full_width(c, cos_theta) for v in vectors for c in v.columns()], _full_width(density, cos_theta)


def _rambo_kernel(sqrt_s, masses, *, n_events, n_out, seed):
    types = types_of(sqrt_s)
    uniforms = uniform_points(types, n_events, 4 * n_out, seed)
    mass_list = [dr.gather(type(masses), masses, i) for i in range(n_out)]
    outgoing, weight = rambo(sqrt_s, mass_list, [1.0 - u for u in uniforms])
    like = uniforms[0]
    vectors = [*incoming_momenta(sqrt_s), *outgoing]
    return [_full_width(c, like) for v in vectors for c in v.columns()], _full_width(weight, like)


def _four_vector_columns(flat, n_vectors: int) -> tuple:
    """Flat (N * n_vectors * 4) array in (N, n_vectors, 4) layout -> 4 n_vectors columns of N lanes.

    One gather of whole rows: Dr.Jit turns it into aligned packet loads and a
    transpose (on the LLVM backend about twice as fast as strided scalar gathers)."""
    types = types_of(flat)
    k = 4 * n_vectors
    n = dr.width(flat) // k
    rows = dr.gather(types.ArrayX, flat, dr.arange(types.UInt32, n), shape=(k, n))
    return tuple(rows[j] for j in range(k))


def _interleave_four_vectors(columns) -> object:
    """Inverse of :func:`_four_vector_columns`: one packet scatter of whole rows into a flat array.

    A single scatter call, so that the gradient kernel writing it is one kernel
    (a scatter per four-vector launched one kernel each, re-running the AD graph)."""
    types = types_of(columns[0])
    n = dr.width(columns[0])
    flat = dr.empty(types.Float, n * len(columns))
    dr.scatter(flat, types.ArrayX(columns), dr.arange(types.UInt32, n))
    return flat


#: Lanes per partial sum of a broadcast input's gradient: a divisor of the LLVM backend's work-unit
#: size for large batches, so each partial sum is accumulated by one thread in a fixed order. Below
#: ~65 000 lanes Dr.Jit cuts the batch into smaller work units, a partial sum may then be shared by
#: threads, and under load the last bits can vary between runs (float64: 2e-16 at 5000 events).
_SUM_BLOCK = 4096


def _block_sums(per_lane):
    """Partial sums of a per-lane gradient over blocks of lanes, scatter-reduced inside the
    gradient kernel: the N-lane array is never written to memory (about 1.5x faster than
    evaluating it and reducing it in a second pass)."""
    types = types_of(per_lane)
    n = dr.width(per_lane)
    partial = dr.zeros(types.Float, (n + _SUM_BLOCK - 1) // _SUM_BLOCK)
    dr.scatter_reduce(dr.ReduceOp.Add, partial, per_lane, dr.arange(types.UInt32, n) // _SUM_BLOCK)
    return partial


def _lane_parallel(kernel):
    """(forward, vjp) for :func:`kernel_function` of a ``kernel`` with one output, recorded and
    replayed by ``dr.freeze`` (see :func:`_frozen`), with a cheaper reverse pass than the generic
    one (:func:`_lane_parallel_gradients`)."""

    def forward(*inputs, **static):
        return _frozen(kernel, inputs, **static)(*inputs), inputs

    def vjp(inputs, grad_outputs, needs, **static):
        arrays = (*inputs, grad_outputs[0])
        return in_place_of_needed(
            _frozen(_lane_parallel_gradients, arrays, kernel=kernel, needs=tuple(needs), **static)(*arrays), needs)

    return forward, vjp


def _lane_parallel_gradients(*inputs_and_weight, kernel, needs, **static):
    """Gradients of sum(weight * kernel(*inputs)) for the inputs that ``needs`` (in input order);
    ``weight``: the incoming gradient, per lane or one lane for all.

    ``kernel`` runs again under Dr.Jit reverse AD with every 1-lane (broadcast) input widened to N
    lanes, so that its per-lane gradient is reduced in partial sums inside the gradient kernel
    instead of being accumulated at each broadcast. All gradients come out of one fused kernel; the
    bridge adds up the block sums of 1-element inputs (in torch: no more kernels).
    """
    *inputs, weight = inputs_and_weight
    width = max(dr.width(x) for x in inputs)
    leaves = []
    for x, need in zip(inputs, needs):
        leaf = x + dr.zeros(type(x), width) if dr.width(x) == 1 else type(x)(x)
        if need:
            dr.enable_grad(leaf)
        leaves.append(leaf)
    output = kernel(*leaves, **static)
    if dr.grad_enabled(output):  # not when only parameters the process does not use need gradients
        dr.set_grad(output, weight)
        dr.enqueue(dr.ADMode.Backward, output)
        dr.traverse(dr.ADMode.Backward)
    grads = [_block_sums(dr.grad(leaf)) if dr.width(x) == 1 else dr.grad(leaf)
             for x, leaf, need in zip(inputs, leaves, needs) if need]
    dr.eval(*grads)  # one kernel for all gradients
    return grads


# Module-level kernel functions (the process, flavour and scheme are passed per call): modules holding
# no closures can be saved whole (torch.save) and deep-copied.
_MATRIX_ELEMENT = kernel_function(_matrix_element_forward, vjp=_matrix_element_vjp, lane_broadcast_grads=True)
_two_body_forward, _two_body_vjp = _lane_parallel(_two_body_cross_section_kernel)
_TWO_BODY_CROSS_SECTION = kernel_function(_two_body_forward, vjp=_two_body_vjp, lane_broadcast_grads=True)


# ---------------------------------------------------------------- modules


def _parameter(value: float) -> nn.Parameter:
    # float64 so that the inputs keep full precision; forward casts to the input dtype.
    return nn.Parameter(torch.tensor(float(value), dtype=torch.float64))


class _ProcessModule(nn.Module):
    """Shared parameter handling and validation of the process modules."""

    def __init__(self, process: str, flavour: str | None = None, *, mz: float = DEFAULTS.mz,
                 gamma_z: float = DEFAULTS.gamma_z, alpha: float | None = None, gf: float | None = None,
                 sin2_theta_w: float = DEFAULTS.sin2_theta_w, alpha_s: float = DEFAULTS.alpha_s,
                 top_mass: float = DEFAULTS.top_mass, **unknown):
        super().__init__()
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown parameter(s) {sorted(unknown)}; the Standard-Model "
                            "inputs are mz, gamma_z, alpha (or gf), sin2_theta_w, alpha_s, top_mass")
        self.process = get_process(process)
        self.flavour = self.process.check_flavour(flavour)
        if alpha is not None and gf is not None:
            raise ValueError("give either alpha or gf (G_mu scheme), not both")
        self.scheme = "gmu" if gf is not None else "alpha"
        values = {"mz": mz, "gamma_z": gamma_z, "sin2_theta_w": sin2_theta_w, "alpha_s": alpha_s,
                  "top_mass": top_mass}
        values["gf" if self.scheme == "gmu" else "alpha"] = gf if gf is not None else (
            DEFAULTS.alpha if alpha is None else alpha)
        for name, value in values.items():
            check_parameter_value(name, value)
            self.register_parameter(name, _parameter(value))

    @property
    def coupling(self) -> nn.Parameter:
        """alpha, or G_F in the G_mu scheme."""
        return self.gf if self.scheme == "gmu" else self.alpha

    def effective_alpha(self) -> torch.Tensor:
        """alpha used in the matrix elements (derived from G_F in the G_mu scheme)."""
        if self.scheme == "alpha":
            return self.alpha
        return alpha_from_gf(self.gf, self.mz, self.sin2_theta_w)

    def _parameter_tensors(self, like: torch.Tensor) -> list[torch.Tensor]:
        for name in ("mz", "gamma_z", "sin2_theta_w", "alpha_s", "top_mass"):
            check_parameter_value(name, float(getattr(self, name).detach()))
        check_parameter_value("gf" if self.scheme == "gmu" else "alpha", float(self.coupling.detach()))
        params = (self.mz, self.gamma_z, self.coupling, self.sin2_theta_w, self.alpha_s, self.top_mass)
        return [p.to(dtype=like.dtype, device=like.device) for p in params]

    def outgoing_masses(self) -> list[float]:
        """Outgoing masses [GeV] at the current parameter values."""
        top_mass = float(self.top_mass.detach())
        return [float(m) for m in self.process.outgoing_masses(SMParameters(top_mass=top_mass))]

    def extra_repr(self) -> str:
        return f"process={self.process.name!r}, flavour={self.flavour!r}, scheme={self.scheme!r}"


class MatrixElement(_ProcessModule):
    """<|M|^2> (spin/colour summed and averaged) of a LO process at given momenta.

    Parameters
    ----------
    process: 'ee_mumu', 'ee_qq', 'ee_qqg', 'qq_tt' or 'gg_tt'.
    flavour: quark flavour for ee_qq/ee_qqg ('d', 'u', 's', 'c', 'b' or 'all' = sum,
        the default) and qq_tt (initial quark; default 'u'); None otherwise.
    mz, gamma_z, alpha | gf, sin2_theta_w, alpha_s, top_mass: initial parameter values.
    tolerance: relative tolerance of the input checks: |sum p_in - sum p_out| <= tol sqrt(s)
        per component and |p_i^2 - m_i^2| <= tol s (incoming particles massless);
        also sqrt(s) above the threshold and all momenta finite.
    validate: run these checks (default True; fused into the matrix-element kernel,
        they cost one reduction over the events).

    ``forward(momenta)``: momenta (N, n_particles, 4) [GeV], float32/float64 (float16/bfloat16
    under ``torch.autocast``: computed in float32), cpu or cuda -> (N,) [dimensionless for
    2 -> 2, GeV^-2 for 2 -> 3].
    """

    _output = "squared"

    def __init__(self, process: str, flavour: str | None = None, *, tolerance: float = 1e-5,
                 validate: bool = True, **parameters):
        super().__init__(process, flavour, **parameters)
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance}")
        self.tolerance = tolerance
        self.validate = validate

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, momenta: torch.Tensor) -> torch.Tensor:
        n = self.process.n_particles
        momenta = autocast_input(momenta)
        # NaN/inf are caught by the fused validation kernel, cheaper than a torch pass over the input.
        check_tensor(momenta, "momenta", shape=(None, n, 4), finite=not self.validate)
        if momenta.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"momenta must be float32 or float64, got {momenta.dtype}")
        parameters = self._parameter_tensors(momenta)
        if momenta.shape[0] == 0:
            return empty_batch((0,), momenta, *parameters)
        return _MATRIX_ELEMENT(momenta.reshape(-1), *parameters, process=self.process.name,
                               flavour=self.flavour, scheme=self.scheme, output=self._output,
                               tolerance=self.tolerance if self.validate else None)


class DifferentialCrossSection(MatrixElement):
    """d sigma / d Phi_n = (hbar c)^2 <|M|^2> / (2 s) [pb] at given momenta (see :class:`MatrixElement`).

    Multiply by a phase-space weight (e.g. from :func:`rambo_momenta`) and average
    to get sigma in pb.
    """

    _output = "dsigma"


class TwoBodyCrossSection(_ProcessModule):
    """d sigma / d cos theta [pb] of a 2 -> 2 process (azimuth integrated).

    theta is the angle between particle 1 (e-, quark or gluon along +z) and the
    first outgoing particle (mu-, q or t). Same parameters as :class:`MatrixElement`.

    ``forward(cos_theta, sqrt_s)``: cos_theta (N,) in [-1, 1]; sqrt_s a 0-d or (N,)
    tensor [GeV] above threshold -> (N,) [pb].
    """

    def __init__(self, process: str, flavour: str | None = None, **parameters):
        super().__init__(process, flavour, **parameters)
        if self.process.n_out != 2:
            raise ValueError(f"TwoBodyCrossSection needs a 2 -> 2 process, got {self.process.name!r}")

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, cos_theta: torch.Tensor, sqrt_s: torch.Tensor | float) -> torch.Tensor:
        cos_theta, sqrt_s = autocast_input(cos_theta), autocast_input(sqrt_s)
        check_tensor(cos_theta, "cos_theta", shape=(None,))
        if cos_theta.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"cos_theta must be float32 or float64, got {cos_theta.dtype}")
        if bool((cos_theta.detach().abs() > 1).any()):
            raise ValueError("cos_theta must lie in [-1, 1]")
        sqrt_s = _energy_tensor(sqrt_s, cos_theta)
        threshold = sum(self.outgoing_masses())
        if bool((sqrt_s.detach() <= threshold).any()):
            raise ValueError(f"sqrt_s = {float(sqrt_s.detach().min()):.6g} GeV is below the {self.process.name} "
                             f"threshold {threshold:.6g} GeV")
        parameters = self._parameter_tensors(cos_theta)
        if cos_theta.shape[0] == 0:
            return empty_batch((0,), cos_theta, sqrt_s, *parameters)
        return _TWO_BODY_CROSS_SECTION(cos_theta, sqrt_s, *parameters,
                                       process=self.process.name, flavour=self.flavour, scheme=self.scheme)

    def cross_section(self, sqrt_s: torch.Tensor | float, n_nodes: int = 64,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """sigma [pb] at ``sqrt_s`` (0-d) by ``n_nodes``-point Gauss-Legendre quadrature in cos theta.

        Exact for e+e- -> f fbar with n_nodes >= 2 (a quadratic polynomial in cos theta);
        the t tbar integrands are smooth rational functions, converging exponentially, but
        g g -> t tbar peaks at |cos theta| -> 1 with a width ~ 2 m_t^2 / s: 64 nodes are
        accurate to 1e-14 at 1 TeV, 5e-7 at 3 TeV and 3 % low at 14 TeV, where 256 nodes
        are needed (compare two node counts when far above threshold).
        """
        if isinstance(sqrt_s, torch.Tensor) and sqrt_s.dim() != 0:
            raise ValueError(f"sqrt_s must be a number or a 0-d tensor, got shape {tuple(sqrt_s.shape)}")
        nodes, weights = np.polynomial.legendre.leggauss(check_integer(n_nodes, "n_nodes", 1))
        device = self.mz.device
        nodes = torch.as_tensor(nodes, dtype=dtype, device=device)
        weights = torch.as_tensor(weights, dtype=dtype, device=device)
        return (weights * self(nodes, _energy_tensor(sqrt_s, nodes))).sum()


def _energy_tensor(sqrt_s, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(sqrt_s, torch.Tensor):
        sqrt_s = torch.tensor(float(sqrt_s), dtype=like.dtype, device=like.device)
    check_tensor(sqrt_s, "sqrt_s", dtype=like.dtype, device=like.device)
    if sqrt_s.dim() not in (0, 1) or (sqrt_s.dim() == 1 and sqrt_s.shape[0] != like.shape[0]):
        raise ValueError(f"sqrt_s must be 0-d or have shape ({like.shape[0]},), got {tuple(sqrt_s.shape)}")
    return sqrt_s


# ---------------------------------------------------------------- phase space


_two_body_function = kernel_function(_two_body_momenta_kernel)


def two_body_momenta(sqrt_s, mass_a, mass_b, cos_theta: torch.Tensor, phi: torch.Tensor):
    """Differentiable 2 -> 2 phase-space points with explicit angles (centre-of-mass frame).

    sqrt_s, mass_a, mass_b: 0-d tensors or floats [GeV] (sqrt_s > mass_a + mass_b);
    cos_theta, phi: (N,) angles of outgoing particle a.
    Returns (momenta (N, 4, 4): beams along +-z then a, b; density (N,) = dPhi_2/(dcos theta dphi)).
    """
    check_tensor(cos_theta, "cos_theta", shape=(None,), dtype=KERNEL_DTYPES)
    check_tensor(phi, "phi", shape=cos_theta.shape, dtype=cos_theta.dtype, device=cos_theta.device)
    if bool((cos_theta.detach().abs() > 1).any()):
        raise ValueError("cos_theta must lie in [-1, 1]")
    sqrt_s, mass_a, mass_b = (_scalar_tensor(v, name, cos_theta)
                              for v, name in ((sqrt_s, "sqrt_s"), (mass_a, "mass_a"), (mass_b, "mass_b")))
    sqrt_s_value, mass_a_value, mass_b_value = (float(v.detach()) for v in (sqrt_s, mass_a, mass_b))
    if mass_a_value < 0 or mass_b_value < 0:
        raise ValueError("masses must be non-negative")
    if sqrt_s_value <= mass_a_value + mass_b_value:
        raise ValueError(f"sqrt_s = {sqrt_s_value:.6g} GeV is below threshold mass_a + mass_b = "
                         f"{mass_a_value + mass_b_value:.6g} GeV")
    inputs = (sqrt_s, mass_a, mass_b, cos_theta, phi)
    if cos_theta.shape[0] == 0:
        return empty_batch((0, 4, 4), *inputs), empty_batch((0,), *inputs)
    columns, density = _two_body_function(*inputs)
    return columns.reshape(-1, 4, 4), density


def rambo_momenta(sqrt_s, masses: torch.Tensor, n_events: int, seed: int = 0):
    """Differentiable RAMBO phase-space points (random angles from ``seed``, reproducible).

    sqrt_s: 0-d tensor or float [GeV]; masses: (n_out,) tensor [GeV] (zeros for massless),
    sum(masses) < sqrt_s; gradients flow to both.
    Returns (momenta (n_events, 2 + n_out, 4): beams along +-z first;
    weight (n_events,) [GeV^(2 n_out - 4)] with E[weight f] = integral f dPhi_n), in the dtype of
    ``masses`` (the points are computed in float64 in either case).
    """
    check_tensor(masses, "masses", shape=(None,))
    if masses.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"masses must be float32 or float64, got {masses.dtype}")
    n_out = masses.shape[0]
    if n_out < 2:
        raise ValueError(f"masses must list at least 2 outgoing particles, got {n_out}")
    if bool((masses.detach() < 0).any()):
        raise ValueError("masses must be non-negative")
    n_events = check_integer(n_events, "n_events", 1)
    sqrt_s = _scalar_tensor(sqrt_s, "sqrt_s", masses)
    if float(sqrt_s.detach()) <= float(masses.detach().sum()):
        raise ValueError(f"sqrt_s = {float(sqrt_s.detach()):.6g} GeV is below threshold sum(masses) = "
                         f"{float(masses.detach().sum()):.6g} GeV")
    # Always computed in float64: RAMBO's conformal transformation cancels digits, and in float32 about
    # 1 % of the events broke momentum conservation or the masses by up to 1e-2 sqrt(s) (resp. s).
    columns, weight = kernel_function(_rambo_kernel, n_events=n_events, n_out=n_out, seed=seed)(
        sqrt_s.double(), masses.double())
    return columns.reshape(n_events, 2 + n_out, 4).to(masses.dtype), weight.to(masses.dtype)


def _scalar_tensor(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    check_tensor(value, name, shape=(), dtype=like.dtype, device=like.device)
    return value
