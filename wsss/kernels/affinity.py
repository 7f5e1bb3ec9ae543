"""Affinity labels and the ToCo "ptc" loss (SPEC §3.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import IMPLS


def _check_labels(labels: torch.Tensor, ignore_index: int) -> None:
    if not torch.is_tensor(labels) or labels.dim() != 3:
        raise ValueError(f"labels must be a (B,h,w) tensor, got {getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if bool((labels < 0).any()):
        raise ValueError(f"labels hold negative values {torch.unique(labels[labels < 0])[:8].tolist()}")


def affinity_labels(labels: torch.Tensor, ignore_index: int = 255, ignore_diagonal: bool = True) -> torch.Tensor:
    """(B,N,N) int64: 1 same label, 0 different, ``ignore_index`` where either token is ignored
    (and on the diagonal when ``ignore_diagonal``)."""
    _check_labels(labels, ignore_index)
    flat = labels.flatten(1).long()
    aff = (flat.unsqueeze(2) == flat.unsqueeze(1)).long()
    ign = flat == ignore_index
    aff[ign.unsqueeze(2).expand_as(aff)] = ignore_index
    aff[ign.unsqueeze(1).expand_as(aff)] = ignore_index
    if ignore_diagonal:
        aff.diagonal(dim1=1, dim2=2).fill_(ignore_index)
    return aff


def masked_cosine_affinity_loss_reference(features: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255):
    feats = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    f = F.normalize(feats.flatten(2), dim=1, eps=1e-8)  # (B,D,N)
    cos = (f.transpose(1, 2) @ f).abs()
    aff = affinity_labels(labels, ignore_index)
    pos = (aff == 1).to(cos.dtype)
    neg = (aff == 0).to(cos.dtype)
    return 0.5 * (1 - (pos * cos).sum() / (pos.sum() + 1)) + 0.5 * (neg * cos).sum() / (neg.sum() + 1)


def masked_cosine_affinity_loss(features: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                impl: str = "auto") -> torch.Tensor:
    """ToCo/MoRe ptc loss on (B,D,h,w) features with pos/neg pairs from ``labels`` (B,h,w)."""
    if not torch.is_tensor(features) or features.dim() != 4:
        raise ValueError(f"features must be (B,D,h,w), got {getattr(features, 'shape', type(features))}")
    _check_labels(labels, ignore_index)
    if labels.shape != (features.shape[0], *features.shape[-2:]):
        raise ValueError(f"labels must be (B,h,w)={(features.shape[0], *features.shape[-2:])}, "
                         f"got {tuple(labels.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "triton":
        raise ValueError("masked_cosine_affinity_loss has no Triton kernel in this version; use impl='reference'")
    return masked_cosine_affinity_loss_reference(features, labels, ignore_index)
