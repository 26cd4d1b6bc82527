"""Differentiable charged-particle propagation as torch modules.

The physics lives in :mod:`pyhybrid.kernels.propagation` and its neighbours
(Dr.Jit); these modules validate inputs, hold the differentiable detector and
field parameters as ``nn.Parameter`` s and call the kernels through
:func:`pyhybrid.engine.kernel_function`. The backward pass is J^T g with the
transport Jacobians that the forward pass carries in forward mode (as ACTS),
never reverse-mode AD through the stepping loop: memory O(tracks x layers),
independent of the number of steps.

Units: mm, ns, GeV, Tesla, charge in e. Track parameters are ACTS free
parameters, a tensor ``(N, 8)``: (x, y, z, t, dx, dy, dz, q/p). Directions are
normalised (their length must be positive); q/p = 0 is a neutral track
(straight line, no material effects).

Quick start::

    import torch
    from pyhybrid.nn.propagator import Propagator, SolenoidField, CylinderLayer, free_parameters

    layers = [CylinderLayer(radius=r, half_length=600.0, thickness=0.3) for r in (40, 80, 120, 250, 400)]
    prop = Propagator(field=SolenoidField(b0=2.0), layers=layers, trainable_positions=True)
    params = free_parameters(vertex, momentum, charge)         # (N, 8), differentiable
    out = prop(params)                                         # PropagationResult
    loss = ((out.local - measured) ** 2 * out.valid[..., None]).sum()
    loss.backward()                                            # grads: params, field, radii

Modules: :class:`Propagator`; fields :class:`UniformField`, :class:`SolenoidField`,
:class:`GridField` (also a standalone differentiable field-map lookup);
layer specs :class:`CylinderLayer`, :class:`DiskLayer`, :class:`PlaneLayer`.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from typing import Sequence

import drjit as dr
import torch
from torch import nn

from pyhybrid.engine import (KERNEL_DTYPES, Leading, LeastRecentlyUsed, autocast_input, check_tensor,
                             eager_under_compile, empty_batch, kernel_function, types_for)
from pyhybrid.kernels.backend import any_lane_flag, types_of
from pyhybrid.kernels import fields as kfields
from pyhybrid.kernels import propagation as kprop
from pyhybrid.kernels.material import MATERIALS, Material, SILICON
from pyhybrid.kernels.steppers import RK4, AdaptiveRKN
from pyhybrid.kernels.surfaces import Cylinder, Disk, Plane

__all__ = ["Propagator", "PropagationResult", "UniformField", "SolenoidField", "GridField", "CylinderLayer",
           "DiskLayer", "PlaneLayer", "barrel", "free_parameters", "RK4", "AdaptiveRKN", "SILICON"]


# ---------------------------------------------------------------- fields


def _scalar_parameter(value: float, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.tensor(float(value), dtype=torch.float64), requires_grad=requires_grad)


class UniformField(nn.Module):
    """Uniform field ``b`` = (bx, by, bz) [T]; ``b`` is an ``nn.Parameter`` (frozen unless requires_grad)."""

    def __init__(self, b: Sequence[float] = (0.0, 0.0, 2.0), *, requires_grad: bool = False):
        super().__init__()
        b = torch.as_tensor(b, dtype=torch.float64)
        check_tensor(b, "b", shape=(3,))
        self.b = nn.Parameter(b.clone(), requires_grad=requires_grad)

    def parameter_vector(self) -> torch.Tensor:
        return self.b

    def check(self) -> None:
        check_tensor(self.b.detach(), "UniformField.b")

    def kernel_field(self, device, dtype):
        return KernelField("uniform")


class SolenoidField(nn.Module):
    """Finite solenoid with fringe field (paraxial model, see :class:`pyhybrid.kernels.fields.SolenoidField`).

    b0: central field [T]; radius: coil radius R [mm]; half_length: L [mm] (defaults: a 2 T
    solenoid of R = 1.2 m and L = 3 m). All three are ``nn.Parameter`` s (frozen unless
    ``requires_grad``).
    """

    def __init__(self, b0: float = 2.0, radius: float = 1200.0, half_length: float = 3000.0, *,
                 requires_grad: bool = False):
        super().__init__()
        self.b0 = _scalar_parameter(b0, requires_grad)
        self.radius = _scalar_parameter(radius, requires_grad)
        self.half_length = _scalar_parameter(half_length, requires_grad)
        self.check()

    def parameter_vector(self) -> torch.Tensor:
        return torch.stack([self.b0, self.radius, self.half_length])

    def check(self) -> None:
        for name in ("b0", "radius", "half_length"):
            check_tensor(getattr(self, name).detach(), f"SolenoidField.{name}")
        if not (self.radius.item() > 0 and self.half_length.item() > 0):
            raise ValueError(f"SolenoidField radius and half_length must be positive (mm), got "
                             f"{self.radius.item()} and {self.half_length.item()}")

    def kernel_field(self, device, dtype):
        return KernelField("solenoid")


class GridField(nn.Module):
    """Field map on a regular grid, trilinear interpolation, times ``scale``.

    values: tensor (nx, ny, nz, 3) [T] at nodes origin + (i, j, k) * spacing [mm];
    ``trainable_values`` makes it an ``nn.Parameter``. Calling the module,
    ``field(points)`` with points (N, 3), returns B (N, 3), differentiable with
    respect to the values, ``scale`` and the points. Inside a :class:`Propagator`
    the gradient flows to ``scale`` and to the track parameters (the transport
    uses dB/dr of the interpolation); gradients with respect to individual map
    values through propagation are not provided (they would need the adjoint of
    the whole trajectory).
    """

    def __init__(self, values: torch.Tensor, origin: Sequence[float], spacing: Sequence[float], *,
                 scale: float = 1.0, trainable_values: bool = False, trainable_scale: bool = False):
        super().__init__()
        values = torch.as_tensor(values)
        check_tensor(values, "values", shape=(None, None, None, 3))
        if min(values.shape[:3]) < 2:
            raise ValueError(f"values needs at least 2 nodes per axis, got shape {tuple(values.shape)}")
        self.shape = tuple(values.shape[:3])
        self.origin = tuple(float(o) for o in origin)
        self.spacing = tuple(float(s) for s in spacing)
        if len(self.origin) != 3 or len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"origin needs 3 values and spacing 3 positive values (mm), got "
                             f"{self.origin}, {self.spacing}")
        flat = values.reshape(-1, 3).clone()
        if trainable_values:
            self.values = nn.Parameter(flat)
        else:
            self.register_buffer("values", flat)
        self.scale = _scalar_parameter(scale, trainable_scale)

    def parameter_vector(self) -> torch.Tensor:
        return self.scale.reshape(1)

    def check(self) -> None:
        check_tensor(self.scale.detach(), "GridField.scale")

    def kernel_field(self, device, dtype):
        values = self.values.detach().to(device=device, dtype=dtype).contiguous()
        types = types_for(device, dtype)
        columns = [types.Float(values[:, c].contiguous()) for c in range(3)]
        return KernelField("grid", (self.shape, self.origin, self.spacing), columns)

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """B [T] at points (N, 3) [mm]; zero outside the grid."""
        check_tensor(points, "points", shape=(None, 3), dtype=KERNEL_DTYPES)
        values = self.values.to(device=points.device, dtype=points.dtype)
        scale = self.scale.to(device=points.device, dtype=points.dtype).reshape(1)
        if points.shape[0] == 0:
            return empty_batch((0, 3), points, values, scale)
        return _FIELD_LOOKUP(points, values, scale, grid=self)


def _grid_lookup_kernel(points, values, scale, *, grid: GridField):
    field = kfields.GridField(values, grid.shape, grid.origin, grid.spacing, dr.gather(type(scale), scale, 0))
    return list(field.evaluate(points))


_FIELD_LOOKUP = kernel_function(_grid_lookup_kernel)


@dataclass
class KernelField:
    """A field as the propagation kernel receives it: ``kind`` ("uniform", "solenoid", "grid") and the
    grid geometry ``grid`` = (shape, origin, spacing) are fixed (they key the frozen kernels), the
    grid's node values ``values`` (3 Dr.Jit arrays) and the field parameters are kernel inputs."""

    kind: str
    grid: tuple = ()
    values: list = dataclass_field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.kind, self.grid

    def build(self, field_params, values):
        """The kernel field from the parameter array (one entry per parameter) and the grid values."""
        if self.kind == "uniform":
            return kfields.UniformField(*_gather_all(field_params, 3))
        if self.kind == "solenoid":
            return kfields.SolenoidField(*_gather_all(field_params, 3))
        return kfields.GridField(values, *self.grid, _gather_all(field_params, 1)[0])


