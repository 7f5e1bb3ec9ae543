"""Attention aggregation and CAM propagation (SPEC §5, AReAM / MCTformer ``gen_msf_cam``).

- ``aggregate_attention``: ``(1/L)·Σ_l w_l · mean_h softmax(attn_logits[l, :, h])`` (B,T,T).
- ``propagate_cam``: ``A = aggregate[:, Cc:, Cc:]`` (patch-to-patch, Cc class tokens),
  ``out[b,c,m] = Σ_n A[b,m,n] · cam[b,c,n]`` — the softmax runs over all T columns, class-token
  columns included, and only the patch block is used afterwards.

Triton path. ``aggregate_attention``: a row-statistics kernel (log-sum-exp per layer, head and
row, streamed over column chunks so any T works), then a tile kernel that accumulates the
normalised probabilities of every layer and head into one (B,T,T) fp32 output.
``propagate_cam``: flash-attention style — for each layer and head an online softmax over column
chunks multiplies straight into the (rows × classes) accumulator with the CAM tokens as values
(zero for the class-token columns), so no T×T matrix exists; ``propagate_cam_qk`` computes the
logits tiles from q, k on the fly (half q, k multiply as half; fp32 products, p·cam included,
in TF32 where torch's matmul precision allows, ``_common.dot_config``). Programs tile rows (128) and classes (32); small grids also split the (layer, head)
pairs over programs and sum the partial outputs. Both propagate kernels are forward-only: with
gradients required the op composes differentiable pieces instead (see the functions).

Work per call (benchmarks/results/triton-kernels.md, counted by ``wsss.kernels.costs``): the fused
propagation applies each head's softmax to the CAM, where the reference first averages the
heads, so it multiplies more — ×1.35–1.5 for C=20 (AReAM pseudo labels and evaluation), ×4.2 for
C=80 (three class tiles, each recomputing q·kᵀ; wider class tiles spill on sm_80) — in
exchange for never holding a layer's (B,Hd,T,T) logits and probabilities: at evaluation (L=12,
B=2, N=1692) it moves 0.14 GB where the reference moves 12 GB and peaks at 7 MB where the
reference peaks at 0.33 GB. On materialised logits (``propagate_cam``, L=12, B=4, T=804) the
per-head p·cam products are 11.6 GFLOP against the reference's 0.1 (it aggregates first, with
elementwise work) while the logits are read once: 0.76 GB moved against 3.0 GB, 6 MB peak
against 83 MB.
"""
import math
from typing import Optional, Sequence, Union

import torch

from ._common import (acc_type, check_positive_int, check_same_device, check_tensor, checking_values, compute_dtype,
                      dot_config, launch, launch_device_type, resolve_impl, tl, triton)

