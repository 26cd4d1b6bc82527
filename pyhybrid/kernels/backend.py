"""Dr.Jit array types for one backend and precision (no torch here).

Kernels are written once against a :class:`KernelTypes` namespace and run on
the LLVM backend (CPU, SIMD over all cores) or the CUDA backend, in float32 or
float64. Every kernel obtains its types either from the device/precision the
caller asks for (:func:`kernel_types`) or from an input array
(:func:`types_of`), so a kernel never hard-codes a backend.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import ModuleType

import drjit as dr

DEVICES = ("cpu", "cuda")
PRECISIONS = ("float32", "float64")

# Dr.Jit 1.5 emits llvm.minimum/maximum, which the x86 backend of LLVM 15 cannot select (the
# process aborts inside dr.minimum, dr.clip, PCG32 normals), so 16 is the real floor.
MIN_LLVM_MAJOR = 16
_LLVM_HINT = (
    f"Dr.Jit's CPU backend needs libLLVM >= {MIN_LLVM_MAJOR} (on Debian 12: "
    "`apt-get install libllvm19`; or set DRJIT_LIBLLVM_PATH=/path/to/libLLVM.so.19.1)."
)


def inverse_sqrt(x):
    """1 / sqrt(x), as fast as the backend allows it accurately.

    On the CPU (LLVM) ``dr.rsqrt`` is the hardware estimate refined by a Newton step: within
    2e-7 relative in float32 (1 ulp in float64), twice as fast as a square root and a division
    (6 % of a propagation in float32). (A float64 variant, the float32 estimate refined by two
    float64 Newton steps, was twice as fast in isolation but made the propagation 17 % slower:
    more live registers in the stepping loop.) On CUDA ``dr.rsqrt`` is an approximate
    instruction even in float64 (|M|^2 off by 3e-8, hits by 1e-5 mm on an H100), so there it
    is 1 / dr.sqrt(x).
    """
    return dr.rsqrt(x) if dr.backend_v(x) == dr.JitBackend.LLVM else 1.0 / dr.sqrt(x)


def any_lane_flag(mask, float_type):
    """A 1-element ``float_type`` array: 1.0 if ``mask`` is True in some lane, else 0.0.

    Written by those lanes inside the kernel that evaluates it: cheaper than ``dr.any`` (no
    N-lane mask in memory, no reduction kernels; ~0.25 ms of a 7 ms matrix-element forward
    of 2^20 events). Used to decide on the host whether an input check failed."""
    flag = dr.zeros(float_type, 1)
    dr.scatter(flag, 1.0, dr.zeros(dr.uint32_array_t(float_type), 1), active=mask)
    return flag


class BackendUnavailable(RuntimeError):
    """The requested Dr.Jit backend cannot run on this machine."""


@dataclass(frozen=True)
class KernelTypes:
    """Dr.Jit types of one backend (``device``) and floating precision.

    ``Float`` is the differentiable floating type of the chosen precision;
    ``Array3`` is a 3-vector of ``Float``; ``ArrayX`` a vector of a run-time number
    of ``Float`` arrays (packet gathers/scatters of whole rows, ravel); ``PCG32`` the
    per-lane random generator; ``UInt32``/``Int32``/``Bool`` the matching integer and mask types.
    """

    device: str
    precision: str
    module: ModuleType
    Float: type
    Array3: type
    UInt32: type
    Int32: type
    Bool: type
    PCG32: type

    @property
    def is_double(self) -> bool:
        return self.precision == "float64"

    @property
    def ArrayX(self) -> type:
        return self.module.ArrayXf64 if self.is_double else self.module.ArrayXf

    def uniform(self, rng) -> "object":
        """Next uniform number in [0, 1) from ``rng`` in this precision."""
        return rng.next_float64() if self.is_double else rng.next_float32()

    def normal(self, rng) -> "object":
        """Next standard-normal number from ``rng`` in this precision."""
        return rng.next_float64_normal() if self.is_double else rng.next_float32_normal()

    def rng(self, n: int, seed: int, stream: int = 0, lane=None):
        """One PCG32 generator per lane, seeded from (seed, lane index).

        Lanes are independent streams; the same (n, seed, stream) reproduces
        the same numbers on the CPU backend. ``lane``: the index each lane is seeded
        with (a UInt32 array of n entries; default 0..n-1), e.g. the track a lane runs
        when the lanes are reordered, so that a track draws the same numbers in any order.
        """
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        seed = check_seed(seed)
        if lane is None:
            lane = dr.arange(self.UInt32, n)
        # Opaque seeds: a literal would be baked into the kernel, recompiling it for every new seed.
        low = dr.opaque(self.UInt32, seed & 0xFFFFFFFF)
        high = dr.opaque(self.UInt32, (seed >> 32) & 0xFFFFFFFF)
        # Hashed per-lane state and increment: PCG32 streams started from sequential values are
        # correlated (|rho| up to 0.06 measured between lanes 2 apart); hashed ones are not.
        salt = stream + 1
        initstate = _mix32(lane ^ _mix32(low + ((0x9E3779B9 * salt) & 0xFFFFFFFF)))
        initseq = _mix32(lane + _mix32(high ^ ((0x85EBCA6B * salt) & 0xFFFFFFFF)))
        # Seeded as the constructor seeds (it adds arange(n) to both values), with the lane's index.
        rng = self.PCG32(size=n)
        UInt64 = dr.uint64_array_t(self.UInt32)
        rng.seed(UInt64(initstate) + UInt64(lane), UInt64(initseq) + UInt64(lane))
        return rng


def check_integer(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as a Python int if it is an integer (Python or numpy; not a bool) in [low, high]
    (no upper bound for None), else ValueError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        bounds = "a positive integer" if (low, high) == (1, None) else (
            f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return int(value)


def name_tuple(names) -> tuple:
    """One name (a str) or an iterable of names as a tuple of names (a str is not split into letters)."""
    return (names,) if isinstance(names, str) else tuple(names)


def check_seed(seed) -> int:
    """``seed`` if it is an integer in [0, 2^64) (the 64 bits :meth:`KernelTypes.rng` uses), else ValueError."""
    return check_integer(seed, "seed", 0, 2**64 - 1)


def _mix32(x):
    """Integer hash of a UInt32 array (lowbias32 finaliser, C. Wellons): full avalanche."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def llvm_version() -> tuple[int, int, int] | None:
    """Version of the libLLVM Dr.Jit loaded, or None when none was found."""
    if not dr.has_backend(dr.JitBackend.LLVM):
        return None
    return tuple(dr.detail.llvm_version())


