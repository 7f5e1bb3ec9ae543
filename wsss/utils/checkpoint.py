"""Checkpoints: one dict (model, optimizer, scheduler, scaler, step, config, RNG states),
written to a temporary file and renamed so an interrupted save never destroys the last one.

Reading is safe (``weights_only``) for files of any origin; which format a file holds and how it
becomes a model is decided in ``wsss.models.checkpoints``."""
from __future__ import annotations

import argparse
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    # Only tensors and plain Python values, so the checkpoint loads with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (an interrupted write
    never leaves a truncated file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path, **payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# Classes allowed in a ``weights_only`` load besides tensors and plain Python values. Other code
# bases pickle their command line (an ``argparse.Namespace``) beside the weights: DeiT, MCTformer
# and AReAM save ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``. A Namespace only
# holds attributes, so allowing it runs no code.
EXTRA_SAFE_GLOBALS = (argparse.Namespace,)


def _unsafe_globals(path: Path):
    """The names of the classes/functions a torch zip file pickles beyond the defaults, or None
    when torch cannot tell (an old torch, or the legacy non-zip format)."""
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is None:
        return None
    try:
        return list(lister(str(path)))
    except Exception:  # not a zip archive: the answer is unknown, not an error of its own
        return None


def _load_allowing_extra_globals(path: Path):
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        with scoped(list(EXTRA_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    torch.serialization.add_safe_globals(list(EXTRA_SAFE_GLOBALS))  # torch 2.4: no scoped form
    return torch.load(path, map_location="cpu", weights_only=True)


def read_torch_file(path):
    """Whatever a torch-saved file holds, loaded safely (``weights_only=True``) on the CPU.

    A file that pickles an ``argparse.Namespace`` (see ``EXTRA_SAFE_GLOBALS``) is read again
    with that class allowed. Any other object fails with a ``ValueError`` that names it and says
    how to extract the weights: never a silent ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # an object the weights-only unpickler refuses
        error = e
    except Exception as e:  # a corrupt or non-torch file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    unsafe = _unsafe_globals(path)
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in EXTRA_SAFE_GLOBALS}
    if unsafe is None or set(unsafe) <= allowed:
        try:
            return _load_allowing_extra_globals(path)
        except Exception as e:
            error = e
    found = ", ".join(unsafe) if unsafe else str(error).strip().splitlines()[-1]
    raise ValueError(
        f"cannot read checkpoint {path} with weights_only=True: it pickles objects other than tensors "
        f"({found}). If you trust the file, extract its weights once and pass the new file:\n"
        f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
        f"torch.save(c['model'], '{path}.weights.pth')\"\n"
        "(use the entry that holds the state dict if it is not 'model', e.g. 'model_state_dict')") from None


def load_checkpoint(path) -> dict:
    """A checkpoint written by ``wsss.train``, for ``resume=``. Weights saved by other code
    (official MoRe/AReAM, ImageNet ViTs) are refused with a message saying where they belong."""
    ckpt = read_torch_file(path)
    from wsss.models.checkpoints import FORMATS, checkpoint_format

    try:
        fmt = checkpoint_format(ckpt)
    except ValueError as e:
        raise ValueError(f"{path} is not a wsss checkpoint: {e}") from None
    if fmt != "wsss" or not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        what = FORMATS[fmt] if fmt != "wsss" else "a bare wsss state dict (weights only)"
        where = ("model.pretrained=" if fmt == "vit_imagenet"
                 else f"python -m wsss.eval --ckpt {path}")
        raise ValueError(f"{path} is {what}, not a wsss training checkpoint (model, optimizer, step, ...): "
                         f"resume= continues a wsss.train run from its checkpoint.pt; use this file with {where}")
    return ckpt