def _gather_all(array, n: int) -> list:
    """The n entries of a Dr.Jit array as width-1 arrays."""
    UInt32 = dr.uint32_array_t(type(array))
    return [dr.gather(type(array), array, UInt32(i)) for i in range(n)]


# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class CylinderLayer:
    """Barrel layer: cylinder of ``radius`` [mm] around z, |z| <= half_length, ``thickness`` [mm] of ``material``."""

    radius: float
    half_length: float = math.inf
    thickness: float = 0.3
    material: Material | str | None = SILICON

    def kernel_layer(self):
        return kprop.Layer(Cylinder(self.half_length), _material(self.material)), self.radius


@dataclass(frozen=True)
class DiskLayer:
    """Endcap layer: disk at ``z`` [mm], r_min <= rho <= r_max."""

    z: float
    r_min: float = 0.0
    r_max: float = math.inf
    thickness: float = 0.3
    material: Material | str | None = SILICON

    def kernel_layer(self):
        return kprop.Layer(Disk(r_min=self.r_min, r_max=self.r_max), _material(self.material)), self.z


@dataclass(frozen=True)
class PlaneLayer:
    """Plane n . r = ``offset`` [mm] with unit ``normal``, local axis ``u_axis`` and rectangular bounds."""

    offset: float
    normal: tuple = (1.0, 0.0, 0.0)
    u_axis: tuple = (0.0, 1.0, 0.0)
    half_u: float = math.inf
    half_v: float = math.inf
    center: tuple = (0.0, 0.0)
    thickness: float = 0.3
    material: Material | str | None = SILICON

    def kernel_layer(self):
        surface = Plane(normal_vector=self.normal, u_axis=self.u_axis, half_u=self.half_u, half_v=self.half_v,
                        center=self.center)
        return kprop.Layer(surface, _material(self.material)), self.offset


