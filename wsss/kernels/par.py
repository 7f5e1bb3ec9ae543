"""Pixel-adaptive refinement, PAR (SPEC §3.1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ._common import IMPLS

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]):
    """The 8·len(dilations) (dy, dx) offsets, dilation-major then the SPEC order."""
    return [(d * dy, d * dx) for d in dilations for dy, dx in OFFSETS]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half inputs (accumulation), float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shifted(x: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """x shifted so that out[i,j] = x[clamp(i+dy), clamp(j+dx)] (replicate padding), given x padded by pad."""
    H, W = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy:pad + dy + H, pad + dx:pad + dx + W]


def par_affinity_reference(images: torch.Tensor, dilations, w1: float, w2: float) -> torch.Tensor:
    """κ (B,J,H,W): softmax of the colour term plus w2 · softmax of the position term."""
    offs = neighbour_offsets(dilations)
    pad = max(dilations)
    x = images.to(_compute_dtype(images))
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    nb = torch.stack([_shifted(xp, dy, dx, pad) for dy, dx in offs], dim=2)  # (B,3,J,H,W)
    std = nb.std(dim=2, keepdim=True)  # unbiased, over the J neighbours, per channel
    colour = -((nb - x.unsqueeze(2)).abs() / (std + 1e-8) / w1) ** 2
    colour = colour.mean(dim=1)  # (B,J,H,W)
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offs], dtype=x.dtype, device=x.device)
    pos = -(dist / (dist.std() + 1e-8) / w1) ** 2
    return colour.softmax(dim=1) + w2 * pos.softmax(dim=0).view(1, -1, 1, 1)


def par_refine_reference(images, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01):
    """Plain PyTorch PAR: κ once per image, then ``num_iter`` rounds of M ← Σ_j κ_j M_j."""
    H, W = images.shape[-2:]
    masks = F.interpolate(masks.to(_compute_dtype(masks)), size=(H, W), mode="bilinear", align_corners=True)
    kappa = par_affinity_reference(images, dilations, w1, w2)
    offs = neighbour_offsets(dilations)
    pad = max(dilations)
    for _ in range(num_iter):
        mp = F.pad(masks, (pad, pad, pad, pad), mode="replicate")
        out = torch.zeros_like(masks)
        for j, (dy, dx) in enumerate(offs):
            out += kappa[:, j:j + 1] * _shifted(mp, dy, dx, pad)
        masks = out
    return masks


def _validate(images, masks, dilations, num_iter):
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B,3,H,W) tensor, got {getattr(images, 'shape', type(images))}")
    if not torch.is_tensor(masks) or masks.dim() != 4 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks must be (B,K,h,w) with B={images.shape[0]}, got {getattr(masks, 'shape', type(masks))}")
    if not images.is_floating_point() or not masks.is_floating_point():
        raise TypeError(f"images and masks must be floating point, got {images.dtype} and {masks.dtype}")
    if images.device != masks.device:
        raise ValueError(f"images ({images.device}) and masks ({masks.device}) are on different devices")
    if not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {tuple(dilations)}")
    if len(dilations) * 8 < 2:
        raise ValueError("PAR needs at least 2 neighbours for the unbiased std")
    if num_iter < 0:
        raise ValueError(f"num_iter must be >= 0, got {num_iter}")


def par_refine(images, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01, impl="auto"):
    """Pixel-adaptive refinement of ``masks`` (B,K,h,w) guided by ``images`` (B,3,H,W) → (B,K,H,W)."""
    _validate(images, masks, dilations, num_iter)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "triton":
        raise ValueError("par_refine has no Triton kernel in this version; use impl='reference' or 'auto'")
    with torch.no_grad():
        return par_refine_reference(images, masks, tuple(int(d) for d in dilations), num_iter, w1, w2).to(masks.dtype)
