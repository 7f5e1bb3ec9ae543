"""Checks run before any long work starts: every problem the resolved config would hit later
(a missing extension, weight file, split file, label file, entropy file, a resume checkpoint
that does not fit, more processes than GPUs) is collected and reported at once, one line per
problem naming the config key and the path."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence


class PreflightError(RuntimeError):
    """The run cannot start; the message lists every problem found."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{what} cannot start:\n" + "\n".join(f"  - {p}" for p in self.problems))


def missing_file(key: str, path, hint: str = "") -> List[str]:
    """``[message]`` when ``path`` (the value of config key ``key``) is not a file, else ``[]``."""
    if path and Path(path).is_file():
        return []
    what = f"{key}={str(path)!r}: file not found" if path else f"{key} is empty"
    return [what + (f" ({hint})" if hint else "")]


def extension_problem(reason: str) -> List[str]:
    """``[message]`` when the compiled ``wsss._C`` extension cannot be loaded; ``reason`` names
    the config key that needs it."""
    from wsss.crf._ext import ops

    try:
        ops()
    except ImportError as e:
        return [f"{reason} needs the compiled extension: {e}"]
    return []


def gpu_count_problem(device_type: str, local_world: int) -> List[str]:
    """More processes on this node than visible GPUs would put two ranks on one GPU."""
    if device_type != "cuda":
        return []
    import torch

    n = torch.cuda.device_count()
    if local_world > n:
        return [f"{local_world} processes on this node (torchrun --nproc_per_node) but {n} visible GPU(s) "
                f"(CUDA_VISIBLE_DEVICES); use --nproc_per_node={n} or device=cpu"]
    return []


def raise_if(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise PreflightError(what, problems)