Weights = Optional[Union[torch.Tensor, Sequence[float]]]


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def _weights(layer_weights: Weights, L: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if layer_weights is None:
        return torch.ones(L, dtype=dtype, device=device)
    return torch.as_tensor(layer_weights).detach().to(dtype=dtype, device=device)


def aggregate_attention_reference(attn_logits: torch.Tensor, layer_weights: Weights = None) -> torch.Tensor:
    """(B,T,T) = (1/L)·Σ_l w_l · mean_h softmax(attn_logits[l]); one layer in flight at a time."""
    L = attn_logits.shape[0]
    ct = compute_dtype(attn_logits)
    w = _weights(layer_weights, L, ct, attn_logits.device)
    out = 0
    for layer in range(L):
        out = out + w[layer] * attn_logits[layer].to(ct).softmax(dim=-1).mean(dim=1)
    return out / L


def _propagate(cam: torch.Tensor, affinity: torch.Tensor, num_class_tokens: int) -> torch.Tensor:
    B, C, h, w = cam.shape
    patch = affinity[:, num_class_tokens:, num_class_tokens:]  # (B,N,N)
    out = cam.to(affinity.dtype).reshape(B, C, h * w) @ patch.transpose(1, 2)  # out[c,m] = Σ_n A[m,n] cam[c,n]
    return out.reshape(B, C, h, w)


def propagate_cam_reference(cam: torch.Tensor, attn_logits: torch.Tensor, num_class_tokens: int,
                            layer_weights: Weights = None) -> torch.Tensor:
    """CAM re-activation by the aggregated patch-to-patch attention (SPEC §5)."""
    return _propagate(cam, aggregate_attention_reference(attn_logits, layer_weights), num_class_tokens)


def attention_logits_from_qk(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Pre-softmax logits ``scale · q kᵀ`` (…,T,T) from q, k (…,T,dh); scale defaults to 1/√dh."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = compute_dtype(q)
    return (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale


def propagate_cam_qk_reference(cam: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_class_tokens: int,
                               layer_weights: Weights = None, scale: Optional[float] = None) -> torch.Tensor:
    """``propagate_cam_reference`` with the logits built from q, k (L,B,Hd,T,dh) one layer at a time."""
    L = q.shape[0]
    ct = compute_dtype(q)
    w = _weights(layer_weights, L, ct, q.device)
    agg = 0
    for layer in range(L):
        logits = attention_logits_from_qk(q[layer], k[layer], scale)
        agg = agg + w[layer] * logits.softmax(dim=-1).mean(dim=1)
    return _propagate(cam, agg / L, num_class_tokens)


# ----------------------------------------------------------------------------------------------
# triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_lse_kernel(x_ptr, lse_ptr, Hd, B, T, s_l, s_b, s_h, s_i, s_j, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """lse[l,b,h,i] = log Σ_j exp(x[l,b,h,i,j]), streamed over column chunks (online max)."""
    lbh = tl.program_id(0)
    h = lbh % Hd
    b = (lbh // Hd) % B
    layer = lbh // (Hd * B)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    base = x_ptr + layer.to(tl.int64) * s_l + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    run_max = tl.full([BLOCK_R], float("-inf"), dtype=ACC)
    run_sum = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, T, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        x = tl.load(base + rows[:, None] * s_i + cols[None, :] * s_j, mask=(rows[:, None] < T) & (cols[None, :] < T),
                    other=0.0).to(ACC)
        x = tl.where((cols < T)[None, :], x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(lse_ptr + lbh.to(tl.int64) * T + rows, run_max + tl.log(run_sum), mask=rows < T)


@triton.jit
def _aggregate_kernel(x_ptr, lse_ptr, coef_ptr, out_ptr, L, Hd, B, T, s_l, s_b, s_h, s_i, s_j, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, rows, cols] = Σ_l coef_l Σ_h exp(x − lse) with coef_l = w_l/(L·Hd)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < T) & (cols[None, :] < T)
    tile = rows[:, None] * s_i + cols[None, :] * s_j
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    # one flat loop over (layer, head): a single loop-carried index instead of nested pointers
    for lh in range(L * Hd):
        layer = lh // Hd
        h = lh - layer * Hd
        c = tl.load(coef_ptr + layer).to(ACC)
        x = tl.load(x_ptr + (layer.to(tl.int64) * s_l + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h) + tile,
                    mask=inside, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + ((layer * B + b) * Hd + h).to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        acc += c * tl.exp(x - lse[:, None])
    tl.store(out_ptr + b.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :], acc, mask=inside)


@triton.jit
def _aggregate_rowdot_kernel(x_ptr, lse_ptr, g_ptr, r_ptr, Hd, B, T, s_l, s_b, s_h, s_i, s_j, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """r[l,b,h,i] = Σ_j p[l,b,h,i,j] · g[b,i,j] (the softmax backward's row term)."""
    lbh = tl.program_id(0)
    h = lbh % Hd
    b = (lbh // Hd) % B
    layer = lbh // (Hd * B)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    base = x_ptr + layer.to(tl.int64) * s_l + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    lse = tl.load(lse_ptr + lbh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, T, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < T) & (cols[None, :] < T)
        x = tl.load(base + rows[:, None] * s_i + cols[None, :] * s_j, mask=inside, other=0.0).to(ACC)
        g = tl.load(g_ptr + b.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :], mask=inside,
                    other=0.0).to(ACC)
        acc += tl.sum(tl.where(inside, tl.exp(x - lse[:, None]) * g, 0.0), axis=1)
    tl.store(r_ptr + lbh.to(tl.int64) * T + rows, acc, mask=rows < T)


@triton.jit
def _aggregate_grad_kernel(x_ptr, lse_ptr, r_ptr, g_ptr, coef_ptr, dx_ptr, Hd, B, T, s_l, s_b, s_h, s_i, s_j,
                           ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[l,b,h,i,j] = coef_l · p · (g[b,i,j] − r[l,b,h,i]), dx contiguous."""
    lbh = tl.program_id(0)
    h = lbh % Hd
    b = (lbh // Hd) % B
    layer = lbh // (Hd * B)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < T) & (cols[None, :] < T)
    base = x_ptr + layer.to(tl.int64) * s_l + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    x = tl.load(base + rows[:, None] * s_i + cols[None, :] * s_j, mask=inside, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + lbh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    r = tl.load(r_ptr + lbh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    g = tl.load(g_ptr + b.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :], mask=inside, other=0.0).to(ACC)
    dx = tl.load(coef_ptr + layer).to(ACC) * tl.exp(x - lse[:, None]) * (g - r[:, None])
    tl.store(dx_ptr + lbh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=inside)


# shape integers unspecialised: one compiled kernel serves every image size, class count and split
@triton.jit(do_not_specialize=["Hd", "B", "T", "Cc", "C", "DH", "LH_PER"])
def _propagate_kernel(x_ptr, q_ptr, k_ptr, cam_ptr, coef_ptr, out_ptr, Hd, B, T, Cc, C, DH, LH_PER, scale,
                      s_l, s_b, s_h, s_i, s_j, ACC: tl.constexpr, DOT_TY: tl.constexpr, DOT_PREC: tl.constexpr,
                      PV_TY: tl.constexpr, PV_PREC: tl.constexpr, FROM_QK: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_CLS: tl.constexpr, BLOCK_DH: tl.constexpr):
    """out[split, b, cls, m] = Σ_(l,h) coef_l Σ_n softmax_row(Cc+m)[Cc+n] · cam[b, cls, n], flash style.

    A program owns BLOCK_R patch rows × BLOCK_CLS classes of one image and LH_PER (layer, head)
    pairs (split ``program_id(0) // B``; the launcher sums the splits). Logits tiles
    come from x (FROM_QK=False; strides s_*) or from scale·q kᵀ (q, k with the same strides over
    (l, b, h, token) and unit stride along d), multiplied as DOT_TY; p·cam as PV_TY."""
    b = tl.program_id(0) % B
    split = tl.program_id(0) // B
    m = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # patch rows
    cls = tl.program_id(2) * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    N = T - Cc
    rows = Cc + m
    row_ok = m < N
    cls_ok = cls < C
    dd = tl.arange(0, BLOCK_DH)
    cam_b = cam_ptr + b.to(tl.int64) * C * N
    out = tl.zeros([BLOCK_R, BLOCK_CLS], dtype=ACC)
    for i in range(LH_PER):  # LH_PER divides LH: every split owns whole (layer, head) pairs
        lh = split * LH_PER + i
        layer = lh // Hd
        h = lh - layer * Hd
        c = tl.load(coef_ptr + layer).to(ACC)
        lbh = layer.to(tl.int64) * s_l + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
        if FROM_QK:
            qi = tl.load(q_ptr + lbh + rows[:, None] * s_i + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < DH),
                         other=0.0).to(DOT_TY)
        run_max = tl.full([BLOCK_R], float("-inf"), dtype=ACC)
        run_sum = tl.zeros([BLOCK_R], dtype=ACC)
        acc = tl.zeros([BLOCK_R, BLOCK_CLS], dtype=ACC)
        for j0 in range(0, T, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < T
            if FROM_QK:
                kt = tl.load(k_ptr + lbh + cols[None, :] * s_i + dd[:, None],
                             mask=col_ok[None, :] & (dd[:, None] < DH), other=0.0).to(DOT_TY)
                x = tl.dot(qi, kt, input_precision=DOT_PREC, out_dtype=ACC) * scale
            else:
                x = tl.load(x_ptr + lbh + rows[:, None] * s_i + cols[None, :] * s_j,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
            x = tl.where(col_ok[None, :], x, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(x, axis=1))
            alpha = tl.exp(run_max - new_max)
            p = tl.exp(x - new_max[:, None])
            run_sum = run_sum * alpha + tl.sum(p, axis=1)
            # values: CAM tokens for patch columns, 0 for class-token columns
            n = cols - Cc
            v = tl.load(cam_b + cls[None, :] * N + n[:, None], mask=((n >= 0) & col_ok)[:, None] & cls_ok[None, :],
                        other=0.0)
            acc = tl.dot(p.to(PV_TY), v.to(PV_TY), acc * alpha[:, None], input_precision=PV_PREC, out_dtype=ACC)
            run_max = new_max
        out += (c / run_sum)[:, None] * acc
    out_b = out_ptr + (split * B + b).to(tl.int64) * C * N
    tl.store(out_b + cls[None, :] * N + m[:, None], out, mask=row_ok[:, None] & cls_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launch configurations: pure functions of (shape, dtype, device type), also read by
# wsss.kernels.aot, which compiles them for sm_80/sm_90 in the tests
# ----------------------------------------------------------------------------------------------
def _tile(T: int, device_type: str, cuda: int, cpu: int) -> int:
    """A power-of-two tile of at least 16 (tl.dot's minimum), at most ``cuda``/``cpu`` and T's
    next power of two; the interpreter runs larger blocks (fewer numpy round trips)."""
    return max(16, min(cuda if device_type == "cuda" else cpu, triton.next_power_of_2(T)))


def _row_config(T: int, dtype: torch.dtype, device_type: str) -> dict:
    """Row kernels (log-sum-exp, softmax-backward row term): BLOCK_R rows streamed over BLOCK_C
    columns; 16×128 over 8 warps is 8 elements a thread (16×256 over 4 warps spills on sm_80 in
    the backward's row term)."""
    cfg = dict(BLOCK_R=_tile(T, device_type, 16, 64), BLOCK_C=_tile(T, device_type, 128, 1024))
    return dict(cfg, num_warps=8) if device_type == "cuda" else cfg


def _tile_config(T: int, dtype: torch.dtype, device_type: str) -> dict:
    """Tile kernels (aggregate, softmax backward): 64×64 per program over 8 warps (16 elements
    and their 64-bit addresses a thread; with 4 warps ptxas runs out of registers)."""
    blk = _tile(T, device_type, 64, 128)
    cfg = dict(BLOCK_R=blk, BLOCK_C=blk)
    return dict(cfg, num_warps=8) if device_type == "cuda" else cfg


# enough programs to fill the GPU: a few waves of an H100's 132 / an A100's 108 SMs
PROPAGATE_MIN_PROGRAMS = 512


def _propagate_config(L: int, Hd: int, B: int, T: int, C: int, Cc: int, dh: int, dtype: torch.dtype,
                      device_type: str, from_qk: bool) -> dict:
    """Flash-style propagation: BLOCK_R rows × BLOCK_CLS classes per program, BLOCK_J columns per
    step. 128 rows over 8 warps (16 rows a warp, the mma's M) and 32-column steps keep the logits,
    probabilities, both accumulators and the mma operands in registers (64-column steps or 64
    rows over 4 warps spill on sm_80; the materialised logits, loaded rather than multiplied,
    step 16 columns at a time); classes are tiled at 32, so C=80 recomputes the logits three
    times. When rows × classes × images give fewer than
    ``PROPAGATE_MIN_PROGRAMS`` programs, the (layer, head) pairs are split over programs too
    (``heads_per_program``; the launcher sums the partial outputs). q·kᵀ multiplies as the
    logits' dtype, p·cam as fp32 (``dot_config``: TF32 where torch's matmul precision allows)."""
    qk = dot_config(dtype, device_type)
    pv = dot_config(torch.float64 if dtype == torch.float64 else torch.float32, device_type)  # cam in ct
    cuda = device_type == "cuda"
    cfg = dict(BLOCK_R=_tile(T - Cc, device_type, 128, 64), BLOCK_J=_tile(T, device_type, 32 if from_qk else 16, 256),
               BLOCK_CLS=max(16, min(32 if cuda else 64, triton.next_power_of_2(C))),
               BLOCK_DH=max(16, triton.next_power_of_2(dh)) if from_qk else 16,
               DOT_TY=qk["DOT_TY"], DOT_PREC=qk["DOT_PREC"], PV_TY=pv["DOT_TY"], PV_PREC=pv["DOT_PREC"])
    programs = B * triton.cdiv(T - Cc, cfg["BLOCK_R"]) * triton.cdiv(C, cfg["BLOCK_CLS"])
    wanted = min(L * Hd, triton.cdiv(PROPAGATE_MIN_PROGRAMS, programs)) if cuda else 1
    # the largest divisor of L·Hd that still gives ``wanted`` splits
    cfg["heads_per_program"] = max(d for d in range(1, L * Hd + 1) if (L * Hd) % d == 0 and (L * Hd) // d >= wanted)
    return dict(cfg, num_warps=max(1, min(8, cfg["BLOCK_R"] // 16)), num_stages=2) if cuda else cfg


# ----------------------------------------------------------------------------------------------
# launchers and custom ops
# ----------------------------------------------------------------------------------------------
def _row_lse(x: torch.Tensor) -> torch.Tensor:
    L, B, Hd, T, _ = x.shape
    lse = torch.empty(L, B, Hd, T, dtype=compute_dtype(x), device=x.device)
    cfg = _row_config(T, x.dtype, launch_device_type(x))
    launch(_row_lse_kernel, (L * B * Hd, triton.cdiv(T, cfg["BLOCK_R"])), x, lse, Hd, B, T, *x.stride(),
           ACC=acc_type(x.dtype), **cfg)
    return lse


def _aggregate_forward(attn_logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    L, B, Hd, T, _ = attn_logits.shape
    lse = _row_lse(attn_logits)
    out = torch.empty(B, T, T, dtype=compute_dtype(attn_logits), device=attn_logits.device)
    cfg = _tile_config(T, attn_logits.dtype, launch_device_type(attn_logits))
    launch(_aggregate_kernel, (B, triton.cdiv(T, cfg["BLOCK_R"]), triton.cdiv(T, cfg["BLOCK_C"])),
           attn_logits, lse, coef, out, L, Hd, B, T, *attn_logits.stride(), ACC=acc_type(attn_logits.dtype), **cfg)
    return out


def _aggregate_backward_launch(grad: torch.Tensor, attn_logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    L, B, Hd, T, _ = attn_logits.shape
    x, dev = attn_logits, attn_logits.device
    g = grad.contiguous()
    lse = _row_lse(x)
    r = torch.empty_like(lse)
    device_type = launch_device_type(x)
    rows = _row_config(T, x.dtype, device_type)
    launch(_aggregate_rowdot_kernel, (L * B * Hd, triton.cdiv(T, rows["BLOCK_R"])), x, lse, g, r, Hd, B, T,
           *x.stride(), ACC=acc_type(x.dtype), **rows)
    dx = torch.empty(L, B, Hd, T, T, dtype=x.dtype, device=dev)
    tiles = _tile_config(T, x.dtype, device_type)
    launch(_aggregate_grad_kernel, (L * B * Hd, triton.cdiv(T, tiles["BLOCK_R"]), triton.cdiv(T, tiles["BLOCK_C"])),
           x, lse, r, g, coef, dx, Hd, B, T, *x.stride(), ACC=acc_type(x.dtype), **tiles)
    return dx


@torch.library.custom_op("wsss_kernels::aggregate_attention", mutates_args=())
def _aggregate_op(attn_logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef (L,) = w_l / (L·Hd) in the compute dtype."""
    return _aggregate_forward(attn_logits, coef)


@_aggregate_op.register_fake
def _(attn_logits, coef):
    L, B, Hd, T, _ = attn_logits.shape
    return attn_logits.new_empty(B, T, T, dtype=compute_dtype(attn_logits))


@torch.library.custom_op("wsss_kernels::aggregate_attention_backward", mutates_args=())
def _aggregate_bwd_op(grad: torch.Tensor, attn_logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return _aggregate_backward_launch(grad, attn_logits, coef)


@_aggregate_bwd_op.register_fake
def _(grad, attn_logits, coef):
    return torch.empty_like(attn_logits, memory_format=torch.contiguous_format)


def _aggregate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _aggregate_backward(ctx, grad):
    attn_logits, coef = ctx.saved_tensors
    return _aggregate_bwd_op(grad, attn_logits, coef), None


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


def _launch_propagate(cam, x, q, k, coef, num_class_tokens, scale):
    src = x if x is not None else q
    L, B, Hd, T = src.shape[:4]
    C, Cc = cam.shape[1], num_class_tokens
    ct = compute_dtype(src)
    camc = cam.reshape(B, C, -1).to(ct).contiguous()
    dh = 1 if x is not None else q.shape[-1]
    cfg = _propagate_config(L, Hd, B, T, C, Cc, dh, src.dtype, launch_device_type(src), from_qk=x is None)
    per = cfg.pop("heads_per_program")
    splits = triton.cdiv(L * Hd, per)
    out = torch.empty(splits, B, C, T - Cc, dtype=ct, device=cam.device)
    grid = (splits * B, triton.cdiv(T - Cc, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_CLS"]))
    if x is not None:
        launch(_propagate_kernel, grid, x, x, x, camc, coef, out, Hd, B, T, Cc, C, 1, per, 1.0, *x.stride(),
               ACC=acc_type(x.dtype), FROM_QK=False, **cfg)
    else:
        q, k = q.contiguous(), k.contiguous()
        launch(_propagate_kernel, grid, q, q, k, camc, coef, out, Hd, B, T, Cc, C, dh, per, float(scale),
               *q.stride()[:4], 1, ACC=acc_type(q.dtype), FROM_QK=True, **cfg)
    out = out[0] if splits == 1 else out.sum(dim=0)
    return out.reshape(cam.shape[0], C, *cam.shape[2:])


@torch.library.custom_op("wsss_kernels::propagate_cam", mutates_args=())
def _propagate_op(cam: torch.Tensor, attn_logits: torch.Tensor, coef: torch.Tensor,
                  num_class_tokens: int) -> torch.Tensor:
    return _launch_propagate(cam, attn_logits, None, None, coef, num_class_tokens, 1.0)


@_propagate_op.register_fake
def _(cam, attn_logits, coef, num_class_tokens):
    return cam.new_empty(cam.shape, dtype=compute_dtype(attn_logits))


@torch.library.custom_op("wsss_kernels::propagate_cam_qk", mutates_args=())
def _propagate_qk_op(cam: torch.Tensor, q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor, num_class_tokens: int,
                     scale: float) -> torch.Tensor:
    return _launch_propagate(cam, None, q, k, coef, num_class_tokens, scale)


@_propagate_qk_op.register_fake
def _(cam, q, k, coef, num_class_tokens, scale):
    return cam.new_empty(cam.shape, dtype=compute_dtype(q))


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------
def _check_logits(name: str, x) -> None:
    check_tensor(name, x, 5, floating=True)
    if x.shape[-1] != x.shape[-2] or min(x.shape) < 1:
        raise ValueError(f"{name} must be a non-empty (L,B,Hd,T,T) tensor, got shape {tuple(x.shape)}")


def _check_weights(layer_weights: Weights, L: int, device: torch.device) -> None:
    if layer_weights is None:
        return
    w = torch.as_tensor(layer_weights)
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"layer_weights must be real numbers, got {w.dtype}")
    if w.dim() != 1 or w.shape[0] != L:
        raise ValueError(f"layer_weights must hold one number per layer (L={L}), got shape {tuple(w.shape)}")
    if torch.is_tensor(layer_weights) and layer_weights.device != device:
        raise ValueError(f"layer_weights must be on {device}, got {layer_weights.device}")
    if checking_values() and not bool(torch.isfinite(w.double()).all()):
        raise ValueError(f"layer_weights must be finite, got {w.tolist()}")


def _coef(layer_weights: Weights, L: int, Hd: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (_weights(layer_weights, L, dtype, device) / (L * Hd)).contiguous()


def _check_cam(cam, B: int, T: int, num_class_tokens) -> int:
    check_tensor("cam", cam, 4, floating=True)
    num_class_tokens = check_positive_int("num_class_tokens", num_class_tokens, minimum=0)
    N = cam.shape[2] * cam.shape[3]
    if cam.shape[0] != B or N < 1 or cam.shape[1] < 1 or num_class_tokens + N != T:
        raise ValueError(f"cam must be (B,C,h,w) with B={B} and num_class_tokens + h·w = T={T}; "
                         f"got cam shape {tuple(cam.shape)} and num_class_tokens={num_class_tokens}")
    return num_class_tokens


def aggregate_attention(attn_logits: torch.Tensor, layer_weights: Weights = None, impl: str = "auto") -> torch.Tensor:
    """``(1/L)·Σ_l w_l · mean_h softmax(attn_logits[l, :, h])`` → (B,T,T) in fp32 (float64 for float64).

    ``attn_logits`` (L,B,Hd,T,T) pre-softmax; ``layer_weights`` (L,) constants (no gradient),
    1 when None. Differentiable w.r.t. ``attn_logits``."""
    _check_logits("attn_logits", attn_logits)
    L, B, Hd, T, _ = attn_logits.shape
    _check_weights(layer_weights, L, attn_logits.device)
    if resolve_impl(impl, "aggregate_attention", attn_logits) == "reference":
        return aggregate_attention_reference(attn_logits, layer_weights)
    coef = _coef(layer_weights, L, Hd, compute_dtype(attn_logits), attn_logits.device)
    return _aggregate_op(attn_logits, coef)


def propagate_cam(cam: torch.Tensor, attn_logits: torch.Tensor, num_class_tokens: int, layer_weights: Weights = None,
                  impl: str = "auto") -> torch.Tensor:
    """Re-activate ``cam`` (B,C,h,w) with the aggregated patch-to-patch attention (SPEC §5).

    ``attn_logits`` (L,B,Hd,T,T) with T = num_class_tokens + h·w; returns (B,C,h,w) in fp32
    (float64 for float64 logits). The Triton forward never forms the (B,T,T) aggregate; when
    a gradient is needed it runs the differentiable ``aggregate_attention`` and a matmul."""
    _check_logits("attn_logits", attn_logits)
    L, B, Hd, T, _ = attn_logits.shape
    num_class_tokens = _check_cam(cam, B, T, num_class_tokens)
    check_same_device(cam=cam, attn_logits=attn_logits)
    _check_weights(layer_weights, L, attn_logits.device)
    if resolve_impl(impl, "propagate_cam", cam, attn_logits) == "reference":
        return propagate_cam_reference(cam, attn_logits, num_class_tokens, layer_weights)
    coef = _coef(layer_weights, L, Hd, compute_dtype(attn_logits), attn_logits.device)
    if torch.is_grad_enabled() and (cam.requires_grad or attn_logits.requires_grad):
        return _propagate(cam, _aggregate_op(attn_logits, coef), num_class_tokens)
    return _propagate_op(cam, attn_logits, coef, num_class_tokens)


def propagate_cam_qk(cam: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_class_tokens: int,
                     layer_weights: Weights = None, scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """``propagate_cam`` with the logits ``scale · q kᵀ`` of every layer and head computed on the fly.

    ``q``, ``k`` (L,B,Hd,T,dh) over all T tokens (class tokens first); ``scale`` defaults to
    1/√dh. The Triton path never holds a T×T matrix. It is forward-only: with a gradient
    required the reference runs (it builds one layer's (B,Hd,T,T) logits at a time)."""
    check_tensor("q", q, 5, floating=True)
    check_tensor("k", k, 5, floating=True)
    if q.shape != k.shape or min(q.shape) < 1:
        raise ValueError(f"q and k must have the same non-empty (L,B,Hd,T,dh) shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    L, B, Hd, T, dh = q.shape
    num_class_tokens = _check_cam(cam, B, T, num_class_tokens)
    check_same_device(cam=cam, q=q, k=k)
    _check_weights(layer_weights, L, q.device)
    scale = dh ** -0.5 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    path = resolve_impl(impl, "propagate_cam_qk", cam, q, k)
    if path == "triton" and dh > 256:
        raise ValueError(f"q, k head dim must be <= 256 for the Triton kernel, got {dh}")
    needs_grad = torch.is_grad_enabled() and (cam.requires_grad or q.requires_grad or k.requires_grad)
    if needs_grad or path == "reference":
        return propagate_cam_qk_reference(cam, q, k, num_class_tokens, layer_weights, scale)
    coef = _coef(layer_weights, L, Hd, compute_dtype(q), q.device)
    return _propagate_qk_op(cam, q, k, coef, num_class_tokens, float(scale))
