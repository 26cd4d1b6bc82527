"""Hybrid models: physics components and neural networks behind one module interface.

A *component* is any ``nn.Module`` mapping a batch tensor ``(N, *input_shape)``
to ``(N, *output_shape)``: a physics layer (e.g. :class:`pyhybrid.nn.Propagator`),
a network, or a mixture. :class:`Component` holds up to three of them and
chooses, with one switch, how its output is computed::

    mode="physics"    y = physics(x)                            (exact, differentiable)
    mode="surrogate"  y = surrogate(x)                          (a network imitating the physics)
    mode="residual"   y = physics(x) + correction(x, physics(x))  (physics + learned residual)

so a model built from components can swap a physics layer for a surrogate, or
add a learned correction to it, without changing any other code (see
docs/hybrid.md). All pieces are ordinary torch modules: one optimizer trains
networks and physics parameters together, gradients flow through the physics
via :func:`pyhybrid.engine.kernel_function`.

Building blocks
---------------
* :class:`MLP` -- fully connected network (SiLU), optionally zero-initialised
  output layer (a correction that starts as exactly zero).
* :class:`LinearPlusMLP` -- ``W x + b + MLP(x)`` with a closed-form linear part.
* :class:`Standardize`, :class:`Whiten` -- fixed input maps (buffers).
* :class:`Surrogate` -- a network with the input/output shapes of a physics
  component, standardised on samples of it; :func:`fit_surrogate` trains it by
  regression on the physics outputs.
* :class:`Correction` -- a small network of the component's input and/or physics
  output, added to the physics output (zero at initialisation).

Training
--------
* :func:`fit` -- a minimal Adam + cosine-decay loop over index batches.
* :func:`residual_jacobian`, :func:`gauss_newton_step` -- per-sample Jacobians
  of residuals through any physics (from its VJPs) and damped Gauss-Newton steps.
* :func:`fit_through_physics` -- train a network on measurement residuals only,
  through a physics model, with Gauss-Newton preconditioning.

Tracking pieces (the main demo, ``examples/hybrid_tracking.py``)
----------------------------------------------------------------
Perigee parameters (d0, z0, phi, theta, q/p) [mm, mm, rad, rad, e/GeV];
barrel hits (N, L, 2) = (r*phi, z) [mm]. :func:`perigee_to_free`,
:func:`canonical_frame` / :func:`rotate_hits` / :func:`rotate_perigee` (the
rotation symmetry about the beam axis), :class:`PerigeeHits` (the Propagator as a
perigee -> hits component), :class:`TrackEncoder` (hits -> perigee parameters),
:class:`HitCorrection` (a learned per-hit detector distortion),
:func:`local_residuals`, :func:`hit_chi2`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from pyhybrid.engine import check_tensor

__all__ = [
    "MODES", "MLP", "Standardize", "Whiten", "LinearPlusMLP", "Surrogate", "Correction", "Component",
    "fit", "fit_surrogate", "residual_jacobian", "gauss_newton_step", "fit_through_physics",
    "PERIGEE_NAMES", "wrap_angle", "perigee_to_free", "rotate_hits", "canonical_frame", "rotate_perigee",
    "PerigeeHits", "TrackEncoder", "HitCorrection", "local_residuals", "hit_chi2",
]

#: The ways a :class:`Component` can compute its output.
MODES = ("physics", "surrogate", "residual")


# ---------------------------------------------------------------- generic building blocks


class MLP(nn.Sequential):
    """Fully connected network ``in_features -> hidden... -> out_features`` with SiLU activations.

    ``zero_last=True`` initialises the output layer to zero, so the network
    starts as the zero function (used for learned corrections: the hybrid model
    starts as the pure physics model).
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64),
                 activation: Callable[[], nn.Module] = nn.SiLU, zero_last: bool = False):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        last = nn.Linear(width, out_features)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features


class Standardize(nn.Module):
    """Fixed affine map ``(x - shift) / scale`` on the last axis; ``inverse`` undoes it.

    ``shift`` and ``scale`` are buffers (saved in the state dict, not trained)
    in the module's dtype (``.double()`` for float64 models);
    :meth:`from_samples` sets them to the mean and standard deviation of data.
    """

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))

    @torch.no_grad()
    def from_samples(self, samples: torch.Tensor) -> "Standardize":
        check_tensor(samples, "samples", shape=(None, self.shift.numel()))
        self.shift.copy_(samples.mean(0))
        # Constant features keep scale 1 instead of dividing by zero.
        std = samples.std(0)
        self.scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)


