"""Dispatch and validation shared by the ops of ``wsss.kernels``.

Triton is optional: without it every op runs its PyTorch reference (``impl="auto"``) and
``impl="triton"`` raises. The kernel files import ``triton``/``tl`` from here so that their
``@triton.jit`` definitions parse either way.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

try:  # laptops without triton still import wsss.kernels
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _MissingTriton:
        """Stand-in whose ``jit`` leaves the function as is; dispatch never launches it."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    triton = tl = _MissingTriton()

IMPLS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, op: str, *tensors: torch.Tensor) -> str:
    """``"reference"`` or ``"triton"`` for ``impl`` given the tensors the op runs on.

    ``auto`` picks Triton when every tensor is on CUDA and triton is installed, the reference
    otherwise; ``triton`` on CPU tensors needs the interpreter. On CUDA the reference would be
    the choice where it is cheaper on every count (FLOPs, bytes moved, peak memory); at none of
    the shapes training and evaluation use is it (the work counts in
    benchmarks/results/triton-kernels.md, from ``wsss.kernels.costs``), so there is no shape rule.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "reference":
        return "reference"
    if impl == "auto":
        return "triton" if (on_cuda and HAS_TRITON) else "reference"
    if not HAS_TRITON:
        raise ValueError(f"{op}: impl='triton' needs the triton package, which is not installed")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"{op}: impl='triton' on {', '.join(devices)} tensors needs CUDA tensors or "
                         f"TRITON_INTERPRET=1 (set before wsss.kernels is imported)")
    return "triton"


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def check_tensor(name: str, x, ndim: int, floating: Optional[bool] = None) -> None:
    """``x`` is a tensor of ``ndim`` dims; floating point (``floating=True``) or integer (``False``)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {_shape(x)}")
    if floating is True and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64), got {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


_VALUE_CHECKS: contextvars.ContextVar = contextvars.ContextVar("wsss_kernels_value_checks", default=True)


@contextlib.contextmanager
def trusted_values():
    """Inside the block the ops skip the checks that read tensor *values* back to the host
    (label ranges, finite layer weights): a host sync each on CUDA. The training step runs its
    objective inside it, because its labels and weights are in range by construction (the data
    pipeline checks the image labels once per batch); shapes, dtypes and devices are still
    checked."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def checking_values() -> bool:
    """False inside :func:`trusted_values` or while torch.compile traces."""
    return _VALUE_CHECKS.get() and not _compiling()


def check_labels(name: str, labels: torch.Tensor, ignore_index: int) -> None:
    """Integer (B,h,w) labels whose values are >= 0 or ``ignore_index``.

    The value check reads the tensor back (a sync), so it is skipped while torch.compile traces
    and inside :func:`trusted_values`.
    """
    check_tensor(name, labels, 3, floating=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not checking_values() or labels.numel() == 0:
        return
    bad = (labels < 0) & (labels != ignore_index)
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(f"{name} must hold class indices >= 0 or ignore_index={ignore_index}, "
                         f"got negative values {values}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_int_sequence(name: str, values: Sequence[int], minimum: int = 1) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}") from None
    if not values or any(isinstance(v, bool) or int(v) != v or v < minimum for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}, got {values}")
    return tuple(int(v) for v in values)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the references: fp32 for half inputs, float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


# ----------------------------------------------------------------------------------------------
# launch configuration and launching
# ----------------------------------------------------------------------------------------------
# While a recording is active (wsss.kernels.aot) the launchers run on meta tensors as if on CUDA
# and ``launch`` collects what it would launch instead of launching it.
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("wsss_kernels_recording", default=None)


class Launch(NamedTuple):
    """One kernel launch as a launcher issues it (what ``recording`` collects)."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    meta: Dict[str, Any]
    device: torch.device


@contextlib.contextmanager
def recording():
    """Collect the launches of the launchers called inside instead of running them; the launchers
    choose their configurations as on CUDA (``launch_device_type``). Yields the list of ``Launch``."""
    launches: List[Launch] = []
    token = _RECORDING.set(launches)
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def launch_device_type(x: torch.Tensor) -> str:
    """The device type the launch configuration is chosen for: ``"cuda"`` for CUDA tensors (and
    while recording), ``"cpu"`` otherwise — including CUDA tensors under the interpreter, which
    runs whole blocks as numpy arrays and does arithmetic on raw half values wrongly."""
    if _RECORDING.get() is not None:
        return "cuda"
    return "cuda" if x.device.type == "cuda" and not interpreting() else "cpu"


def dot_config(dtype: torch.dtype, device_type: str) -> dict:
    """``DOT_TY`` (operand type of ``tl.dot``) and ``DOT_PREC`` (its ``input_precision``) for inputs
    of ``dtype``: on CUDA half inputs multiply as half (fp32 accumulation; their products are
    exact in fp32, so only the summation order differs from the upcasting references), fp32 as
    TF32 when torch's fp32 matmuls may (``tf32_matmuls``); float64 and the interpreter multiply
    in IEEE fp32/fp64."""
    if dtype == torch.float64:
        return dict(DOT_TY=tl.float64, DOT_PREC="ieee")
    if device_type != "cuda":
        return dict(DOT_TY=tl.float32, DOT_PREC="ieee")
    half = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype in half:
        return dict(DOT_TY=half[dtype], DOT_PREC="ieee")
    return dict(DOT_TY=tl.float32, DOT_PREC="tf32" if tf32_matmuls() else "ieee")


def tf32_matmuls() -> bool:
    """Whether fp32 products may use TF32 tensor cores (10-bit mantissa): as torch's own matmuls,
    i.e. ``torch.set_float32_matmul_precision("high")`` — which wsss's ``tf32`` config (default
    on) sets for training and evaluation — and not under torch's default ``"highest"``."""
    return torch.get_float32_matmul_precision() != "highest"


def acc_type(dtype: torch.dtype):
    """Accumulator type inside the kernels: fp64 for float64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device and
    stream, so a ``cuda:1`` tensor in a process whose current device is 0 needs the guard."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` under the device guard of its tensor arguments (the one
    place the kernels of ``wsss.kernels`` are launched)."""
    device = next(a.device for a in args if torch.is_tensor(a))
    recorder = _RECORDING.get()
    if recorder is not None:
        recorder.append(Launch(kernel, tuple(grid), args, meta, device))
        return
    with device_guard(device):
        kernel[grid](*args, **meta)
