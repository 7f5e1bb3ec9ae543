"""Loading of the compiled extension ``wsss._C`` and the Python half of its op registrations.

The extension is imported on first use, not at ``import wsss``, so that the pure-Python parts of
the package work without a compiler. A missing or broken build raises one ``ImportError`` that
says how to build it. After loading, the fake (meta) kernels and the autograd formula of the ops
are registered here (pytorch/extension-cpp pattern: schemas and kernels in C++, the rest in
Python).
"""
from __future__ import annotations

import importlib
import threading

import torch

BUILD_HINT = (
    "the wsss C++/CUDA extension (wsss._C) is not built or failed to load; build it from the "
    "repository root with `pip install --no-build-isolation -e .` (set CUDA_HOME=/usr/local/cuda "
    "when a CUDA toolkit is installed there)"
)

_lock = threading.Lock()
_state: dict = {}  # module name -> None when loaded, else the error text
_registered = False


def ops(module_name: str = "wsss._C"):
    """Return ``torch.ops.wsss`` after loading the extension once; raise ImportError if unavailable."""
    with _lock:
        if module_name in _state:
            error = _state[module_name]
            if error is not None:
                raise ImportError(f"{BUILD_HINT}: {error}") from None
            return torch.ops.wsss
        try:
            importlib.import_module(module_name)
            torch.ops.wsss.permutohedral_filter.default  # noqa: B018  (fails if the schemas are missing)
            torch.ops.wsss.dense_crf.default  # noqa: B018
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _state[module_name] = f"{type(exc).__name__}: {exc}"
            raise ImportError(f"{BUILD_HINT}: {type(exc).__name__}: {exc}") from exc
        global _registered
        if not _registered:
            _register_python_parts()
            _registered = True
        _state[module_name] = None
        return torch.ops.wsss


def _register_python_parts() -> None:
    @torch.library.register_fake("wsss::permutohedral_filter")
    def _(features, values, transpose=False):
        torch._check(features.dim() == 3 and values.dim() == 3)
        torch._check(features.shape[0] == values.shape[0] and features.shape[1] == values.shape[1])
        return torch.empty_like(values)

    @torch.library.register_fake("wsss::dense_crf")
    def _(image, probs, num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w, num_threads=0):
        torch._check(image.dim() == 4 and probs.dim() == 4)
        return torch.empty_like(probs)

    def setup_context(ctx, inputs, output):
        features, _, transpose = inputs
        ctx.save_for_backward(features)
        ctx.transpose = transpose

    def backward(ctx, grad):
        (features,) = ctx.saved_tensors
        # The lattice filter is linear in the values; its adjoint runs the blur passes in reverse
        # order (SPEC §6.2). Features are treated as constants (the lattice is piecewise in them).
        grad_values = torch.ops.wsss.permutohedral_filter(features, grad.contiguous(), not ctx.transpose)
        return None, grad_values, None

    torch.library.register_autograd("wsss::permutohedral_filter", backward, setup_context=setup_context)
