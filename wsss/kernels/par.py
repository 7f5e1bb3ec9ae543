"""Pixel-adaptive refinement, PAR (SPEC §3.1).

κ (B,J,H,W), J = 8·len(dilations), is computed once per image from the colour and position
terms; then ``num_iter`` rounds of ``M ← Σ_j κ_j · M_j`` (M_j: M shifted to neighbour j with
replicate padding). Neither path builds a (B,K,J,H,W) or (B,3,J,H,W) stack: both loop over the J
neighbours and accumulate.

Triton path: one kernel writes κ (fp32) and one kernel per iteration propagates all classes of
a pixel tile, reading κ once per iteration; masks ping-pong between two fp32 buffers. At MoRe's
shape (B=4, K=42, 224×224, 10 iterations) that moves 1.1 GB against the reference's 53 GB, with
a peak of 106 MB against 172 MB (benchmarks/results/triton-kernels.md; no matrix products).
"""
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ._common import (check_int_sequence, check_same_device, check_tensor, compute_dtype, launch, launch_device_type,
                      resolve_impl, tl, triton)

# (Δy, Δx) of the 8 neighbours at dilation 1, in the SPEC order
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
STD_EPS = 1e-8  # SPEC §3.1: std + 1e-8 in both terms


def neighbour_offsets(dilations: Sequence[int]) -> List[tuple]:
    """The 8·len(dilations) (dy, dx) offsets, dilation-major then the SPEC order."""
    return [(d * dy, d * dx) for d in dilations for dy, dx in OFFSETS]


