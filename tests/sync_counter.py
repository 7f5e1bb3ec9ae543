"""Counting the ATen ops of a region and the ones that would block the host on a CUDA device.

On a CPU the blocking copies and reads are free, so they are recognised by what they are:

- reads of a tensor's value by the host: ``aten::_local_scalar_dense`` (``item()``, ``bool()``,
  ``float()``, ``int()``), ``Tensor.tolist`` / ``numpy`` / ``cpu`` (device → host copies);
- ops whose output size depends on the data, so the host waits for the device to learn it:
  ``nonzero``, ``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size``,
  ``bincount``, ``equal`` / ``allclose``, and advanced indexing with a boolean mask
  (``x[mask]``; ``x[mask] = scalar`` takes ``masked_fill_``'s path and does not sync);
- host → device copies made by ``torch.tensor(data, device=…)`` / ``torch.as_tensor``: a
  non-pinned copy synchronises the stream on CUDA.

``aten`` launches are every op that reaches the dispatcher below autograd (the forward, the
backward and the optimizer), view and metadata ops included: the same count before and after a
change is what matters here.
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select", "bincount", "equal", "allclose", "histc", "histogram"}
_HOST_READS = {"tolist", "numpy", "cpu", "__array__"}
_HOST_TO_DEVICE = {"tensor", "as_tensor"}


def _where() -> str:
    """The innermost wsss frame of the current stack (file:line function)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/wsss/" in frame.filename:
            return f"{frame.filename.split('/wsss/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


def _bool_index(indices) -> bool:
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices if i is not None)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.counter.launches += 1
        sync = name in _SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                     and len(args) == 1)
        if name == "index" and _bool_index(args[1]):
            sync = True
        if name in ("index_put", "index_put_", "_index_put_impl_") and _bool_index(args[1]) \
                and not (torch.is_tensor(args[2]) and args[2].numel() == 1):
            sync = True
        if sync:
            self.counter.add(f"aten::{name}")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and torch.is_tensor(args[0]):
            self.counter.add(f"Tensor.{name}")
        elif name in _HOST_TO_DEVICE and func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and not (args and torch.is_tensor(args[0])):
            self.counter.add(f"torch.{name}(device=)")
        return func(*args, **kwargs)


class SyncCounter:
    """``with SyncCounter() as c: ...`` → ``c.syncs`` (Counter of "op @ place"), ``c.launches``."""

    def __init__(self):
        self.syncs = collections.Counter()
        self.launches = 0
        self._modes = [_Function(self), _Dispatch(self)]

    def add(self, what: str) -> None:
        self.syncs[f"{what} @ {_where()}"] += 1

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False
