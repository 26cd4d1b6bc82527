"""The e+e- -> q qbar dipole parton shower as a torch module.

:class:`PartonShower` holds the tunable shower parameters as 0-d
``nn.Parameter`` s -- ``alpha_s`` (alpha_s(mZ), two-loop running) and ``t0``
(cutoff in kT^2 [GeV^2]) -- and generates events with the Dr.Jit kernel
:func:`pyhybrid.kernels.shower.run_shower` on the device and in the dtype of
its parameters (cpu -> LLVM backend, cuda -> CUDA backend; float32/float64).

The shower is a discrete stochastic program: its events do not depend
differentiably on the parameters. Gradients of *expectations* come from the
estimators of :mod:`pyhybrid.estimators`, e.g.::

    shower = PartonShower(alpha_s=0.125)
    spec = HistogramObservable("log10_y23", edges)
    features = StochasticAD()(shower, spec, n_events=100_000, seed=step)   # (N, K)
    loss = ((features.mean(0) - target) ** 2 / variance).sum()
    loss.backward()                                  # shower.alpha_s.grad, shower.t0.grad

Events: :class:`ShowerEvents` with padded tensors (N, max_particles, ...);
:func:`event_shapes` computes Durham y23..y56 and thrust of any such events
(validated: shapes, dtypes, finite values, multiplicities, massless momenta
conserving (sqrt_s, 0, 0, 0)).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from pyhybrid.engine import check_kernel_dtype, check_tensor, eager_under_compile, to_drjit, types_for
from pyhybrid.kernels.backend import check_integer, check_seed
from pyhybrid.kernels.observables import event_shapes as _event_shapes
from pyhybrid.kernels.alphas import RunningCoupling
from pyhybrid.kernels.shower import ALPHA_S_RANGE, ShowerSettings, run_shower

__all__ = ["PartonShower", "ShowerEvents", "event_shapes", "EVENT_SHAPES"]

#: Keys of :func:`event_shapes`.
EVENT_SHAPES = ("y23", "y34", "y45", "y56", "thrust")


@dataclass
class ShowerEvents:
    """Showered events, padded to ``max_particles`` slots.

    momenta (N, M, 4) [GeV] (E, px, py, pz), zero beyond n_particles; pid (N, M) int32 PDG
    ids (0 = empty); colour (N, M, 2) int32 LHE colour/anticolour tags; n_particles (N,) int64;
    sqrt_s [GeV].
    """

    momenta: torch.Tensor
    pid: torch.Tensor
    colour: torch.Tensor
    n_particles: torch.Tensor
    sqrt_s: float

    @property
    def mask(self) -> torch.Tensor:
        """(N, M) bool: slot holds a particle."""
        slots = torch.arange(self.momenta.shape[1], device=self.momenta.device)
        return slots[None, :] < self.n_particles[:, None]

    def event_shapes(self) -> dict:
        """Durham y23..y56 and thrust of every event (see :func:`event_shapes`)."""
        return event_shapes(self.momenta, self.n_particles, self.sqrt_s)


class PartonShower(nn.Module):
    """e+e- -> q qbar at ``sqrt_s`` [GeV] followed by the dipole shower.

    alpha_s: alpha_s(mZ) in [0.05, 0.14] (two-loop running with thresholds); t0: cutoff [GeV^2],
    above the scale where alpha_s reaches 1 (which rises with alpha_s: 1 GeV^2 is valid up to
    alpha_s(mZ) = 0.135) and below s/4; max_particles: slots per event (an event needing more
    raises an error); dtype/device: of the parameters, hence of the kernels.
    An optimiser step may leave this region: :meth:`project` moves the parameters back into it.
    """

    def __init__(self, alpha_s: float = 0.118, t0: float = 1.0, *, sqrt_s: float = 91.2, max_particles: int = 64,
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        super().__init__()
        check_kernel_dtype(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device}: this torch build has no CUDA or sees no GPU (a CUDA build of "
                             "torch: see the README); use device='cpu'")
        alpha_s, t0 = (float(v.detach()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                       for v in (alpha_s, t0))
        settings = ShowerSettings(alpha_s_mz=alpha_s, t0=t0, sqrt_s=sqrt_s, max_particles=max_particles)
        self.alpha_s = nn.Parameter(torch.tensor(settings.alpha_s_mz, dtype=dtype, device=device))
        self.t0 = nn.Parameter(torch.tensor(settings.t0, dtype=dtype, device=device))
        self.sqrt_s = settings.sqrt_s
        self.max_particles = settings.max_particles

    @torch.no_grad()
    def project(self, margin: float = 0.01) -> None:
        """Move alpha_s and t0 (in place) to the nearest valid values, e.g. after an optimiser step:
        alpha_s into ALPHA_S_RANGE, then t0 into [(1 + margin) t_min(alpha_s), (1 - margin) s/4],
        t_min being the scale where alpha_s reaches 1. ``margin`` in [0, 0.5).
        (``Relaxed(cutoff_width > 0)`` needs t0 above this range: see its error message.)"""
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not 0 <= margin < 0.5:
            raise ValueError(f"margin must be a number in [0, 0.5), got {margin!r}")
        low, high = ALPHA_S_RANGE
        self.alpha_s.clamp_(low, high)
        lowest = RunningCoupling(float(self.alpha_s)).lowest_valid_scale()
        self.t0.clamp_((1.0 + margin) * lowest, (1.0 - margin) * self.sqrt_s**2 / 4.0)

    def parameter_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_s, t0), validated: 0-d, finite, one dtype and device."""
        alpha_s = check_tensor(self.alpha_s, "alpha_s", shape=())
        t0 = check_tensor(self.t0, "t0", shape=(), dtype=alpha_s.dtype, device=alpha_s.device)
        return alpha_s, t0

    def settings(self) -> ShowerSettings:
        """Current parameters as validated kernel settings (range errors name the parameter)."""
        alpha_s, t0 = self.parameter_tensors()
        return ShowerSettings(alpha_s_mz=float(alpha_s.detach()), t0=float(t0.detach()), sqrt_s=self.sqrt_s,
                              max_particles=self.max_particles)

    def kernel_types(self):
        alpha_s, _ = self.parameter_tensors()
        return types_for(alpha_s.device, alpha_s.dtype)

    @eager_under_compile  # input checks and Dr.Jit: one graph break under torch.compile
    def forward(self, n_events: int, seed: int = 0) -> ShowerEvents:
        """Generate ``n_events`` showered events (no gradient; see :mod:`pyhybrid.estimators`)."""
        n_events = check_integer(n_events, "n_events", 1)
        settings = self.settings()
        result = run_shower(self.kernel_types(), n_events, settings, check_seed(seed))
        if bool(result.overflow.torch().any()):
            raise RuntimeError(f"an event needed more than max_particles = {self.max_particles} partons; "
                               "increase max_particles")
        record = result.record
        m = settings.max_particles

        def padded(array):  # event-major (N * M,) -> (N, M)
            return array.torch().reshape(n_events, m).clone()

        momenta = torch.stack([padded(c) for c in (record.E, record.px, record.py, record.pz)], dim=-1)
        colour = torch.stack([padded(record.col).to(torch.int32), padded(record.acol).to(torch.int32)], dim=-1)
        return ShowerEvents(momenta, padded(record.pid), colour, result.n_particles.torch().to(torch.int64),
                            settings.sqrt_s)


