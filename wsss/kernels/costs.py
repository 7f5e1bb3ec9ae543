"""Work counts of one call of an op: matrix-product FLOPs, bytes moved and peak extra memory.

Counted, not timed: the call runs on fake CUDA tensors (no GPU, no memory) under a dispatch mode
that sees every aten op and every ``wsss_kernels`` custom op it issues, autograd's backward
included. Conventions, the same for both paths:

- FLOPs: 2·M·N·K of the matrix products (torch's flop formulas for aten; for the custom ops the
  products their kernels execute at the launch configuration, padding of the class tiles and
  recomputed logits included). Elementwise work (exp, sigmoid, masks) is not counted.
- bytes: each op reads its tensor inputs once and writes its outputs once (views and metadata ops
  move nothing); a custom op counts as the launches of its real implementation at the CUDA
  configuration, each reading or writing each of its distinct tensor arguments once (PAR's κ
  once per iteration, the logits once per kernel that reads them), plus the torch ops around
  them. Re-reads within a kernel (served from L2) are not counted on either side.
- peak: the most bytes of tensors created inside the call alive at once (inputs excluded), as a
  caching allocator would hold them; what autograd saves for the backward is alive until then.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, NamedTuple
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from . import _common


class Cost(NamedTuple):
    flops: int
    bytes: int
    peak: int


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _tensors(tree):
    if torch.is_tensor(tree):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


# ---------------------------------------------------------------------------------------------- custom ops
def _dot_loss_flops(x, y, labels, mode, *_):
    B, N, D = x.shape
    return 2 * B * N * N * D


def _dot_loss_bwd_flops(grad, counts, scores, x, y, labels, mode, *_):
    B, N, D = x.shape
    from .affinity import MODE_COSINE

    return 2 * B * N * N * D * (1 if mode == MODE_COSINE else 2)  # dx only for cosine (dy = dx)


def _propagate_flops(cam, src, num_class_tokens, dh, dtype, from_qk):
    from .attention import _propagate_config

    L, B, Hd, T = src.shape[:4]
    C = cam.shape[1]
    cfg = _propagate_config(L, Hd, B, T, C, num_class_tokens, dh, dtype, "cuda", from_qk)
    tiles = math.ceil(C / cfg["BLOCK_CLS"])
    rows = T - num_class_tokens
    # p·v per class tile, and q·kᵀ (head dim padded to BLOCK_DH) again for each class tile
    per_pair = tiles * cfg["BLOCK_CLS"] + (tiles * cfg["BLOCK_DH"] if from_qk else 0)
    return 2 * L * Hd * B * rows * T * per_pair


CUSTOM_FLOPS: Dict[str, Callable] = {
    "wsss_kernels::dot_affinity_loss": _dot_loss_flops,
    "wsss_kernels::dot_affinity_loss_backward": _dot_loss_bwd_flops,
    "wsss_kernels::propagate_cam":
        lambda cam, x, coef, cc: _propagate_flops(cam, x, cc, 1, x.dtype, False),
    "wsss_kernels::propagate_cam_qk":
        lambda cam, q, k, coef, cc, scale: _propagate_flops(cam, q, cc, q.shape[-1], q.dtype, True),
}


# the launcher behind each custom op (what its real implementation calls)
def _launcher(module: str, name: str, *fixed) -> Callable[[], Callable]:
    def get():
        import importlib

        fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return (lambda *args: fn(*args, *fixed)) if fixed else fn
    return get


LAUNCHERS: Dict[str, Callable[[], Callable]] = {
    "wsss_kernels::dot_affinity_loss": _launcher("affinity", "_dot_loss_forward"),
    "wsss_kernels::dot_affinity_loss_backward": _launcher("affinity", "_dot_loss_backward"),
    "wsss_kernels::sigmoid_affinity_loss": _launcher("affinity", "_sigmoid_loss_forward"),
    "wsss_kernels::sigmoid_affinity_loss_backward": _launcher("affinity", "_sigmoid_loss_backward"),
    "wsss_kernels::aggregate_attention": _launcher("attention", "_aggregate_forward"),
    "wsss_kernels::aggregate_attention_backward": _launcher("attention", "_aggregate_backward_launch"),
    "wsss_kernels::propagate_cam": lambda: (lambda cam, x, coef, cc: _launcher("attention", "_launch_propagate")()(
        cam, x, None, None, coef, cc, 1.0)),
    "wsss_kernels::propagate_cam_qk": lambda: (lambda cam, q, k, coef, cc, scale: _launcher(
        "attention", "_launch_propagate")()(cam, None, q, k, coef, cc, scale)),
    "wsss_kernels::par_refine": _launcher("par", "_par_refine_triton"),
}


def _launcher_work(launcher: Callable, args, kwargs):
    """(bytes, peak temporaries) of a custom op's real implementation at the CUDA configuration:
    the torch ops it runs, and each launch's distinct tensor arguments read or written once."""
    nested = _Counter()
    with _common.recording() as launches, nested:
        launcher(*args, **kwargs)
    kernel_bytes = 0
    for item in launches:
        distinct = {id(a): a for a in item.args if torch.is_tensor(a)}
        kernel_bytes += sum(_nbytes(a) for a in distinct.values())
    return nested.bytes + kernel_bytes, nested.peak