def _material(material):
    if material is None:
        return None
    if isinstance(material, str):
        if material not in MATERIALS:
            raise ValueError(f"unknown material {material!r}; known: {sorted(MATERIALS)}")
        material = MATERIALS[material]
    return material


def barrel(radii: Sequence[float], *, half_length: float | Sequence[float] = math.inf, thickness: float = 0.3,
           material: Material | str | None = SILICON) -> list[CylinderLayer]:
    """Cylindrical barrel layers at ``radii`` [mm] (one half-length for all or one per layer)."""
    lengths = [half_length] * len(radii) if isinstance(half_length, (int, float)) else list(half_length)
    if len(lengths) != len(radii):
        raise ValueError(f"half_length needs one value per radius ({len(radii)}), got {len(lengths)}")
    return [CylinderLayer(float(r), float(h), thickness, material) for r, h in zip(radii, lengths)]


# ---------------------------------------------------------------- the propagator


@dataclass
class PropagationResult:
    """Outputs of :class:`Propagator` for N tracks and L layers (zeros where ``valid`` is False).

    free: (N, L, 8) free parameters on each layer's surface, before its material;
    local: (N, L, 2) local hit coordinates (cylinder: R phi, z [mm]; disk: rho [mm], phi;
    plane: u, v [mm]); path_length: (N, L) path from the start [mm]; valid: (N, L) bool;
    covariance: (N, L, 8, 8) free covariance on the surface and local_covariance (N, L, 2, 2)
    when requested (not differentiable).
    free, local, path_length and valid are views of layer-major storage (the kernels write each
    layer's block contiguously; ``transpose(0, 1)`` gives (L, N, ...) contiguous): use
    ``.reshape``/``.contiguous()`` where an operation needs contiguous memory (``.view`` does).
    """

    free: torch.Tensor
    local: torch.Tensor
    path_length: torch.Tensor
    valid: torch.Tensor
    covariance: torch.Tensor | None = None
    local_covariance: torch.Tensor | None = None

    @property
    def position(self) -> torch.Tensor:
        """(N, L, 3) global hit positions [mm]."""
        return self.free[..., 0:3]

    @property
    def time(self) -> torch.Tensor:
        return self.free[..., 3]

    @property
    def direction(self) -> torch.Tensor:
        return self.free[..., 4:7]

    @property
    def qop(self) -> torch.Tensor:
        return self.free[..., 7]