def event_shapes(momenta: torch.Tensor, n_particles: torch.Tensor, sqrt_s: float,
                 tolerance: float = 1e-6) -> dict:
    """Durham y23, y34, y45, y56 and thrust of padded events.

    momenta: (N, M, 4) float32/float64 [GeV] (E, px, py, pz), massless particles in the first
    n_particles[i] slots; n_particles: (N,) integer tensor with 2 <= n <= M; sqrt_s [GeV] (a number
    or a 0-d tensor): centre-of-mass energy, each event must sum to (sqrt_s, 0, 0, 0) within tolerance * sqrt_s
    and have |p^2| <= tolerance * s per particle. Returns {name: (N,) tensor}, no gradient.
    """
    momenta = check_tensor(momenta, "momenta", shape=(None, None, 4))
    if momenta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"momenta must be float32 or float64, got {momenta.dtype}")
    n_events, m = momenta.shape[0], momenta.shape[1]
    if n_events < 1 or m < 2:
        raise ValueError(f"momenta must hold >= 1 event of >= 2 slots, got shape {tuple(momenta.shape)}")
    n_particles = check_tensor(n_particles, "n_particles", shape=(n_events,), device=momenta.device)
    if n_particles.is_floating_point() or n_particles.dtype == torch.bool:
        raise TypeError(f"n_particles must be an integer tensor, got {n_particles.dtype}")
    if bool(((n_particles < 2) | (n_particles > m)).any()):
        raise ValueError(f"n_particles must lie in [2, {m}] (the slots of momenta)")
    if isinstance(sqrt_s, torch.Tensor) and sqrt_s.dim() == 0:
        sqrt_s = float(sqrt_s)
    if not (isinstance(sqrt_s, numbers.Real) and 0 < sqrt_s < math.inf):
        raise ValueError(f"sqrt_s must be a positive finite number [GeV], got {sqrt_s!r}")
    slots = torch.arange(m, device=momenta.device)
    inside = (slots[None, :] < n_particles[:, None]).to(momenta.dtype)[..., None]
    used = momenta * inside
    s = float(sqrt_s) ** 2
    mass2 = used[..., 0] ** 2 - (used[..., 1:] ** 2).sum(-1)
    if bool((mass2.abs() > tolerance * s).any()) or bool((used[..., 0] < 0).any()):
        raise ValueError("momenta must be massless with E >= 0 (|p^2| <= tolerance * s)")
    total = used.sum(1)
    total[:, 0] -= sqrt_s
    if bool((total.abs() > tolerance * sqrt_s).any()):
        worst = int(total.abs().amax(1).argmax())
        raise ValueError(f"momenta: event {worst} does not sum to (sqrt_s, 0, 0, 0) within "
                         f"{tolerance:g} sqrt_s (deviation {float(total[worst].abs().max()):.3g} GeV)")
    columns = [to_drjit(used[..., k].contiguous()) for k in range(4)]  # event-major
    types = types_for(momenta.device, momenta.dtype)
    counts = types.UInt32(types.Int32(n_particles.to(torch.int32).contiguous()))
    shapes = _event_shapes(columns, counts, s)
    values = [*shapes.y, shapes.thrust]
    return {name: v.torch().clone() for name, v in zip(EVENT_SHAPES, values)}