class Whiten(nn.Module):
    """Fixed decorrelating map ``(x - mean) @ W`` with W = C^(-1/2) (ZCA) of the sample covariance C.

    Detector hits are strongly correlated (all layers see the same track), which
    makes the first layer of a network badly conditioned; whitened inputs make a
    linear fit on them converge in a few gradient steps. Eigenvalues below
    ``floor`` x the largest are raised to it (directions without spread). The
    buffers take the module's dtype: use ``.double()`` for hits of precise
    detectors (float32 loses the small eigen-directions).
    """

    def __init__(self, features: int, floor: float = 1e-10):
        super().__init__()
        self.floor = float(floor)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("matrix", torch.eye(features))

    @torch.no_grad()
    def from_samples(self, samples: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> "Whiten":
        """Set mean and W from samples (N, features).

        ``reduce``: optional sum over processes (e.g. an all-reduce), applied to
        the count, sum and sum of outer products, so that data-parallel workers
        holding different samples get the same map.
        """
        check_tensor(samples, "samples", shape=(None, self.mean.numel()))
        x = samples.to(torch.float64)
        moments = [torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), x.T @ x]
        if reduce is not None:
            moments = [reduce(m) for m in moments]
        count, total, outer = moments
        if count < 2:
            raise ValueError(f"samples needs at least 2 rows, got {int(count)}")
        mean = total / count
        covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(self.floor * float(eigenvalues.max().clamp_min(1e-300)))
        self.mean.copy_(mean)
        self.matrix.copy_(vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype)


class LinearPlusMLP(nn.Module):
    """``y = W x + b + MLP(x)``: a linear map plus a non-linear remainder.

    Many physics maps are close to linear over the relevant range (hit
    positions in the track parameters and back); the linear part can then be
    solved exactly in closed form (:meth:`fit`) and the MLP, started at zero,
    learns only what is left -- which reaches a precision that Adam on a plain
    MLP does not reach in the same number of steps.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.network = MLP(in_features, out_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.network(x)

    @torch.no_grad()
    def solve_linear(self, x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-8,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set the linear part to the least-squares fit of ``y`` (N, out) on ``x`` (N, in); zero the MLP.

        ``ridge`` x N is added to the diagonal of the normal matrix. ``reduce``:
        optional sum over processes applied to the normal equations (data-parallel
        workers holding different samples then get the same solution).
        """
        check_tensor(y, "y", shape=(x.shape[0], self.linear.out_features))
        design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gram, rhs = design.T @ design, design.T @ y
        count = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
        if reduce is not None:
            gram, rhs, count = reduce(gram), reduce(rhs), reduce(count)
        gram = gram + ridge * count * torch.eye(design.shape[1], dtype=x.dtype, device=x.device)
        solution = torch.linalg.solve(gram, rhs)
        self.linear.weight.copy_(solution[:-1].T)
        self.linear.bias.copy_(solution[-1])
        nn.init.zeros_(self.network[-1].weight)
        nn.init.zeros_(self.network[-1].bias)

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 256, lr: float = 1e-3,
            ridge: float = 1e-8, seed: int = 0, advance: Callable[[int], None] | None = None) -> list[float]:
        """Regress onto targets ``y`` (N, out) for inputs ``x`` (N, in).

        :meth:`solve_linear`, then ``steps`` Adam steps of the MLP (:func:`fit`)
        on the mean squared error standardised by the spread of ``y``. Returns
        the Adam losses.
        """
        self.solve_linear(x, y, ridge=ridge)
        scale = y.std(0).clamp_min(1e-12)

        def loss_of_batch(indices):
            return ((self(x[indices]) - y[indices]) / scale).pow(2).mean()

        return fit(self.network.parameters(), loss_of_batch, x.shape[0], steps=steps, batch_size=batch_size, lr=lr,
                   seed=seed, advance=advance)


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _in_network_dtype(network: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """network(z) computed in the network's dtype (a float32 network takes float64 inputs and the
    other way round), returned in z's dtype."""
    return network(z.to(next(network.parameters()).dtype)).to(z.dtype)


class Surrogate(nn.Module):
    """A network standing in for a physics component: ``(N, *input_shape) -> (N, *output_shape)``.

    Inputs and outputs are standardised (call :meth:`calibrate` with samples
    of the physics inputs and outputs, or :func:`fit_surrogate` which does it),
    so the network -- a :class:`LinearPlusMLP` -- works on O(1) numbers
    whatever the units.
    """

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int], hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        n_in, n_out = _numel(self.input_shape), _numel(self.output_shape)
        self.input_norm = Standardize(n_in)
        self.output_norm = Standardize(n_out)
        self.network = LinearPlusMLP(n_in, n_out, hidden)

    def calibrate(self, inputs: torch.Tensor, outputs: torch.Tensor) -> "Surrogate":
        """Set the input/output standardisation from samples of the physics component."""
        check_tensor(inputs, "inputs", shape=(None, *self.input_shape))
        check_tensor(outputs, "outputs", shape=(inputs.shape[0], *self.output_shape))
        self.input_norm.from_samples(inputs.detach().flatten(1))
        self.output_norm.from_samples(outputs.detach().flatten(1))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", shape=(None, *self.input_shape))
        z = _in_network_dtype(self.network, self.input_norm(x.flatten(1)))
        return self.output_norm.inverse(z).reshape(x.shape[0], *self.output_shape)