class Propagator(nn.Module):
    """Propagate tracks through a field and a list of detector layers (a torch layer).

    Parameters
    ----------
    field: :class:`UniformField`, :class:`SolenoidField` or :class:`GridField`.
    layers: list of :class:`CylinderLayer`, :class:`DiskLayer`, :class:`PlaneLayer`,
        visited in this order (see :mod:`pyhybrid.kernels.propagation` for the navigation rules).
    stepper: :class:`RK4` (fixed step) or :class:`AdaptiveRKN` (ACTS-style error control).
    particle: "muon", "pion", "kaon", "proton" or a :class:`pyhybrid.kernels.propagation.Particle`.
    energy_loss: mean Bethe-Bloch loss at each hit layer.
    scattering: "none", "covariance" (Highland MS in the covariance only) or "sample"
        (random deflection with reparametrised noise; gradients flow through theta0).
    trainable_positions / trainable_thickness: make the layer positions (cylinder radii,
        disk z, plane offsets) [mm] / material thicknesses [mm] trainable: ``self.positions``
        and ``self.thickness`` are ``nn.Parameter`` s of shape (L,) either way.
    surface_tolerance, max_steps, max_path, world_radius, world_half_length: navigation
        limits (mm), see :class:`pyhybrid.kernels.propagation.PropagationOptions`.
    freeze_kernels: record the kernels of a call with ``dr.freeze`` and replay them on later
        calls with the same configuration instead of tracing them again (saves ~10 ms of Python
        tracing per call: 3-6x faster small-batch calls; no gain at 100 000 tracks on a 2-core CPU;
        see docs/propagation.md, "Frozen kernels"). Not used with scattering="sample".
    jacobian: transport Jacobian of the backward pass. "exact" (default): the derivative of
        the discrete Runge-Kutta steps, including the field gradient dB/dr in every stage.
        "acts": dB/dr neglected in the stages, as ACTS' EigenStepper (the dependence on the
        field parameters is kept): exact in a uniform field (where "exact" is as cheap), 1.6-1.9x
        cheaper gradients in a varying field; in the
        benchmark's 2 T solenoid the gradients differ from the exact ones by 4e-4 (tracks) to
        1e-3 (field parameters) relative, more in a strong fringe field (see docs/propagation.md,
        "ACTS-style transport Jacobian"). The forward results are identical.
    """

    def __init__(self, field: nn.Module, layers: Sequence, *, stepper: RK4 | AdaptiveRKN = RK4(),
                 particle: str | kprop.Particle = "muon", energy_loss: bool = True, scattering: str = "covariance",
                 trainable_positions: bool = False, trainable_thickness: bool = False,
                 surface_tolerance: float = 1e-2, max_steps: int = 10000, max_path: float = 1e5,
                 world_radius: float = math.inf, world_half_length: float = math.inf,
                 freeze_kernels: bool = True, jacobian: str = "exact"):
        super().__init__()
        if not isinstance(field, (UniformField, SolenoidField, GridField)):
            raise TypeError(f"field must be a UniformField, SolenoidField or GridField, got {type(field).__name__}")
        layers = list(layers)  # a generator would be used up by the checks below
        if not layers:
            raise ValueError("layers must contain at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (CylinderLayer, DiskLayer, PlaneLayer)):
                raise TypeError(f"layers[{i}] must be a CylinderLayer, DiskLayer or PlaneLayer, got "
                                f"{type(layer).__name__}")
        if isinstance(particle, str):
            if particle not in kprop.PARTICLES:
                raise ValueError(f"unknown particle {particle!r}; known: {sorted(kprop.PARTICLES)}")
            particle = kprop.PARTICLES[particle]
        if not (isinstance(jacobian, str) and jacobian in kprop.TRANSPORT_JACOBIANS):
            raise ValueError(f"jacobian must be one of {kprop.TRANSPORT_JACOBIANS}, got {jacobian!r}")
        if not isinstance(stepper, (RK4, AdaptiveRKN)):
            raise TypeError(f"stepper must be RK4(...) or AdaptiveRKN(...), got {type(stepper).__name__}")
        if isinstance(field, GridField) and field.values.requires_grad:
            warnings.warn("GridField(trainable_values=True) in a Propagator: the propagation does not "
                          "differentiate with respect to the map values (their .grad stays None); the scale "
                          "and the track parameters get gradients", stacklevel=2)
        self.field = field
        built = [layer.kernel_layer() for layer in layers]
        self.kernel_layers = tuple(b[0] for b in built)
        self.positions = nn.Parameter(torch.tensor([b[1] for b in built], dtype=torch.float64),
                                      requires_grad=trainable_positions)
        self.thickness = nn.Parameter(torch.tensor([float(layer.thickness) for layer in layers], dtype=torch.float64),
                                      requires_grad=trainable_thickness)
        self.options = kprop.PropagationOptions(
            stepper=stepper, particle=particle, energy_loss=energy_loss, scattering=scattering,
            surface_tolerance=surface_tolerance, max_steps=max_steps, max_path=max_path,
            world_radius=world_radius, world_half_length=world_half_length, transport_jacobian=jacobian)
        self.freeze_kernels = bool(freeze_kernels)
        self._check_geometry()

    @property
    def n_layers(self) -> int:
        return len(self.kernel_layers)

    def extra_repr(self) -> str:
        kinds = Counter(layer.surface.kind for layer in self.kernel_layers)
        o = self.options
        return (f"layers={self.n_layers} ({', '.join(f'{n} {kind}' for kind, n in kinds.items())}), "
                f"stepper={o.stepper}, particle={o.particle.name!r}, energy_loss={o.energy_loss}, "
                f"scattering={o.scattering!r}, jacobian={o.transport_jacobian!r}")

    def _check_geometry(self) -> None:
        check_tensor(self.positions.detach(), "positions")
        check_tensor(self.thickness.detach(), "thickness")
        # As Python floats in one go: an .item() per layer cost ~0.2 ms per call (10 layers).
        positions, thickness = self.positions.detach().tolist(), self.thickness.detach().tolist()
        for k, layer in enumerate(self.kernel_layers):
            if layer.surface.kind == "cylinder" and not positions[k] > 0:
                raise ValueError(f"positions[{k}]: cylinder radius must be positive (mm), got {positions[k]}")
        if any(t < 0 for t in thickness):
            raise ValueError(f"thickness must be >= 0 (mm), got {thickness}")
        for k, layer in enumerate(self.kernel_layers):
            if layer.material is not None and not thickness[k] > 0:
                raise ValueError(f"layer {k} has material {layer.material.name} but thickness "
                                 f"{thickness[k]}; give a positive thickness or material=None")

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, params: torch.Tensor, covariance: torch.Tensor | None = None, *,
                seed: int | None = None) -> PropagationResult:
        """Propagate tracks ``params`` (N, 8) = (x, y, z, t, dx, dy, dz, q/p) through the layers
        (N = 0, e.g. a selection that kept no track, gives empty outputs).

        covariance: optional (N, 8, 8) initial free covariance to transport.
        seed: random numbers for scattering="sample" (default: drawn from torch's generator).
        """
        # Finite values and usable directions are checked by the kernel (it reads the tracks anyway;
        # in torch the checks took 2-6 ms of a 100 ms call of 10^5 tracks on 2 cores).
        params, covariance = autocast_input(params), autocast_input(covariance)
        check_tensor(params, "params", shape=(None, 8), dtype=KERNEL_DTYPES, finite=False)
        self.field.check()
        self._check_geometry()
        like = dict(device=params.device, dtype=params.dtype)
        field_params = self.field.parameter_vector().to(**like)
        positions, thickness = self.positions.to(**like), self.thickness.to(**like)
        inputs = [params, field_params, positions, thickness]
        if covariance is not None:
            check_tensor(covariance, "covariance", shape=(params.shape[0], 8, 8), dtype=params.dtype,
                         device=params.device)
            inputs.append(covariance.detach().reshape(-1, 64))  # the transported covariance is not differentiable
        if params.shape[0] == 0:
            return self._empty_result(inputs, covariance is not None)
        sampled_seed = seed is None and self.options.scattering == "sample"
        rng_state = torch.get_rng_state() if sampled_seed else None  # restored if the kernel rejects the tracks
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item()) if sampled_seed else 0
        jacobian = torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:4])
        outputs = _PROPAGATE(*inputs, layers=self.kernel_layers, options=self.options,
                             field=self.field.kernel_field(params.device, params.dtype),
                             jacobian=jacobian, seed=seed, with_covariance=covariance is not None,
                             field_gradient=jacobian and field_params.requires_grad,
                             layer_gradient=jacobian and (positions.requires_grad or thickness.requires_grad),
                             freeze=self.freeze_kernels)
        if outputs[4].item() > 0:
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            _raise_for_unusable(params)
        n, n_layers = params.shape[0], self.n_layers

        def per_track(rows, *width):  # the kernels write layer-major rows: (L, N, ...) -> (N, L, ...) view
            return rows.view(n_layers, n, *width).transpose(0, 1)

        result = PropagationResult(free=per_track(outputs[0], 8), local=per_track(outputs[1], 2),
                                   path_length=per_track(outputs[2]), valid=per_track(outputs[3]))
        if covariance is not None:
            result.covariance = outputs[5].detach().reshape(n, n_layers, 8, 8)
            result.local_covariance = outputs[6].detach().reshape(n, n_layers, 2, 2)
        return result

    def _empty_result(self, inputs: list[torch.Tensor], with_covariance: bool) -> PropagationResult:
        """The outputs for no tracks (no kernel runs), in the graph of the ``inputs`` (tracks, field,
        layers; see :func:`empty_batch`)."""
        n_layers, params = self.n_layers, inputs[0]
        result = PropagationResult(free=empty_batch((0, n_layers, 8), *inputs),
                                   local=empty_batch((0, n_layers, 2), *inputs),
                                   path_length=empty_batch((0, n_layers), *inputs),
                                   valid=torch.zeros(0, n_layers, dtype=torch.bool, device=params.device))
        if with_covariance:
            result.covariance = params.new_zeros(0, n_layers, 8, 8)
            result.local_covariance = params.new_zeros(0, n_layers, 2, 2)
        return result