# ---------------------------------------------------------------------------------------------- counting
# ops that move no data: metadata, and allocations that write nothing (their memory still counts)
ALLOCATING = ("aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
              "aten::empty_like")
NO_TRAFFIC = ALLOCATING + ("aten::detach", "aten::lift_fresh", "aten::_local_scalar_dense", "aten::alias",
                          "aten::_unsafe_view")  # a view whose schema does not say so


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = self.bytes = self.live = self.peak = 0

    def _alloc(self, t: torch.Tensor) -> None:
        size = _nbytes(t)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        returns_views = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        outputs = list(_tensors(out))
        if returns_views or not outputs or name in NO_TRAFFIC:
            for t in outputs if name in ALLOCATING else ():
                self._alloc(t)
            return out
        if name in LAUNCHERS:
            traffic, temporaries = _launcher_work(LAUNCHERS[name](), args, kwargs)
            self.bytes += traffic
            self.peak = max(self.peak, self.live + temporaries)
        else:
            reads = list(_tensors((args, kwargs)))
            if name == "aten::copy_":  # reads the source only
                reads = reads[1:]
            self.bytes += sum(_nbytes(t) for t in reads) + sum(_nbytes(t) for t in outputs)
        if name in CUSTOM_FLOPS:
            self.flops += int(CUSTOM_FLOPS[name](*args, **kwargs))
        elif func._overloadpacket in flop_registry:
            self.flops += int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        for t in _tensors(out):
            if not any(t is a for a in _tensors((args, kwargs))):  # in-place results are not new memory
                self._alloc(t)
        return out


@contextmanager
def _fake_tensors():
    """Fake CPU tensors (autograd's CUDA device threads would look for a GPU) on which the ops take
    their Triton path as the interpreter allows; under fake tensors a custom op runs its fake
    implementation, so nothing is launched. The label-range check, which reads values, is off."""
    with FakeTensorMode(), mock.patch.object(_common, "_compiling", lambda: True), \
            mock.patch.object(_common, "interpreting", lambda: True):
        yield torch.device("cpu")


def count(make_inputs: Callable[[torch.device], tuple], fn: Callable[..., torch.Tensor],
          backward: bool = False) -> Cost:
    """Work of ``fn(*make_inputs(device))`` (and of ``.sum().backward()`` through it)."""
    with _fake_tensors() as device:
        inputs = make_inputs(device)
        counter = _Counter()
        with counter:
            out = fn(*inputs)
            if backward:
                out.float().sum().backward()
            del out
        return Cost(counter.flops, counter.bytes, counter.peak)


def compare(make_inputs, call: Callable[[str], Callable], backward: bool = False) -> Dict[str, Cost]:
    """``{"triton": Cost, "reference": Cost}``: ``call(impl)`` returns the function to count."""
    return {impl: count(make_inputs, call(impl), backward) for impl in ("triton", "reference")}


__all__ = ["Cost", "count", "compare", "CUSTOM_FLOPS"]