class Correction(nn.Module):
    """Learned residual ``delta(x, y)`` added to a physics output ``y = physics(x)``.

    ``inputs`` chooses what the network sees: ``"input"`` (x), ``"output"``
    (the physics output y) or ``"both"`` (concatenated, flattened per sample).
    ``output_scale`` sets the units of the correction (the network output is
    multiplied by it); the last layer starts at zero, so before training
    ``physics + correction`` is exactly the physics. Call :meth:`calibrate` with
    samples to standardise the network's inputs.
    """

    INPUTS = ("input", "output", "both")

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int], inputs: str = "output",
                 hidden: Sequence[int] = (32, 32), output_scale: float = 1.0):
        super().__init__()
        if inputs not in self.INPUTS:
            raise ValueError(f"inputs must be one of {self.INPUTS}, got {inputs!r}")
        self.inputs = inputs
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        n_in = {"input": _numel(input_shape), "output": _numel(output_shape),
                "both": _numel(input_shape) + _numel(output_shape)}[inputs]
        self.input_norm = Standardize(n_in)
        self.network = MLP(n_in, _numel(output_shape), hidden, zero_last=True)
        self.output_scale = float(output_scale)

    def features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_tensor(y, "y (physics output)", shape=(None, *self.output_shape))
        if self.inputs != "output":
            check_tensor(x, "x (component input)", shape=(y.shape[0], *self.input_shape))
        parts = {"input": [x], "output": [y], "both": [x, y]}[self.inputs]
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> "Correction":
        """Standardise the network inputs on samples of the component input x and physics output y."""
        self.input_norm.from_samples(self.features(x.detach(), y.detach()))
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = _in_network_dtype(self.network, self.input_norm(self.features(x, y))) * self.output_scale
        return delta.reshape(y.shape[0], *self.output_shape)


class Component(nn.Module):
    """One slot of a model filled by physics, a surrogate network, or physics + learned residual.

    Parameters
    ----------
    physics: module ``(N, *in) -> (N, *out)`` returning one tensor (e.g.
        :class:`PerigeeHits`, the Propagator as perigee parameters -> hits), or None.
    surrogate: module with the same signature (e.g. :class:`Surrogate`), or None.
    correction: module ``(x, y) -> delta`` with ``delta`` shaped like ``y`` (e.g.
        :class:`Correction`), or None.
    mode: one of :data:`MODES`; default: ``"residual"`` if a correction is given,
        else ``"physics"`` if physics is given, else ``"surrogate"``.

    In residual mode, where the physics module reports a mask ``valid`` of its last call (as
    :class:`PerigeeHits`: layers a track misses), the correction is applied to the valid entries
    only, so that missed layers stay zero.
    Switch at any time with ``component.mode = "surrogate"`` (or :meth:`use`);
    a mode whose modules are missing raises a ValueError naming them. The mode is part of the
    ``state_dict`` (``load_state_dict`` restores it). Parameters
    of all held modules are registered, so an optimizer built once sees them all;
    freeze a part with ``component.physics.requires_grad_(False)``.
    """

    def __init__(self, physics: nn.Module | None = None, surrogate: nn.Module | None = None,
                 correction: nn.Module | None = None, mode: str | None = None):
        super().__init__()
        if physics is None and surrogate is None:
            raise ValueError("Component needs a physics module or a surrogate")
        self.physics, self.surrogate, self.correction = physics, surrogate, correction
        if mode is None:
            mode = "residual" if correction is not None else ("physics" if physics is not None else "surrogate")
        self.mode = mode
        self.register_load_state_dict_pre_hook(_keep_mode_without_extra_state)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        needs = {"physics": ("physics",), "surrogate": ("surrogate",), "residual": ("physics", "correction")}[mode]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"mode {mode!r} needs {' and '.join(missing)}, which this Component does not have")
        self._mode = mode

    def use(self, mode: str) -> "Component":
        """Set the mode and return self (chainable)."""
        self.mode = mode
        return self

    def forward(self, x: torch.Tensor, **physics_options) -> torch.Tensor:
        """``physics_options`` go to the physics call (e.g. ``seed`` of :class:`PerigeeHits` for sampled
        scattering); the surrogate does not take them."""
        if self._mode == "surrogate":
            return self.surrogate(x)
        y = self.physics(x, **physics_options)
        if self._mode == "physics":
            return y
        delta = self.correction(x, y)
        valid = getattr(self.physics, "valid", None)  # PerigeeHits: layers without a hit stay zero
        if isinstance(valid, torch.Tensor) and valid.dim() > 0 and valid.shape == y.shape[:valid.dim()]:
            delta = delta * valid.reshape(*valid.shape, *(1,) * (y.dim() - valid.dim())).to(delta.dtype)
        return y + delta

    def get_extra_state(self) -> dict:
        """The mode travels with the state_dict: a checkpoint restores the model it was saved from
        (one saved before the mode was stored keeps the current mode)."""
        return {"mode": self._mode}

    def set_extra_state(self, state: dict) -> None:
        self.mode = state["mode"]

    def extra_repr(self) -> str:
        return f"mode={self._mode!r}"