def _propagate_kernel(params, field_params, positions, thickness, covariance=None, *, layers, options,
                      field: KernelField, jacobian, seed, with_covariance, field_gradient, layer_gradient,
                      freeze=False):
    """The propagation as ``kernel_function`` calls it; frozen (see :class:`_FrozenPropagation`)
    unless ``freeze`` is False or the scattering is sampled (the seed would be part of the recording)."""
    types = types_of(field_params)
    n = dr.width(params[0])
    config = _Configuration(tuple(layers), options, field.key, jacobian, with_covariance, field_gradient,
                            layer_gradient)
    covariance = list(covariance) if with_covariance else None
    arrays = (list(params), field_params, positions, thickness, covariance, list(field.values), _n_tracks(types, n))
    if _freezable(freeze, options):
        outputs, record = _frozen(config).forward(*arrays, _row_capacity(n))
    else:
        outputs, record = _propagate(config, field, seed, *arrays)
    # Frozen kernels allocate the rows for a few more tracks: torch gets the L*N*width entries in use.
    rows = [Leading(r, len(layers) * n * width) for r, width in zip(outputs[:4], (8, 2, 1, 1))]
    if with_covariance:  # (N, L*64) and (N, L*4) rows: sized like the output rows, so made here too
        return (*rows, outputs[4], *(kprop.row_major(columns) for columns in outputs[5:])), record
    return (*rows, outputs[4]), record