def cuda_available() -> bool:
    """True when Dr.Jit can run on a CUDA GPU."""
    return bool(dr.has_backend(dr.JitBackend.CUDA))


def check_device(device: str) -> None:
    """Raise a clear error if ``device`` is unknown or its backend is missing."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        version = llvm_version()
        if version is None:
            raise BackendUnavailable("device='cpu' is unavailable: no libLLVM found. " + _LLVM_HINT)
        if version[0] < MIN_LLVM_MAJOR:
            raise BackendUnavailable(
                f"device='cpu' is unavailable: Dr.Jit loaded libLLVM {'.'.join(map(str, version))}. " + _LLVM_HINT)
    if device == "cuda" and not cuda_available():
        raise BackendUnavailable(
            "device='cuda' is unavailable: Dr.Jit found no CUDA driver/GPU on this machine."
        )


def kernel_types(device: str = "cpu", precision: str = "float32") -> KernelTypes:
    """Types for ``device`` ('cpu' -> drjit.llvm.ad, 'cuda' -> drjit.cuda.ad)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_device(device)
    if device == "cpu":
        import drjit.llvm.ad as module
    else:
        import drjit.cuda.ad as module
    double = precision == "float64"
    return KernelTypes(
        device=device,
        precision=precision,
        module=module,
        Float=module.Float64 if double else module.Float,
        Array3=module.Array3f64 if double else module.Array3f,
        UInt32=module.UInt32,
        Int32=module.Int32,
        Bool=module.Bool,
        PCG32=module.PCG32,
    )


def types_of(array) -> KernelTypes:
    """The :class:`KernelTypes` matching a Dr.Jit floating array (or 3-vector)."""
    leaf = array
    while dr.depth_v(leaf) > 1:
        leaf = leaf[0]
    backend = dr.backend_v(leaf)
    device = {dr.JitBackend.LLVM: "cpu", dr.JitBackend.CUDA: "cuda"}.get(backend)
    if device is None:
        raise TypeError(f"expected a Dr.Jit LLVM or CUDA array, got {type(array).__name__}")
    vtype = dr.type_v(leaf)
    if vtype == dr.VarType.Float64:
        precision = "float64"
    elif vtype == dr.VarType.Float32:
        precision = "float32"
    else:
        raise TypeError(f"expected a float32/float64 Dr.Jit array, got {vtype}")
    return kernel_types(device, precision)
