"""CAM/LAM aggregation, CAM → label conversion and PAR refinement (SPEC §3 steps 1–3, §4)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

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
                     out_size=None, relu: bool = True, eps: float = 1e-5, flip_merge: str = "max"):
    """Aggregate the maps ``fn(x)`` returns (a tensor or a tuple) over scales and flips.

    Each scale resizes the images (bilinear) to a multiple of the patch size, runs ``fn`` on
    the images and their flips in one batch, upsamples to ``out_size`` (default: the input
    size), merges the flipped half by element-wise max (MoRe, SPEC §3 step 1) or by a sum
    (``flip_merge="sum"``, MCTformer/AReAM, SPEC §5), applies ReLU, sums over scales and
    normalises each map.
    """
    if flip_merge not in ("max", "sum"):
        raise ValueError(f"flip_merge must be 'max' or 'sum', got {flip_merge!r}")
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
            m = torch.maximum(m[:B], m[B:].flip(-1)) if flip_merge == "max" else m[:B] + m[B:].flip(-1)
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


def present_class_count(cls_labels: torch.Tensor) -> int:
    """The largest number of classes present in one image of the batch: the class channels
    :func:`refine_cams_with_bkg` needs per stack. On a host tensor (the data loader's labels)
    this reads no device."""
    return int((cls_labels > 0).sum(dim=1).max()) if cls_labels.numel() else 0


@torch.no_grad()
def refine_cams_with_bkg(images: torch.Tensor, cams: torch.Tensor, cls_labels: torch.Tensor, high_thre: float,
                         low_thre: float, ignore_index: int = 255, down_scale: int = 2,
                         par: Optional[Callable] = None, max_classes: Optional[int] = None) -> torch.Tensor:
    """PAR-refined pseudo labels (B,H,W) int64 from label-masked CAMs (SPEC §3 step 3).

    ``images`` are de-normalised to [0,1]. For each image a constant background channel at
    ``high_thre`` (and one at ``low_thre``) is stacked with the CAMs of the present classes,
    soft-maxed, refined by PAR at 1/``down_scale`` resolution, upsampled and arg-maxed.
    Background under ``high`` is ignored unless it is background under ``low`` as well.

    The whole batch is one set of tensor ops and one PAR call: each image's present classes
    (ascending) fill the first of ``max_classes`` channel slots per stack, the remaining slots
    get −∞ before the softmax, so they are exactly 0 there and after PAR (PAR mixes channels
    independently with image-only weights) and never win the argmax. ``max_classes`` must be at
    least the number of classes of any image (:func:`present_class_count`); None reads it from
    ``cls_labels`` (one device read), which a training step avoids by passing the count of
    the loader's host labels.
    """
    _check_maps("cams", cams, cls_labels)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != cams.shape[0]:
        raise ValueError(f"images must be (B,3,H,W) with B={cams.shape[0]}, got {tuple(images.shape)}")
    par = par or _default_par
    B, C, H, W = cams.shape
    n = present_class_count(cls_labels) if max_classes is None else min(int(max_classes), C)
    size = (max(1, H // down_scale), max(1, W // down_scale))
    img_s = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
    present = cls_labels > 0
    # present classes first, ascending (a stable sort of the absent flags), then the absent ones
    order = torch.sort(~present, dim=1, stable=True).indices[:, :n]  # (B,n)
    slot_used = present.gather(1, order)  # (B,n): slot j holds a present class
    picked = cams_s.gather(1, order[:, :, None, None].expand(-1, -1, *size))
    picked = picked.masked_fill(~slot_used[:, :, None, None], float("-inf"))
    bkg = cams_s.new_empty(B, 2, 1, *size)  # filled on the device: no host -> device copy
    bkg[:, 0].fill_(high_thre)
    bkg[:, 1].fill_(low_thre)
    stacks = torch.cat([bkg, picked[:, None].expand(-1, 2, -1, -1, -1)], dim=2).softmax(dim=2)  # (B,2,1+n,h,w)
    refined = par(img_s, stacks.reshape(B, 2 * (1 + n), *size))
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
    slot = refined.view(B, 2, 1 + n, H, W).argmax(dim=2)  # (B,2,H,W)
    keys = torch.cat([order.new_zeros(B, 1), order + 1], dim=1)  # stack index -> label
    lab = keys.gather(1, slot.flatten(1)).view(B, 2, H, W)
    l_high, l_low = lab[:, 0], lab[:, 1]
    background = torch.where(l_low == 0, 0, ignore_index)
    return torch.where(l_high == 0, background, l_high)


# ---- AReAM (SPEC §5) -------------------------------------------------------------------------

def _layer_weights_tensor(weights, L: int, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(L, device=device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=device).flatten()
    if w.numel() != L:
        raise ValueError(f"refine_weights (layer weights) must hold {L} values, got {w.numel()}")
    return w


def normalize_entropy(entropy: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of per-layer entropies to [0, 1] (SPEC §5):
    ``(e − min) / max(e − min)``; all-equal entropies give zeros instead of 0/0."""
    e = entropy.float() - entropy.float().min()
    return e / e.max().clamp_min(1e-12)


@torch.no_grad()
def layer_entropy_bits(cam: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cls_label: torch.Tensor,
                       scale: Optional[float] = None, impl: str = "auto", normalize: bool = True) -> torch.Tensor:
    """Entropy in bits of each layer's CAM re-activation (SPEC §5, paper eqs. 7–8), (L,B).

    ``cam`` (B,C,h,w) ≥ 0 at token resolution, ``q``/``k`` (L,B,Hd,C+N,dh) with the C class
    tokens first. Per layer: the CAMs of the present classes are re-activated by that layer's
    head-mean patch-to-patch attention (softmax over all C+N keys, then the patch block), summed
    over classes and soft-maxed over the N positions; the entropy of that distribution is
    returned. ``normalize``: the CAMs are first normalised per map (the paper's M̂; the online
    estimate); the official offline ``ent_voc_mctformer.py`` uses the raw CAM (``False``).
    """
    from wsss.kernels import propagate_cam_qk

    _check_maps("cam", cam, cls_label)
    C = cam.shape[1]
    maps = normalize_maps(cam.float()) if normalize else cam.float()
    masked = maps * cls_label[:, :, None, None].float()
    out = []
    for layer in range(q.shape[0]):
        refined = propagate_cam_qk(masked, q[layer:layer + 1], k[layer:layer + 1], C, scale=scale, impl=impl)
        logp = torch.log_softmax(refined.sum(dim=1).flatten(1).double(), dim=1)  # (B,N)
        out.append(-(logp.exp() * logp).sum(dim=1) / math.log(2.0))
    return torch.stack(out).float()


@torch.no_grad()
def affinity_statistics(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, scale: Optional[float] = None,
                        ignore_index: int = 255) -> Dict[str, torch.Tensor]:
    """Whether each layer's patch affinity could re-activate a CAM (the premise of SPEC §5's
    re-activation), measured against ground-truth masks. Not part of any method: a diagnostic.

    ``q``, ``k`` (L,B,Hd,T,dh) of every layer (class and other tokens first, then the N = h·w
    patches); ``labels`` (B,h,w) ground-truth classes at token resolution (0 background,
    ``ignore_index`` ignored). Per layer l, with A = mean_h softmax(scale · q kᵀ) restricted to
    the patch block (the affinity the re-activation multiplies a CAM with), returns (L,) tensors:

    - ``object_share``: over foreground query patches, the share of A's row mass (over patches
      with a label) that falls on patches of the query's own class; ``object_chance`` the same
      share for a uniform row (the fraction of such patches). Re-activation keeps an object's
      score on the object only when the share is well above one half.
    - ``patch_mass``: A's row mass on patches at all (the rest goes to the other tokens).
    - ``distance``: the mean distance (in patches) between a query and the patches it attends
      to; ``distance_uniform`` the same for a uniform row. Pretrained ViTs' shallow layers are
      local (distance well below uniform).
    - ``sink``: the fraction of query patches whose most-attended patch is the image's most
      common one (attention "sinks": every query reading the same patch).
    """
    L, B, Hd, T, dh = q.shape
    if labels.dim() != 3 or labels.shape[0] != B:
        raise ValueError(f"labels must be (B,h,w) with B={B}, got {tuple(labels.shape)}")
    h, w = labels.shape[-2:]
    N = h * w
    if N > T:
        raise ValueError(f"labels hold {N} patches but q, k only {T} tokens")
    P = T - N
    scale = dh ** -0.5 if scale is None else scale
    lab = labels.reshape(B, N).to(q.device)
    valid = (lab != ignore_index).float()  # (B,N)
    fg = (lab != ignore_index) & (lab != 0)
    same = (lab[:, :, None] == lab[:, None, :]).float() * valid[:, None, :]  # (B,N,N)
    ys, xs = torch.meshgrid(torch.arange(h, device=q.device), torch.arange(w, device=q.device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()
    dist = torch.cdist(pos, pos)  # (N,N)
    n_fg = fg.sum().clamp(min=1)
    chance = ((same.sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)) * fg).sum() / n_fg
    out = {name: [] for name in ("object_share", "patch_mass", "distance", "sink")}
    for layer in range(L):
        logits = (q[layer].float() @ k[layer].float().transpose(-1, -2)) * scale  # (B,Hd,T,T)
        a = logits.softmax(dim=-1).mean(dim=1)[:, P:, P:]  # (B,N,N)
        on_valid = (a * valid[:, None, :]).sum(-1).clamp(min=1e-12)
        share = (a * same).sum(-1) / on_valid
        out["object_share"].append((share * fg).sum() / n_fg)
        out["patch_mass"].append(a.sum(-1).mean())
        out["distance"].append(((a / a.sum(-1, keepdim=True).clamp(min=1e-12)) * dist).sum(-1).mean())
        top = a.argmax(dim=-1)  # (B,N)
        common = torch.stack([torch.bincount(t, minlength=N).max() for t in top]).float() / N
        out["sink"].append(common.mean())
    stats = {name: torch.stack(v) for name, v in out.items()}
    stats["object_chance"] = chance.expand(L).clone()
    stats["distance_uniform"] = dist.mean().expand(L).clone()
    return stats


@torch.no_grad()
def class_attention_gate(q: torch.Tensor, k: torch.Tensor, num_class_tokens: int, grid,
                         scale: Optional[float] = None) -> torch.Tensor:
    """MCTformer's class-to-patch attention (B,C,h,w): mean over layers and heads of
    ``softmax(q_cls kᵀ · scale)`` restricted to the patch columns; only C×T logits per layer."""
    L, B, Hd, T, dh = q.shape
    C = num_class_tokens
    scale = dh ** -0.5 if scale is None else scale
    gate = 0
    for layer in range(L):
        logits = (q[layer, :, :, :C].float() @ k[layer].float().transpose(-1, -2)) * scale  # (B,Hd,C,T)
        gate = gate + logits.softmax(dim=-1).mean(dim=1)[..., C:]
    return (gate / L).reshape(B, C, *grid)


def _reactivate(gated: torch.Tensor, q, k, layers, weights, scale, impl) -> torch.Tensor:
    from wsss.kernels import propagate_cam_qk

    return propagate_cam_qk(gated, q[layers], k[layers], gated.shape[1], layer_weights=weights, scale=scale,
                            impl=impl)


def _gate_and_reactivate(cam, q, k, layer_index: int, refine_weights, scale, impl):
    """(re-activated gated CAM, gated CAM): SPEC §5's class-attention gate, then the mean over
    the first ``layer_index`` layers of the weighted head-mean patch affinities."""
    L = q.shape[0]
    if not 1 <= layer_index <= L:
        raise ValueError(f"layer_index={layer_index} must be in [1, {L}]")
    gated = cam.float() * class_attention_gate(q, k, cam.shape[1], cam.shape[-2:], scale)
    w = _layer_weights_tensor(refine_weights, L, q.device)[:layer_index]
    return _reactivate(gated, q, k, slice(0, layer_index), w, scale, impl), gated


@torch.no_grad()
def aream_refined_cam(cam: torch.Tensor, q: torch.Tensor, k: torch.Tensor, layer_index: int, refine_weights=None,
                      scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """AReAM's affinity-refined CAM at token resolution (SPEC §5, public code), (B,C,h,w).

    ``cam`` (B,C,h,w) ≥ 0; ``q``/``k`` (L,B,Hd,C+N,dh) of every layer. The CAM is gated by the
    class attention of all layers, then re-activated by the mean over the first ``layer_index``
    layers of ``w_l · mean_h softmax(A_l)`` (patch block), ``w_l = 1 − entropy_l`` normalised
    (``refine_weights``, ones when None)."""
    return _gate_and_reactivate(cam, q, k, layer_index, refine_weights, scale, impl)[0]


def multi_scale_aream_cam(model, images: torch.Tensor, scales=(1.0,), layer_index: int = 7, refine_weights=None,
                          out_size=None, impl: str = "auto", extras: bool = False):
    """AReAM CAMs (B,C,H,W) in [0,1] aggregated over scales and flips (flip halves summed, ε 1e-6).

    With ``extras`` returns ``(refined, gated, [layer_0, …, layer_{L−1}])``: also the
    class-attention-gated CAM before the re-activation (MCTformer's CAM) and, per layer l, the
    gated CAM re-activated by layer l's affinity alone (the paper's layer-wise analysis)."""

    def fn(x):
        cam, q, k = model.cam_and_qk(x)
        if not extras:
            return aream_refined_cam(cam, q, k, layer_index, refine_weights, model.attn_scale, impl)
        refined, gated = _gate_and_reactivate(cam, q, k, layer_index, refine_weights, model.attn_scale, impl)
        return (refined, gated) + tuple(_reactivate(gated, q, k, slice(i, i + 1), None, model.attn_scale, impl)
                                         for i in range(q.shape[0]))

    maps = multi_scale_maps(fn, images, scales, model.patch_size, out_size, eps=1e-6, flip_merge="sum")
    if not extras:
        return maps
    return maps[0], maps[1], list(maps[2:])