@dataclass(frozen=True)
class _Configuration:
    """Everything a propagation call compiles in besides its input arrays (the key of its frozen kernels);
    ``options`` includes the transport Jacobian model ("exact" / "acts")."""

    layers: tuple
    options: kprop.PropagationOptions
    field: tuple
    jacobian: bool
    with_covariance: bool
    field_gradient: bool
    layer_gradient: bool


def _propagate(config: _Configuration, field: KernelField, seed, params, field_params, positions, thickness,
               covariance, field_values, n_tracks, capacity=None):
    state = kprop.FreeParameters.from_columns(params)
    initial_cov = None
    if config.with_covariance:
        initial_cov = [[covariance[8 * i + j] for j in range(8)] for i in range(8)]
    hits = kprop.propagate_layers(state, field.build(field_params, field_values), config.layers, positions,
                                  thickness, config.options, jacobian=config.jacobian, covariance=initial_cov,
                                  seed=seed, field_gradient=config.field_gradient,
                                  layer_gradient=config.layer_gradient, n_tracks=n_tracks, capacity=capacity)
    unusable = any_lane_flag(hits.unusable, type(positions))  # some track was not propagated
    outputs = [hits.free_rows, hits.local_rows, hits.path_rows, hits.valid_rows, unusable]
    if config.with_covariance:  # as columns (N lanes each)
        outputs.append([c for layer in hits.covariance for row in layer for c in row])
        outputs.append([c for layer in hits.local_covariance for row in layer for c in row])
    return tuple(outputs), hits.record