def position_softmax(dilations: Sequence[int], w1: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """softmax_j of the position term p_j = −(δ_j / (std(δ) + 1e-8) / w1)² (a constant per dilation set)."""
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)], dtype=torch.float64)
    pos = -(dist / (dist.std() + STD_EPS) / w1) ** 2
    return pos.softmax(dim=0).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def _shifted(xp: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """View of the padded ``xp`` with out[i,j] = x[clamp(i+dy), clamp(j+dx)] (replicate padding)."""
    H, W = xp.shape[-2] - 2 * pad, xp.shape[-1] - 2 * pad
    return xp[..., pad + dy:pad + dy + H, pad + dx:pad + dx + W]


def par_affinity_reference(images: torch.Tensor, dilations: Sequence[int], w1: float = 0.3,
                           w2: float = 0.01) -> torch.Tensor:
    """κ (B,J,H,W) = softmax_j(colour term) + w2 · softmax_j(position term), SPEC §3.1."""
    offs = neighbour_offsets(dilations)
    J, pad = len(offs), max(dilations)
    x = images.to(compute_dtype(images))
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    # unbiased std over the J neighbour values per channel; two passes (mean, then squared
    # deviations) rather than Σx² − (Σx)²/J, which cancels badly for flat image regions
    mean = torch.zeros_like(x)
    for dy, dx in offs:
        mean += _shifted(xp, dy, dx, pad)
    mean /= J
    var = torch.zeros_like(x)
    for dy, dx in offs:
        var += (_shifted(xp, dy, dx, pad) - mean) ** 2
    std = (var / (J - 1)).sqrt()
    inv = 1.0 / ((std + STD_EPS) * w1)  # a_j = −mean_c (|I_j − I| / (std_c + 1e-8) / w1)²
    colour = x.new_empty(x.shape[0], J, *x.shape[2:])
    for j, (dy, dx) in enumerate(offs):
        colour[:, j] = (_shifted(xp, dy, dx, pad) - x).abs_().mul_(inv).square_().mean(dim=1).neg_()
    kappa = colour.softmax(dim=1)
    kappa += w2 * position_softmax(dilations, w1, x.dtype, x.device).view(1, J, 1, 1)
    return kappa


def par_refine_reference(images: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                         num_iter: int = 10, w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """Plain PyTorch PAR in the compute dtype (fp32, or float64 for float64 inputs)."""
    H, W = images.shape[-2:]
    masks = F.interpolate(masks.to(compute_dtype(masks)), size=(H, W), mode="bilinear", align_corners=True)
    kappa = par_affinity_reference(images, dilations, w1, w2).to(masks.dtype)
    offs = neighbour_offsets(dilations)
    pad = max(dilations)
    for _ in range(num_iter):
        mp = F.pad(masks, (pad, pad, pad, pad), mode="replicate")
        out = torch.zeros_like(masks)
        for j, (dy, dx) in enumerate(offs):
            out.addcmul_(kappa[:, j:j + 1], _shifted(mp, dy, dx, pad))
        masks = out
    return masks


# ----------------------------------------------------------------------------------------------
# triton
# ----------------------------------------------------------------------------------------------
@triton.jit
def _par_kappa_kernel(img_ptr, kappa_ptr, dy_ptr, dx_ptr, pos_ptr, H, W, J, inv_w1, w2,
                      s_b, s_c, s_h, s_w, BLOCK: tl.constexpr):
    """κ for BLOCK pixels of one image: colour-term softmax over the J neighbours + w2·pos."""
    b = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < H * W
    y = pix // W
    x = pix % W
    base = img_ptr + b.to(tl.int64) * s_b
    centre = base + y * s_h + x * s_w
    c0 = tl.load(centre, mask=inside, other=0.0).to(tl.float32)
    c1 = tl.load(centre + s_c, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(centre + 2 * s_c, mask=inside, other=0.0).to(tl.float32)

    # pass 1: per-channel mean over the neighbours
    m0 = tl.zeros([BLOCK], dtype=tl.float32)
    m1 = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(J):
        ny = tl.minimum(tl.maximum(y + tl.load(dy_ptr + j), 0), H - 1)
        nx = tl.minimum(tl.maximum(x + tl.load(dx_ptr + j), 0), W - 1)
        nb = base + ny * s_h + nx * s_w
        m0 += tl.load(nb, mask=inside, other=0.0).to(tl.float32)
        m1 += tl.load(nb + s_c, mask=inside, other=0.0).to(tl.float32)
        m2 += tl.load(nb + 2 * s_c, mask=inside, other=0.0).to(tl.float32)
    m0 = m0 / J
    m1 = m1 / J
    m2 = m2 / J
    # pass 2: unbiased variance (two-pass for accuracy, as in the reference)
    v0 = tl.zeros([BLOCK], dtype=tl.float32)
    v1 = tl.zeros([BLOCK], dtype=tl.float32)
    v2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(J):
        ny = tl.minimum(tl.maximum(y + tl.load(dy_ptr + j), 0), H - 1)
        nx = tl.minimum(tl.maximum(x + tl.load(dx_ptr + j), 0), W - 1)
        nb = base + ny * s_h + nx * s_w
        d0 = tl.load(nb, mask=inside, other=0.0).to(tl.float32) - m0
        d1 = tl.load(nb + s_c, mask=inside, other=0.0).to(tl.float32) - m1
        d2 = tl.load(nb + 2 * s_c, mask=inside, other=0.0).to(tl.float32) - m2
        v0 += d0 * d0
        v1 += d1 * d1
        v2 += d2 * d2
    k0 = inv_w1 / (tl.sqrt(v0 / (J - 1)) + 1e-8)
    k1 = inv_w1 / (tl.sqrt(v1 / (J - 1)) + 1e-8)
    k2 = inv_w1 / (tl.sqrt(v2 / (J - 1)) + 1e-8)

    # pass 3: colour term a_j, stored raw, with an online max / sum of exp for the softmax
    out = kappa_ptr + b.to(tl.int64) * J * H * W + pix
    run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(J):
        ny = tl.minimum(tl.maximum(y + tl.load(dy_ptr + j), 0), H - 1)
        nx = tl.minimum(tl.maximum(x + tl.load(dx_ptr + j), 0), W - 1)
        nb = base + ny * s_h + nx * s_w
        e0 = tl.abs(tl.load(nb, mask=inside, other=0.0).to(tl.float32) - c0) * k0
        e1 = tl.abs(tl.load(nb + s_c, mask=inside, other=0.0).to(tl.float32) - c1) * k1
        e2 = tl.abs(tl.load(nb + 2 * s_c, mask=inside, other=0.0).to(tl.float32) - c2) * k2
        a = -(e0 * e0 + e1 * e1 + e2 * e2) / 3.0
        tl.store(out + j * H * W, a, mask=inside)
        new_max = tl.maximum(run_max, a)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(a - new_max)
        run_max = new_max
    # pass 4: normalise in place and add the position term
    for j in range(J):
        a = tl.load(out + j * H * W, mask=inside, other=0.0)
        kap = tl.exp(a - run_max) / run_sum + w2 * tl.load(pos_ptr + j)
        tl.store(out + j * H * W, kap, mask=inside)


@triton.jit
def _par_propagate_kernel(src_ptr, dst_ptr, kappa_ptr, dy_ptr, dx_ptr, K, H, W, J,
                          BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """dst[b,k,p] = Σ_j κ[b,j,p] · src[b,k,neighbour_j(p)] for BLOCK_K classes × BLOCK_P pixels."""
    b = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cls = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    HW = H * W
    inside = pix < HW
    both = (cls < K)[:, None] & inside[None, :]
    y = pix // W
    x = pix % W
    src = src_ptr + b.to(tl.int64) * K * HW + cls[:, None] * HW
    kap_base = kappa_ptr + b.to(tl.int64) * J * HW + pix
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for j in range(J):
        ny = tl.minimum(tl.maximum(y + tl.load(dy_ptr + j), 0), H - 1)
        nx = tl.minimum(tl.maximum(x + tl.load(dx_ptr + j), 0), W - 1)
        kap = tl.load(kap_base + j * HW, mask=inside, other=0.0)
        m = tl.load(src + (ny * W + nx)[None, :], mask=both, other=0.0)
        acc += kap[None, :] * m
    tl.store(dst_ptr + b.to(tl.int64) * K * HW + cls[:, None] * HW + pix[None, :], acc, mask=both)


def _kappa_config(HW: int, device_type: str) -> dict:
    """κ kernel: one pixel a thread, 256 pixels per program (a few registers per pixel)."""
    return dict(BLOCK=256, num_warps=4) if device_type == "cuda" else dict(BLOCK=1024)


def _par_propagate_config(K: int, HW: int, device_type: str) -> dict:
    """Propagation: up to 32 classes × BLOCK_P pixels, 4096 elements per program on CUDA over 8
    warps (16 a thread: ~70 registers, 3/8–1/2 occupancy; 4 warps need 128 and halve it); the
    interpreter takes 1024-pixel blocks."""
    block_k = min(triton.next_power_of_2(K), 32)
    block_p = max(32, min(4096 // block_k if device_type == "cuda" else 1024, triton.next_power_of_2(HW)))
    cfg = dict(BLOCK_K=block_k, BLOCK_P=block_p)
    return dict(cfg, num_warps=8) if device_type == "cuda" else cfg


def _par_refine_triton(images: torch.Tensor, masks: torch.Tensor, dilations: List[int], num_iter: int, w1: float,
                       w2: float) -> torch.Tensor:
    B, _, H, W = images.shape
    K = masks.shape[1]
    offs = neighbour_offsets(dilations)
    J, HW, dev = len(offs), H * W, images.device
    device_type = launch_device_type(images)
    dy = torch.tensor([o[0] for o in offs], dtype=torch.int32, device=dev)
    dx = torch.tensor([o[1] for o in offs], dtype=torch.int32, device=dev)
    pos = position_softmax(dilations, w1, torch.float32, dev)
    kappa = torch.empty(B, J, H, W, dtype=torch.float32, device=dev)
    kcfg = _kappa_config(HW, device_type)
    launch(_par_kappa_kernel, (B, triton.cdiv(HW, kcfg["BLOCK"])), images, kappa, dy, dx, pos, H, W, J, 1.0 / w1, w2,
           *images.stride(), **kcfg)
    cur = F.interpolate(masks.float(), size=(H, W), mode="bilinear", align_corners=True).contiguous()
    if num_iter == 0:
        return cur.to(masks.dtype)
    nxt = torch.empty_like(cur)
    cfg = _par_propagate_config(K, HW, device_type)
    grid = (B, triton.cdiv(HW, cfg["BLOCK_P"]), triton.cdiv(K, cfg["BLOCK_K"]))
    for _ in range(num_iter):
        launch(_par_propagate_kernel, grid, cur, nxt, kappa, dy, dx, K, H, W, J, **cfg)
        cur, nxt = nxt, cur
    return cur.to(masks.dtype)


@torch.library.custom_op("wsss_kernels::par_refine", mutates_args=())
def _par_refine_op(images: torch.Tensor, masks: torch.Tensor, dilations: List[int], num_iter: int, w1: float,
                   w2: float) -> torch.Tensor:
    return _par_refine_triton(images, masks, dilations, num_iter, w1, w2)


@_par_refine_op.register_fake
def _(images, masks, dilations, num_iter, w1, w2):
    return masks.new_empty(masks.shape[0], masks.shape[1], images.shape[2], images.shape[3])


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
def _validate(images, masks, dilations, num_iter, w1, w2):
    check_tensor("images", images, 4, floating=True)
    check_tensor("masks", masks, 4, floating=True)
    if images.shape[1] != 3:
        raise ValueError(f"images must be a (B,3,H,W) tensor, got shape {tuple(images.shape)}")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks must be (B,K,h,w) with B={images.shape[0]}, got shape {tuple(masks.shape)}")
    if min(masks.shape) < 1 or min(images.shape) < 1:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must not be empty")
    check_same_device(images=images, masks=masks)
    dilations = check_int_sequence("dilations", dilations, minimum=1)
    if num_iter is None or isinstance(num_iter, bool) or int(num_iter) != num_iter or num_iter < 0:
        raise ValueError(f"num_iter must be an integer >= 0, got {num_iter!r}")
    if not (math.isfinite(float(w1)) and w1 > 0):
        raise ValueError(f"w1 must be a finite positive number, got {w1!r}")
    if not (math.isfinite(float(w2)) and w2 >= 0):
        raise ValueError(f"w2 must be a finite non-negative number, got {w2!r}")
    return dilations, int(num_iter)


def par_refine(images: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
               num_iter: int = 10, w1: float = 0.3, w2: float = 0.01, impl: str = "auto") -> torch.Tensor:
    """Refine ``masks`` (B,K,h,w) with the pixel-adaptive affinity of ``images`` (B,3,H,W) → (B,K,H,W).

    ``masks`` are first resized to (H,W) (bilinear, ``align_corners=True``). Computed in fp32
    (float64 for float64 inputs) and returned in ``masks.dtype``. Not differentiable.
    """
    dilations, num_iter = _validate(images, masks, dilations, num_iter, w1, w2)
    path = resolve_impl(impl, "par_refine", images, masks)
    with torch.no_grad():
        if path == "triton":  # fp32 compute whatever the input dtype
            return _par_refine_op(images, masks, list(dilations), num_iter, float(w1), float(w2))
        return par_refine_reference(images, masks, dilations, num_iter, w1, w2).to(masks.dtype)