def _keep_mode_without_extra_state(module: Component, state_dict, prefix, *args) -> None:
    state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())


# ---------------------------------------------------------------- training


def fit(parameters: Iterable[nn.Parameter], loss_of_batch: Callable[[torch.Tensor], torch.Tensor], n_samples: int,
        *, steps: int, batch_size: int, lr: float = 3e-3, seed: int = 0, weight_decay: float = 0.0,
        advance: Callable[[int], None] | None = None) -> list[float]:
    """Minimise ``loss_of_batch(indices)`` with Adam and a cosine learning-rate decay.

    Each step draws ``batch_size`` sample indices (a fresh permutation per epoch,
    from a generator seeded with ``seed``; the whole set when it is smaller) and
    calls ``loss_of_batch`` with them (an int64 tensor). ``advance(1)`` is
    called after every step (a progress bar). Returns the loss of each step.
    """
    if n_samples < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n_samples, steps and batch_size must be >= 1, got {n_samples}, {steps}, {batch_size}")
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.02)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n_samples)
    order, position = torch.randperm(n_samples, generator=generator), 0
    losses = []
    for _ in range(steps):
        if position + batch_size > n_samples:
            order, position = torch.randperm(n_samples, generator=generator), 0
        indices = order[position:position + batch_size]
        position += batch_size
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of_batch(indices)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if advance is not None:
            advance(1)
    return losses


def fit_surrogate(surrogate: Surrogate, physics: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, *,
                  steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                  advance: Callable[[int], None] | None = None) -> list[float]:
    """Train ``surrogate`` to reproduce ``physics`` on ``inputs`` (standardised mean squared error).

    The physics outputs are computed once (no gradient); the surrogate is
    calibrated on them, its linear part solved in closed form and its MLP
    trained for ``steps`` Adam steps (:meth:`LinearPlusMLP.fit`). Returns the losses.
    """
    with torch.no_grad():
        targets = physics(inputs)
        surrogate.calibrate(inputs, targets)
        x = surrogate.input_norm(inputs.flatten(1))
        y = surrogate.output_norm(targets.flatten(1))
    return surrogate.network.fit(x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed, advance=advance)


# ---------------------------------------------------------------- tracking pieces (main demo)

#: Perigee track parameters, in this order: d0 [mm], z0 [mm], phi [rad], theta [rad], q/p [1/GeV].
PERIGEE_NAMES = ("d0", "z0", "phi", "theta", "qop")


def wrap_angle(phi: torch.Tensor) -> torch.Tensor:
    """Angle mapped to [-pi, pi)."""
    return torch.remainder(phi + math.pi, 2 * math.pi) - math.pi


