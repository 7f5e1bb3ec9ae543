"""Every checkpoint format users bring, read in one place (SPEC §2 "Official checkpoint layout", §5).

A file is recognised by its keys (and, where two layouts share names, by a tensor's shape), never
by its name:

- ``"wsss"``: written by ``wsss.train`` (``model``, ``optimizer``, ``step``, ``config``,
  ``num_classes``, ...) or a bare wsss state dict; keys ``backbone.*``.
- ``"more_official"``: the official MoRe code; keys ``encoder.*``, ``decoder.conv6/7/8``,
  ``classifier``, ``aux_classifier``, ``graph_layer.*``. VOC files are a flat state dict with DDP
  ``module.`` prefixes, COCO files hold it under ``model_state_dict``.
- ``"aream_official"``: the official AReAM / MCTformer-V2 code (``deit_small_MCTformerV2_patch16_224``):
  ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``; ``cls_token`` with one token per
  class and a 3×3 conv ``head`` (see :meth:`wsss.models.AReAM.from_official_state_dict`).
- ``"vit_imagenet"``: an ImageNet ViT (timm, DeiT with or without distillation, jx ViT); only for
  ``model.pretrained``.

:func:`read_state_dict` loads and unwraps any of them, :func:`checkpoint_format` names the
layout, :func:`load_trained_model` builds the trained network (``wsss.eval --ckpt``,
``wsss.tools.layer_entropy``) and :func:`read_pretrained_vit_state_dict` serves
``model.pretrained``. ``resume=`` goes through :func:`wsss.utils.checkpoint.load_checkpoint`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Tuple

import torch

from wsss.utils.checkpoint import read_torch_file

FORMATS = {
    "wsss": "a wsss checkpoint",
    "more_official": "an official MoRe checkpoint",
    "aream_official": "an official AReAM / MCTformer-V2 checkpoint",
    "vit_imagenet": "an ImageNet ViT checkpoint (timm / DeiT / jx)",
}
# Entries under which code bases store the state dict: DeiT/MCTformer/AReAM and wsss "model",
# MoRe's COCO script "model_state_dict", Lightning-style "state_dict".
WRAPPER_KEYS = ("model", "model_state_dict", "state_dict", "model_state")
DDP_PREFIX = "module."
# The wsss methods each official format can be evaluated as.
_METHODS = {"more_official": ("more", "baseline"), "aream_official": ("aream",)}
# Model config keys that fix the architecture: a checkpoint and the config must agree on them.
ARCH_KEYS = ("method", "backbone", "embed_dim", "depth", "num_heads", "patch_size", "img_size",
             "num_reg_tokens", "aux_layer", "gcr", "decoder_dim")
_SHOW = 8  # keys listed in an error message


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _few(keys) -> str:
    keys = list(keys)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{keys[:_SHOW]}{more}"


def unwrap_state_dict(obj) -> Tuple[dict, Optional[str]]:
    """``(state_dict, wrapper)``: the state dict inside ``obj`` (under ``model``,
    ``model_state_dict``, ``state_dict`` or ``model_state``, nested ones joined by dots in
    ``wrapper``; None when ``obj`` is the state dict) with DDP's ``module.`` prefix stripped."""
    wrapper = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
        wrapper.append(key)
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise ValueError(f"holds a dict whose entries {_few(odd or list(obj))} are not tensors and that has "
                             f"no state dict under any of {list(WRAPPER_KEYS)}")
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    sd = {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in obj.items()}
    return sd, ".".join(wrapper) or None


def _classify(sd: dict) -> Optional[str]:
    """The format of a (``module.``-stripped) state dict, or None. Decided by key families so that
    an incomplete file is still recognised and its converter can name what is missing."""
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "wsss"
    if any(k.startswith(("encoder.", "graph_layer.", "decoder.conv", "aux_classifier.")) for k in keys):
        return "more_official"
    if not any(k.startswith(("blocks.", "patch_embed.")) or k in ("cls_token", "pos_embed") for k in keys):
        return None
    head = sd.get("head.weight")
    cls_token = sd.get("cls_token")
    if ("pos_embed_cls" in sd or "pos_embed_pat" in sd or (head is not None and head.dim() == 4)
            or (cls_token is not None and cls_token.dim() == 3 and cls_token.shape[1] > 1)):
        return "aream_official"  # C class tokens and a conv head, unlike any ImageNet ViT
    return "vit_imagenet"


