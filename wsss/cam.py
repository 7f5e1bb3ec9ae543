"""CAM/LAM aggregation, CAM → label conversion and PAR refinement (SPEC §3 steps 1–3, §4)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


def _check_maps(name: str, maps: torch.Tensor, cls_label: Optional[torch.Tensor] = None) -> None:
    if not torch.is_tensor(maps) or maps.dim() != 4:
        raise ValueError(f"{name} must be a (B,C,H,W) tensor, got {getattr(maps, 'shape', type(maps))}")
    if cls_label is not None:
        if cls_label.dim() != 2 or cls_label.shape != maps.shape[:2]:
            raise ValueError(f"cls_label must be (B,C)={tuple(maps.shape[:2])}, got {tuple(cls_label.shape)}")


def normalize_maps(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-map min-max normalisation: m ← (m − min) / (max + eps) (SPEC notation)."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)


def _scaled_size(size, scale: float, multiple: int):
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in size)


@torch.no_grad()
def multi_scale_maps(fn: Callable, images: torch.Tensor, scales: Sequence[float], multiple: int,
                     out_size=None, relu: bool = True, eps: float = 1e-5):
    """Aggregate the maps ``fn(x)`` returns (a tensor or a tuple) over scales and flips.

    Each scale resizes the images (bilinear) to a multiple of the patch size, runs ``fn`` on
    the images and their flips in one batch, upsamples to ``out_size`` (default: the input
    size), merges the flipped half by element-wise max, applies ReLU, sums over scales and
    normalises each map (SPEC §3 step 1).
    """
    if not scales:
        raise ValueError("scales must not be empty")
    H, W = images.shape[-2:]
    out_size = tuple(out_size or (H, W))
    B = images.shape[0]
    acc = None
    for s in scales:
        size = _scaled_size((H, W), s, multiple)
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        out = fn(torch.cat([x, x.flip(-1)], dim=0))
        out = out if isinstance(out, (tuple, list)) else (out,)
        merged = []
        for m in out:
            m = F.interpolate(m.float(), size=out_size, mode="bilinear", align_corners=False)
            m = torch.maximum(m[:B], m[B:].flip(-1))
            merged.append(F.relu(m) if relu else m)
        acc = merged if acc is None else [a + m for a, m in zip(acc, merged)]
    acc = [normalize_maps(a, eps) for a in acc]
    return acc if len(acc) > 1 else acc[0]


def multi_scale_cam(model, images: torch.Tensor, scales=(1.0, 0.5, 0.75, 1.5), out_size=None):
    """(cam, cam_aux), each (B,C,H,W) in [0,1]: flip + scales, ReLU, sum, normalise."""
    cam_aux, cam = multi_scale_maps(model.cams, images, scales, model.patch_size, out_size)
    return cam, cam_aux


def multi_scale_lam(model, images: torch.Tensor, scales=(1.0, 0.5, 0.75, 1.5), out_size=None):
    """The MoRe localisation attention map aggregated like the CAM (no ReLU before summing)."""
    return multi_scale_maps(model.lam, images, scales, model.patch_size, out_size, relu=False)


def cam_to_label(cam: torch.Tensor, cls_label: torch.Tensor, bkg_thre: float = 0.5, high_thre=None,
                 low_thre=None, ignore_mid: bool = False, ignore_index: int = 255):
    """Returns ``(valid_cam, label)``: label = 1 + argmax of the label-masked CAM, with
    background (0) where the maximum is ≤ ``bkg_thre``, or with ``ignore_mid`` ignore where it
    is ≤ ``high_thre`` and background where it is ≤ ``low_thre`` (SPEC §3 step 2)."""
    _check_maps("cam", cam, cls_label)
    if ignore_mid and (high_thre is None or low_thre is None):
        raise ValueError("ignore_mid needs both high_thre and low_thre")
    valid_cam = cam * cls_label[:, :, None, None].to(cam.dtype)
    value, idx = valid_cam.max(dim=1)
    label = idx + 1
    if ignore_mid:
        label[value <= high_thre] = ignore_index
        label[value <= low_thre] = 0
    else:
        label[value <= bkg_thre] = 0
    return valid_cam, label


def _default_par(images, masks):
    from wsss.kernels import par_refine

    return par_refine(images, masks)


@torch.no_grad()
def refine_cams_with_bkg(images: torch.Tensor, cams: torch.Tensor, cls_labels: torch.Tensor, high_thre: float,
                         low_thre: float, ignore_index: int = 255, down_scale: int = 2,
                         par: Optional[Callable] = None) -> torch.Tensor:
    """PAR-refined pseudo labels (B,H,W) int64 from label-masked CAMs (SPEC §3 step 3).

    ``images`` are de-normalised to [0,1]. For each image a constant background channel at
    ``high_thre`` (and one at ``low_thre``) is stacked with the CAMs of the present classes,
    soft-maxed, refined by PAR at 1/``down_scale`` resolution, upsampled and arg-maxed.
    Background under ``high`` is ignored unless it is background under ``low`` as well.
    Both stacks of all images go through one PAR call: PAR mixes channels independently with
    image-only weights, so zero padding channels change nothing.
    """
    _check_maps("cams", cams, cls_labels)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != cams.shape[0]:
        raise ValueError(f"images must be (B,3,H,W) with B={cams.shape[0]}, got {tuple(images.shape)}")
    par = par or _default_par
    B, C, H, W = cams.shape
    size = (max(1, H // down_scale), max(1, W // down_scale))
    img_s = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
    present = [torch.nonzero(cls_labels[b] > 0).flatten() for b in range(B)]
    n = 1 + max(len(p) for p in present)
    stacks = cams_s.new_zeros(B, 2 * n, *size)
    for b, idx in enumerate(present):
        for j, thre in enumerate((high_thre, low_thre)):
            bkg = torch.full((1, *size), thre, device=cams.device, dtype=cams_s.dtype)
            stacks[b, j * n:j * n + 1 + len(idx)] = torch.cat([bkg, cams_s[b, idx]]).softmax(dim=0)
    refined = par(img_s, stacks)
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
    labels = torch.empty(B, H, W, dtype=torch.long, device=cams.device)
    for b, idx in enumerate(present):
        keys = torch.cat([idx.new_zeros(1), idx + 1])
        k = len(keys)
        l_high = keys[refined[b, :k].argmax(dim=0)]
        l_low = keys[refined[b, n:n + k].argmax(dim=0)]
        lab = l_high.clone()
        lab[l_high == 0] = ignore_index
        lab[(l_high == 0) & (l_low == 0)] = 0
        labels[b] = lab
    return labels