def _raise_for_unusable(params: torch.Tensor) -> None:
    """The error for tracks the kernel could not propagate (found there: see LayerHits.unusable)."""
    check_tensor(params, "params")  # NaN / inf
    # The kernel normalises by |d| = sqrt(d.d) in the input's precision: d.d must neither be 0 nor overflow.
    raise ValueError(f"params[:, 4:7] (direction) must have positive length, with a squared length finite "
                     f"in {params.dtype} (e.g. unit vectors); directions are normalised")


_NO_WARNING = 2**31 - 1


class _FrozenPropagation:
    """``_propagate`` and the VJP's kernels for one configuration under ``dr.freeze``: the first call
    traces and records the kernels, later calls replay them for the new inputs (any number of
    tracks) without Python tracing.

    Safe because everything the trace depends on is either an input (track parameters, field
    parameters, grid values, layer positions and thicknesses, and N; for the VJP the
    Jacobian record, the output gradients and N) or part of ``config``; sizes inside derive from the
    inputs' widths and no Python value is read back from an array. ``dr.freeze`` itself re-records
    for a new input layout (precision, or N equal to 1 or to another input's size).
    """

    def __init__(self, config: _Configuration):
        self.config, self.field = config, KernelField(*config.field)
        # Bound methods, not closures: dr.freeze walks the values a closure captures on every call
        # (the configuration: ~50 dataclasses, ~0.5 ms), while the instance is not traversed.
        # Recordings per input layout and row capacity (see _row_capacity): batch sizes spanning
        # a factor 2^5 share 20 of them. Varying batch sizes re-record by design (a recording
        # costs about one traced call), so Dr.Jit's warning about frequent re-recording is off.
        self.forward = dr.freeze(self._forward, limit=24, warn_after=_NO_WARNING)
        self.vjp = dr.freeze(_vjp_sums, limit=24, warn_after=_NO_WARNING)  # needs nothing of the configuration

    def _forward(self, *arrays):
        return _propagate(self.config, self.field, 0, *arrays)


def _freezable(freeze: bool, options: kprop.PropagationOptions) -> bool:
    """Sampled scattering is never frozen: its seed would be baked into the recording."""
    return freeze and options.scattering != "sample"


# Frozen propagations by configuration, least recently used first.
_FROZEN = LeastRecentlyUsed(32)


def _frozen(config: _Configuration) -> _FrozenPropagation:
    return _FROZEN.get_or_make(config, lambda: _FrozenPropagation(config))