def _unrecognised(sd: dict) -> str:
    return (f"no known checkpoint layout fits its keys {_few(sd)}; known: wsss (backbone.*), official MoRe "
            "(encoder.*, decoder.conv6/7/8, classifier, aux_classifier, graph_layer.*), official AReAM / "
            "MCTformer-V2 (cls_token with one token per class, 3x3 conv head), ImageNet ViT (cls_token, "
            "pos_embed, patch_embed.*, blocks.*)")


def checkpoint_format(obj_or_sd) -> str:
    """``"wsss"``, ``"more_official"``, ``"aream_official"`` or ``"vit_imagenet"`` for a loaded
    checkpoint object or a state dict; ``ValueError`` when no layout fits."""
    sd, _ = unwrap_state_dict(obj_or_sd)
    fmt = _classify(sd)
    if fmt is None:
        raise ValueError(_unrecognised(sd))
    return fmt


def _is_safetensors(path: Path) -> bool:
    """By content: an 8-byte little-endian header length, then the JSON header's ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def read_state_dict(path) -> Tuple[dict, dict]:
    """Load a .pth/.pt/.bin or .safetensors file: ``(state_dict, meta)``.

    The state dict is unwrapped (:func:`unwrap_state_dict`) and stripped of ``module.``.
    ``meta``: ``path``; ``format`` (as :func:`checkpoint_format`, None when unrecognised);
    ``wrapper`` (the entry the state dict came from, None for a flat file); ``checkpoint`` (the
    whole object of a wsss training checkpoint, else None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    else:
        obj = read_torch_file(path)
    try:
        sd, wrapper = unwrap_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    fmt = _classify(sd)
    whole = obj if fmt == "wsss" and wrapper == "model" else None
    return sd, {"path": str(path), "format": fmt, "wrapper": wrapper, "checkpoint": whole}


def read_pretrained_vit_state_dict(path) -> dict:
    """The state dict of an ImageNet ViT file for ``model.pretrained`` (timm, DeiT incl. the
    distilled variant, jx ViT; .pth or .safetensors). A timm model pooled by ``avg`` keeps its
    final LayerNorm as ``fc_norm`` (and ``norm`` is absent); it is returned as ``norm``, the
    backbone's final LayerNorm. Trained wsss/MoRe/AReAM files are refused with where they belong."""
    sd, meta = read_state_dict(path)
    fmt = meta["format"]
    if fmt is None:
        raise ValueError(f"{path}: not a ViT checkpoint: {_unrecognised(sd)}")
    if fmt != "vit_imagenet":
        hint = ("continue its training with resume=" if fmt == "wsss" and meta["checkpoint"] is not None else
                "evaluate it with python -m wsss.eval --ckpt")
        raise ValueError(f"{path} is {FORMATS[fmt]}, not an ImageNet ViT: model.pretrained takes ImageNet "
                         f"weights (timm, DeiT, jx ViT); {hint} {path}")
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
    return sd


def _num_heads(model_cfg, embed_dim: int) -> int:
    """Heads cannot be read from the tensors: the config's, the named backbone's if its width
    matches, else ``embed_dim // 64`` (ViT-B 12, DeiT-S 6)."""
    from .vit import BACKBONES

    if getattr(model_cfg, "num_heads", 0):
        return int(model_cfg.num_heads)
    named = BACKBONES.get(getattr(model_cfg, "backbone", ""))
    if named and named[0] == embed_dim:
        return named[2]
    if embed_dim and embed_dim % 64 == 0:
        return embed_dim // 64
    raise ValueError(f"cannot tell the number of attention heads of a width-{embed_dim} checkpoint; "
                     "set model.num_heads")


def _saved_model_config(meta: dict) -> dict:
    ckpt = meta.get("checkpoint") or {}
    saved = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    model = saved.get("model") if isinstance(saved, Mapping) else None
    return dict(model) if isinstance(model, Mapping) else {}


def _wsss_method(sd: dict, meta: dict) -> Optional[str]:
    """The method a wsss checkpoint was trained with: from its config, else from its heads."""
    saved = _saved_model_config(meta).get("method")
    if saved:
        return str(saved)
    if "head.weight" in sd or "layer_entropy" in sd:
        return "aream"
    if "classifier.weight" in sd:
        return "more" if any(k.startswith("graph_layer.") for k in sd) else "baseline"
    return None


def _check_method(path, fmt: str, sd: dict, meta: dict, method: str) -> None:
    if fmt == "wsss":
        saved = _wsss_method(sd, meta)
        fits = saved is None or (saved == "aream") == (method == "aream")
    else:
        saved = "/".join(_METHODS[fmt])
        fits = method in _METHODS[fmt]
    if not fits:
        raise ValueError(f"{path} is {FORMATS[fmt]} of a model.method={saved} network, but the config has "
                         f"model.method={method!r}; evaluate it with a model.method={saved.split('/')[0]} config")


def _classes_from_state_dict(sd: dict) -> int:
    for key in ("classifier.weight", "head.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    raise ValueError("the checkpoint records no num_classes and has neither classifier.weight nor head.weight")


def _load_wsss(sd: dict, meta: dict, model_cfg):
    from wsss.models import build_model

    ckpt = meta.get("checkpoint") or {}
    num_classes = int(ckpt["num_classes"]) if "num_classes" in ckpt else _classes_from_state_dict(sd)
    # the trained weights replace everything: no ImageNet file is read (it may not exist here)
    model = build_model(dataclasses.replace(model_cfg, pretrained=""), num_classes)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        saved = _saved_model_config(meta)
        diffs = [f"model.{k}={saved[k]!r} (the config: {getattr(model_cfg, k)!r})" for k in ARCH_KEYS
                 if k in saved and hasattr(model_cfg, k) and saved[k] != getattr(model_cfg, k)]
        hint = f"; the checkpoint was trained with {', '.join(diffs)}" if diffs else ""
        raise ValueError(f"missing {_few(missing)}, unexpected {_few(unexpected)}{hint}")
    return model


def load_trained_model(path, model_cfg, device=None, num_classes: Optional[int] = None):
    """``(model, num_classes, fmt)``: the trained network in ``path``, in eval mode (on ``device``
    when given), its number of foreground classes and the format it was read as.

    A wsss checkpoint is built with ``build_model(model_cfg, num_classes)`` (``model.pretrained``
    ignored) and strict-loaded; official MoRe/AReAM checkpoints go through
    ``MoRe/AReAM.from_official_state_dict`` (architecture from the tensors; ``model.num_heads``,
    ``model.aux_layer`` from the config). An ImageNet ViT file is refused: it belongs in
    ``model.pretrained``. ``ValueError`` names the file and the format when the config's
    ``model.method`` does not match the checkpoint, when keys are missing or unexpected, and when
    ``num_classes`` (if given) differs from the checkpoint's.
    """
    sd, meta = read_state_dict(path)
    fmt = meta["format"]
    if fmt is None:
        raise ValueError(f"{path}: {_unrecognised(sd)}")
    if fmt == "vit_imagenet":
        raise ValueError(f"{path} is {FORMATS[fmt]}: ImageNet pretraining weights without the method's heads, "
                         f"not a trained model; it belongs in model.pretrained={path} (then train with "
                         "python -m wsss.train)")
    _check_method(path, fmt, sd, meta, model_cfg.method)
    try:
        if fmt == "wsss":
            model = _load_wsss(sd, meta, model_cfg)
        elif fmt == "more_official":
            from .more import MoRe

            width = sd["encoder.cls_token"].shape[-1] if "encoder.cls_token" in sd else 0
            model = MoRe.from_official_state_dict(sd, num_heads=_num_heads(model_cfg, width) if width else 0,
                                                  aux_layer=model_cfg.aux_layer)
        else:
            from .aream import AReAM

            width = sd["cls_token"].shape[-1] if "cls_token" in sd else 0
            model = AReAM.from_official_state_dict(sd, num_heads=_num_heads(model_cfg, width) if width else 0)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "state_dict" not in str(e):
            raise  # not a loading error (a size mismatch reads "Error(s) in loading state_dict")
        raise ValueError(f"{path}: read as {FORMATS[fmt]}, but it does not fit: {e}") from None
    found = int(model.num_classes)
    if num_classes is not None and found != int(num_classes):
        raise ValueError(f"{path}: {FORMATS[fmt]} with {found} classes, expected num_classes={num_classes}")
    model.eval()
    if device is not None:
        model.to(device)
    return model, found, fmt
