"""Dispatch and validation shared by the ops of ``wsss.kernels``.

Triton is optional: without it every op runs its PyTorch reference (``impl="auto"``) and
``impl="triton"`` raises. The kernel files import ``triton``/``tl`` from here so that their
``@triton.jit`` definitions parse either way.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

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
    otherwise; ``triton`` on CPU tensors needs the interpreter.
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


def check_labels(name: str, labels: torch.Tensor, ignore_index: int) -> None:
    """Integer (B,h,w) labels whose values are >= 0 or ``ignore_index``.

    The value check reads the tensor back (a sync), so it is skipped while torch.compile traces.
    """
    check_tensor(name, labels, 3, floating=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if _compiling() or labels.numel() == 0:
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