def perigee_to_free(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Perigee parameters (N, 5) -> (position (N, 3) [mm], unit direction (N, 3), q/p (N,) [1/GeV]).

    Perigee with respect to the z axis (ACTS convention): the point of closest
    approach is ``(-d0 sin phi, d0 cos phi, z0)``, the direction there is
    ``(sin theta cos phi, sin theta sin phi, cos theta)``. Differentiable.
    """
    check_tensor(params, "params", shape=(None, 5))
    d0, z0, phi, theta, qop = params.unbind(-1)
    sin_phi, cos_phi, sin_theta = torch.sin(phi), torch.cos(phi), torch.sin(theta)
    position = torch.stack([-d0 * sin_phi, d0 * cos_phi, z0], dim=-1)
    direction = torch.stack([sin_theta * cos_phi, sin_theta * sin_phi, torch.cos(theta)], dim=-1)
    return position, direction, qop


def rotate_hits(hits: torch.Tensor, angle: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Barrel hits (N, L, 2) = (r*phi, z) [mm] rotated about the z axis by ``angle`` (N,) [rad].

    The azimuth is wrapped to [-pi, pi) after the rotation; ``radii`` (L,) [mm].
    """
    radii = radii.to(hits.dtype)
    phi = wrap_angle(hits[..., 0] / radii + angle[:, None])
    return torch.stack([phi * radii, hits[..., 1]], dim=-1)


def canonical_frame(hits: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate barrel hits about the beam axis so that the innermost hit lies at azimuth 0.

    ``hits``: (N, L, 2) local cylinder coordinates (r*phi, z) [mm] on layers of
    ``radii`` (L,) [mm]. Returns the rotated hits and the rotation angle phi_ref
    (N,) [rad] (the hits were rotated by -phi_ref). A solenoid field along z and
    cylinders about z are symmetric under this rotation, so propagating
    parameters rotated the same way (:func:`rotate_perigee`) gives the rotated
    hits exactly; networks then never see the 2 pi wrap of azimuths.
    """
    phi_ref = hits[:, 0, 0] / radii[0].to(hits.dtype)
    return rotate_hits(hits, -phi_ref, radii), phi_ref


def rotate_perigee(params: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Perigee parameters (N, 5) rotated about the z axis by ``angle`` (N,) [rad] (phi += angle)."""
    phi = wrap_angle(params[:, 2] + angle)
    return torch.cat([params[:, :2], phi[:, None], params[:, 3:]], dim=1)


class PerigeeHits(nn.Module):
    """Physics component: perigee parameters (N, 5) -> local hits (N, L, 2) on the barrel layers of a Propagator.

    Wraps a :class:`pyhybrid.nn.propagator.Propagator` whose layers are
    cylinders: the tracks start at their perigee (time 0), the output is the
    local (r*phi, z) [mm] of each layer crossing. Layers a track misses give
    zeros (the propagator's convention); the mask of the last call is kept in
    :attr:`valid` (N, L) for the caller to check. Gradients: J^T g from the
    propagator's forward-mode transport Jacobian.
    """

    def __init__(self, propagator: nn.Module):
        super().__init__()
        self.propagator = propagator
        self.valid: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.propagator.n_layers

    @property
    def radii(self) -> torch.Tensor:
        """(L,) layer radii [mm] (the propagator's layer positions)."""
        return self.propagator.positions.detach()

    def forward(self, params: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        """Local hits (N, L, 2) [mm]; ``seed`` is passed to the propagator (sampled scattering)."""
        position, direction, qop = perigee_to_free(params)
        free = torch.cat([position, torch.zeros_like(qop)[:, None], direction, qop[:, None]], dim=1)
        result = self.propagator(free, seed=seed)
        self.valid = result.valid
        return result.local.contiguous()  # (N, L, 2) like a network's output (the propagator's is a view)


class TrackEncoder(nn.Module):
    """Network: barrel hits in the canonical frame -> perigee parameters (d0, z0, phi, theta, q/p).

    Input ``hits`` (N, L, 2): local cylinder coordinates (r*phi, z) [mm] on L
    barrel layers, every layer hit, rotated with :func:`canonical_frame` (so phi
    of the innermost hit is 0 and the output phi is small). Architecture: the
    whitened hits (:class:`Whiten`) feed a :class:`LinearPlusMLP` -- the linear
    part alone is close to a linearised track fit, the MLP learns the
    non-linear rest. The 5 outputs u are read as

        d0 = d0_scale u0 [mm], z0 = z0_scale u1 [mm], phi = phi_scale u2 [rad],
        cot(theta) = cot_scale u3, q/pT = qpt_max tanh(u4) [1/GeV],

    (the quantities on which hits depend almost linearly), then converted to
    theta = pi/2 - atan(cot theta) and q/p = (q/pT) sin(theta). ``qpt_max``
    keeps predicted tracks from curling inside the barrel. Call
    :meth:`calibrate` with training hits before training.
    """

    def __init__(self, n_layers: int, hidden: Sequence[int] = (128, 128), *, d0_scale: float = 0.1,
                 z0_scale: float = 50.0, phi_scale: float = 0.01, cot_scale: float = 1.0, qpt_max: float = 2.0):
        super().__init__()
        if n_layers < 3:
            raise ValueError(f"n_layers must be >= 3 (5 parameters from 2 coordinates per layer), got {n_layers}")
        self.n_layers = n_layers
        self.input_norm = Whiten(2 * n_layers)
        self.network = LinearPlusMLP(2 * n_layers, 5, hidden)
        self.d0_scale, self.z0_scale, self.phi_scale = float(d0_scale), float(z0_scale), float(phi_scale)
        self.cot_scale, self.qpt_max = float(cot_scale), float(qpt_max)

    def _features(self, hits: torch.Tensor) -> torch.Tensor:
        check_tensor(hits, "hits", shape=(None, self.n_layers, 2))
        return hits.transpose(1, 2).flatten(1)  # (r*phi of all layers, z of all layers)

    @torch.no_grad()
    def calibrate(self, hits: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> "TrackEncoder":
        """Whiten the network inputs on a sample of hits (N, L, 2) (``reduce``: see :meth:`Whiten.from_samples`)."""
        self.input_norm.from_samples(self._features(hits), reduce=reduce)
        return self

    def raw(self, hits: torch.Tensor) -> torch.Tensor:
        """The network outputs u (N, 5) before conversion to perigee parameters."""
        return _in_network_dtype(self.network, self.input_norm(self._features(hits)))

    def to_perigee(self, u: torch.Tensor) -> torch.Tensor:
        """Outputs u (N, 5) -> perigee parameters (N, 5) (see the class docstring)."""
        theta = 0.5 * math.pi - torch.atan(self.cot_scale * u[:, 3])
        qop = self.qpt_max * torch.tanh(u[:, 4]) * torch.sin(theta)
        return torch.stack([self.d0_scale * u[:, 0], self.z0_scale * u[:, 1], self.phi_scale * u[:, 2], theta, qop],
                           dim=-1)

    def from_perigee(self, params: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_perigee` (q/pT is clipped just inside +-qpt_max, by 1e-9 relative
        or a few float32 rounding steps, so that u stays finite)."""
        d0, z0, phi, theta, qop = params.unbind(-1)
        inside = 1.0 - max(1e-9, 4.0 * torch.finfo(params.dtype).eps)
        qpt = (qop / torch.sin(theta) / self.qpt_max).clamp(-inside, inside)
        return torch.stack([d0 / self.d0_scale, z0 / self.z0_scale, phi / self.phi_scale,
                            1.0 / torch.tan(theta) / self.cot_scale, torch.atanh(qpt)], dim=-1)

    def forward(self, hits: torch.Tensor) -> torch.Tensor:
        return self.to_perigee(self.raw(hits))

    def fit_targets(self, hits: torch.Tensor, params: torch.Tensor, *, steps: int, batch_size: int = 256,
                    lr: float = 1e-3, seed: int = 0, advance: Callable[[int], None] | None = None) -> list[float]:
        """Regress the encoder onto target parameters (N, 5) for the hits (N, L, 2).

        Closed-form linear part and Adam on the MLP (:meth:`LinearPlusMLP.fit`),
        in the output variables u (:meth:`from_perigee`). Returns the Adam losses.
        """
        check_tensor(params, "params", shape=(hits.shape[0], 5))
        with torch.no_grad():
            dtype = next(self.network.parameters()).dtype
            z = self.input_norm(self._features(hits)).to(dtype)
            u = self.from_perigee(params).to(dtype)
        return self.network.fit(z, u, steps=steps, batch_size=batch_size, lr=lr, seed=seed, advance=advance)


class HitCorrection(nn.Module):
    """Learned per-hit shift of barrel measurements, a correction for :class:`Component`.

    ``forward(x, y)``: ``y`` are physics hits (N, L, 2) = (r*phi, z) [mm] in the
    global frame on the L layers; returns the shift (N, L, 2) [mm] to add to
    them. One small network is applied to every hit, with the hit's layer
    (one-hot), its azimuth (cos k phi, sin k phi for k = 1..``harmonics``) and
    z / ``z_scale`` as features, so it can represent smooth, layer-dependent
    maps of detector distortions (sensor bows, layer deformations, tilts). Its
    two outputs are multiplied by ``output_scale`` = (r*phi, z) scales [mm]
    (the size of shift expected, so that the network works on O(1) numbers)
    and start at exactly zero.
    ``layers``: indices of the layers it may correct (default: all); the
    others are references (e.g. an aligned pixel detector), which removes the
    distortions that tracks could otherwise absorb into their own parameters.
    """

    def __init__(self, radii: Sequence[float], *, layers: Sequence[int] | None = None, harmonics: int = 3,
                 z_scale: float = 1000.0, hidden: Sequence[int] = (64, 64),
                 output_scale: tuple[float, float] = (0.1, 1.0)):
        super().__init__()
        self.register_buffer("radii", torch.as_tensor(list(radii), dtype=torch.float64))
        if harmonics < 1:
            raise ValueError(f"harmonics must be >= 1, got {harmonics}")
        mask = torch.zeros(self.radii.numel(), dtype=torch.float64)
        chosen = list(range(self.radii.numel())) if layers is None else list(layers)
        if not chosen or min(chosen) < 0 or max(chosen) >= self.radii.numel():
            raise ValueError(f"layers must be indices in [0, {self.radii.numel()}), got {chosen}")
        mask[chosen] = 1.0
        self.register_buffer("mask", mask)
        self.harmonics, self.z_scale = int(harmonics), float(z_scale)
        self.register_buffer("output_scale", torch.as_tensor(output_scale, dtype=torch.float64).reshape(2))
        self.network = MLP(self.radii.numel() + 2 * self.harmonics + 1, 2, hidden, zero_last=True)

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        check_tensor(y, "y (hits)", shape=(None, self.radii.numel(), 2))
        n, n_layers = y.shape[:2]
        phi = y[..., 0] / self.radii.to(y.dtype)
        k = torch.arange(1, self.harmonics + 1, dtype=y.dtype, device=y.device)
        layer = torch.eye(n_layers, dtype=y.dtype, device=y.device).expand(n, n_layers, n_layers)
        features = torch.cat([layer, torch.cos(phi[..., None] * k), torch.sin(phi[..., None] * k),
                              y[..., 1:2] / self.z_scale], dim=-1)
        shift = _in_network_dtype(self.network, features)
        return shift * self.output_scale.to(y.dtype) * self.mask.to(y.dtype)[:, None]


def local_residuals(predicted: torch.Tensor, measured: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Residuals ``predicted - measured`` of local cylinder hits (N, L, 2) = (r*phi, z) [mm].

    The r*phi residual is taken on the circle (azimuth difference wrapped to
    [-pi, pi) times the radius), so a track near phi = +-pi has no 2 pi r jump.
    """
    radii = radii.to(predicted.dtype)
    d_phi = wrap_angle((predicted[..., 0] - measured[..., 0]) / radii)
    return torch.stack([d_phi * radii, predicted[..., 1] - measured[..., 1]], dim=-1)


def hit_chi2(residuals: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-track chi^2 = sum over layers and coordinates of (residual / sigma)^2.

    ``residuals``: (N, L, 2) [mm] (see :func:`local_residuals`); ``sigma``: (L, 2)
    or (N, L, 2) resolutions [mm]; ``mask`` (N, L) bool: layers that count
    (default all). Returns (N,).
    """
    squared = (residuals / sigma).pow(2).sum(-1)
    if mask is not None:
        squared = torch.where(mask, squared, torch.zeros_like(squared))
    return squared.sum(-1)


def residual_jacobian(residuals: Callable[[torch.Tensor], torch.Tensor],
                      params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals r = residuals(params) (N, M) and their Jacobian dr/dparams (N, M, P).

    ``residuals`` maps parameters (N, P) to normalised residuals (N, M), every
    sample independent of the others (as for tracks through a propagator), e.g.
    ``lambda p: (hits(p) - measured).flatten(1) / sigma``. J is built from M
    vector-Jacobian products (one backward pass per residual, all samples at
    once), so it uses whatever adjoint the physics provides (for the
    propagator: J^T g from its forward-mode transport Jacobian).
    """
    p = params.detach().requires_grad_(True)
    with torch.enable_grad():
        r = residuals(p)
        check_tensor(r, "residuals(params)", shape=(params.shape[0], None), finite=False)
        rows = [torch.autograd.grad(r[:, m].sum(), p, retain_graph=m + 1 < r.shape[1])[0] for m in range(r.shape[1])]
    return r.detach(), torch.stack(rows, dim=1)


def gauss_newton_step(residuals: Callable[[torch.Tensor], torch.Tensor], params: torch.Tensor,
                      damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """One Levenberg-Marquardt (damped Gauss-Newton) step of a per-sample least-squares fit.

    Minimises chi2(p) = |residuals(p)|^2 for every sample independently:
    p_new = p - (J^T J + damping diag(J^T J))^-1 J^T r, with r and J from
    :func:`residual_jacobian`. The small default damping only guards against
    singular normal matrices: track fits are so ill-conditioned (condition
    numbers ~1e8) that a Marquardt damping of 1e-3 already slows the weakest
    direction to linear convergence. Returns (p_new (N, P), chi2 at the old p (N,)).
    The caller wraps angles or bounds parameters as its parametrisation requires.
    """
    r, jac = residual_jacobian(residuals, params)
    normal = jac.transpose(1, 2) @ jac
    normal = normal + damping * torch.diag_embed(torch.diagonal(normal, dim1=1, dim2=2))
    gradient = (jac.transpose(1, 2) @ r[..., None])[..., 0]
    step = torch.linalg.solve(normal, gradient)
    return params.detach() - step, r.pow(2).sum(1)


def fit_through_physics(encoder: nn.Module, residuals_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        inputs: torch.Tensor, *, rounds: int = 4, gauss_newton_iterations: int = 2,
                        steps_per_round: int = 300, batch_size: int = 256, lr: float = 1e-3, damping: float = 1e-6,
                        seed: int = 0, advance: Callable[[int], None] | None = None) -> list[float]:
    """Train ``encoder`` (inputs -> parameters) on measurement residuals only, through a physics model.

    The objective is the per-sample chi^2 of the encoder's prediction,
    ``|residuals_of(encoder(inputs[idx]), idx)|^2``, where ``residuals_of(params,
    idx)`` runs the physics (e.g. :class:`PerigeeHits`) and returns normalised
    residuals (N_idx, M) against the measurements of samples ``idx``. No truth
    labels are used.

    Minimising it with plain gradient descent through the physics is slow: the
    chi^2 of precise detectors is very ill-conditioned in parameter space (a
    micro-radian in phi moves a hit by many sigma, the z0/theta and d0/phi pairs
    are strongly correlated). This function preconditions with Gauss-Newton,
    in ``rounds``:

    1. predict parameters for all samples with the current encoder;
    2. take ``gauss_newton_iterations`` damped Gauss-Newton steps per sample
       from there (:func:`gauss_newton_step`; the Jacobian comes from the
       physics' own adjoint) -- the targets;
    3. regress the encoder onto the targets: ``encoder.fit_targets(inputs,
       targets, steps=steps_per_round, ...)`` when the encoder has that method
       (:class:`TrackEncoder`), else ``steps_per_round`` Adam steps on the
       standardised mean squared error (:func:`fit`).

    At the fixed point the targets are the chi^2 minima that the encoder's
    predictions converge to: the encoder becomes an amortised least-squares
    fit. Returns the median chi^2 of the encoder's predictions at the start of
    each round and after the last one (``rounds + 1`` values). ``advance`` is
    called once per Gauss-Newton iteration and per Adam step.
    """
    if rounds < 1 or gauss_newton_iterations < 1:
        raise ValueError(f"rounds and gauss_newton_iterations must be >= 1, got {rounds}, {gauss_newton_iterations}")
    everything = torch.arange(inputs.shape[0], device=inputs.device)
    history = []
    for round_index in range(rounds):
        with torch.no_grad():
            targets = encoder(inputs)
        for iteration in range(gauss_newton_iterations):
            targets, chi2 = gauss_newton_step(lambda p: residuals_of(p, everything), targets, damping)
            if iteration == 0:
                history.append(float(chi2.median()))
            if advance is not None:
                advance(1)
        options = dict(steps=steps_per_round, batch_size=batch_size, lr=lr, seed=seed + round_index, advance=advance)
        if hasattr(encoder, "fit_targets"):
            encoder.fit_targets(inputs, targets, **options)
        else:
            scale = targets.std(0).clamp_min(1e-12)

            def loss_of_batch(indices, targets=targets):
                return ((encoder(inputs[indices]) - targets[indices]) / scale).pow(2).mean()

            fit(encoder.parameters(), loss_of_batch, inputs.shape[0], **options)
    with torch.no_grad():
        history.append(float(residuals_of(encoder(inputs), everything).pow(2).sum(1).median()))
    return history