def _row_capacity(n: int) -> int:
    """Tracks the frozen kernels allocate output rows for: the smallest m 2^k >= n with m in 4..8.
    The allocation keeps its recorded size when replayed, so one recording serves a class of batch
    sizes (four per factor of two) and at most a fifth of the rows goes unused; sizing the rows
    from the tracks instead costs fill kernels (~7 ms per 100 000 tracks on 2 cores)."""
    k = max(n.bit_length() - 3, 0)
    return -(-n // (1 << k)) << k


def _n_tracks(types, n: int):
    """N as a 1-lane array: an input of the frozen kernels, which address the layer-major rows with it."""
    return dr.opaque(types.UInt32, n)


def _vjp_sums(record, grad_free, grad_local, grad_path, n_tracks, parameters: bool):
    """J^T g: gradients of the 8 initial parameters (arrays over tracks), and (if ``parameters``, else None)
    one array with the lane sums of the field, position and thickness gradients (n_field + 2 L
    entries, in that order: one array to hand to torch instead of a 1-lane array each)."""
    initial, field, positions, thickness = kprop.layers_vjp(record, grad_free, grad_local, grad_path, n_tracks,
                                                            parameters=parameters)
    sums = kprop.row_major([dr.sum(a) for a in (*field, *positions, *thickness)]) if parameters else None
    dr.eval(initial, sums)
    return initial, sums


def _propagate_vjp(record, grad_outputs, needs, *, layers, options, field, jacobian, seed,
                   with_covariance, field_gradient, layer_gradient, freeze=False):
    if record is None:
        raise RuntimeError("Propagator: no Jacobian was recorded in the forward pass (was grad mode off?)")
    config = _Configuration(tuple(layers), options, field.key, jacobian, with_covariance, field_gradient,
                            layer_gradient)
    vjp = _frozen(config).vjp if _freezable(freeze, options) else _vjp_sums
    norm = record.direction_norm  # one lane per track
    # Without field or layer gradients (none of them requires grad) the sweep skips their columns.
    parameters = field_gradient or layer_gradient
    initial, sums = vjp(record, *grad_outputs[:3], _n_tracks(types_of(norm), dr.width(norm)), parameters)
    n_layers = len(layers)
    # In the (N, 8) layout by a Dr.Jit kernel (outside the recording, whose allocations keep their
    # recorded size): torch.stack of the 8 columns took ~1 ms at 50 000 tracks (fresh pages).
    grads = [kprop.row_major(initial)]
    if parameters:
        grads += torch.split(sums.torch(), [dr.width(sums) - 2 * n_layers, n_layers, n_layers])
    else:
        grads += [None] * 3
    if with_covariance:
        grads.append(None)
    return tuple(grads)


_PROPAGATE = kernel_function(_propagate_kernel, vjp=_propagate_vjp)


# ---------------------------------------------------------------- helpers


def free_parameters(position: torch.Tensor, momentum: torch.Tensor, charge: torch.Tensor | float,
                    time: torch.Tensor | None = None) -> torch.Tensor:
    """ACTS free parameters (N, 8) from positions (N, 3) [mm], momenta (N, 3) [GeV] and charges (N,) [e]
    (or one charge for all tracks): -1, +1, or 0 for a neutral track. The propagator's particles
    (muon, pion, kaon, proton) have |q| = 1: it reads |p| = 1 / |q/p| for the material effects.

    Differentiable torch code: q/p = charge / |p|, direction = p / |p|, time (N,) 0 unless given [ns].
    """
    check_tensor(position, "position", shape=(None, 3))
    n, like = position.shape[0], dict(dtype=position.dtype, device=position.device)
    check_tensor(momentum, "momentum", shape=(n, 3), **like)
    p = momentum.norm(dim=1)
    if not bool((p > 0).all()):
        raise ValueError("momentum must be non-zero for every track")
    if not isinstance(charge, torch.Tensor):  # a number, list or numpy array
        charge = torch.as_tensor(charge, **like)
    if charge.numel() == 1:  # one charge for all tracks
        charge = charge.reshape(())
    check_tensor(charge, "charge", shape=(n,) if charge.dim() else (), device=position.device)
    unit_or_neutral = (charge.abs() == 1) | (charge == 0)
    if not bool(unit_or_neutral.all()):
        bad = charge.reshape(-1)[~unit_or_neutral.reshape(-1)][0].item()
        raise ValueError(f"charge must be -1, +1 or 0 (neutral) [e], got {bad}: the propagator's particles have "
                         "|q| = 1 (it reads |p| = 1 / |q/p| for the material effects)")
    time = torch.zeros_like(p) if time is None else check_tensor(time, "time", shape=(n,), **like)
    charge = charge.to(position.dtype).expand(n)  # integer charges are fine
    return torch.cat([position, time[:, None], momentum / p[:, None], (charge / p)[:, None]], dim=1)
