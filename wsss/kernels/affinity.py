"""Affinity labels and the masked pairwise affinity losses (SPEC §3.2 and §5).

Both losses share one shape: a pairwise score ``s_ij`` between tokens of an image, a
similarity ``sim(s)``, and pair classes from the token labels (pos: same label, neg: different
label, neither: either token ignored, or the diagonal when it is ignored):

- ptc (ToCo/MoRe, §3.2): ``s = cos(F_i, F_j)``, ``sim = |s|``,
  ``L = 0.5·(1 − Σ_pos sim/(n_pos+1)) + 0.5·Σ_neg sim/(n_neg+1)``, diagonal ignored;
- AReAM (§5): ``s`` = head-mean attention logit, ``sim = σ(s)``,
  ``L = 0.5·Σ_pos (1−sim)/(n_pos+1) + 0.5·Σ_neg sim/(n_neg+1)``, diagonal kept by default.

The sums run over the whole batch. With no pair of a kind its term is 0 (the +1 keeps it
finite), so degenerate batches give a finite loss with zero, finite gradients.

Triton path: a tile kernel builds the pair classes from the (B,N) label map and either loads
the score tile (materialised logits) or computes it as a dot product over the feature dim
(cosine features, or q·kᵀ for ``masked_sigmoid_affinity_loss_qk``), writing per-tile partial
sums — no N×N label, similarity or mask matrix is built. When a gradient is needed the forward
keeps the (B,N,N) fp32 scores, and the backward reads them tile by tile and accumulates
``dL/ds @ y`` per (row block, feature block): the scores are multiplied once, not once per
feature block. Half inputs multiply as half (fp32 accumulation), fp32 as TF32 on CUDA when
torch's fp32 matmul precision allows it, as wsss's ``tf32`` config sets (``_common.dot_config``).

Work per call at the shapes of SPEC §3/§5 (benchmarks/results/triton-kernels.md, counted by
``wsss.kernels.costs``): the ptc loss fwd+bwd (B=4, D=768, N=784) multiplies 7.6 GFLOP against the
reference's 11.3 (the cosine backward needs dx only: s is symmetric) and moves half its bytes;
the q·k loss (AReAM, B=64, N=196, D=6·64) multiplies as much as the reference (5.7 GFLOP) and
moves a third of its bytes (a sixth for bf16), since it never forms the per-head logits.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._common import (acc_type, check_labels, check_same_device, check_tensor, compute_dtype, dot_config, launch,
                      launch_device_type, resolve_impl, tl, triton)

COS_EPS = 1e-8  # SPEC §3.2: L2 normalisation ε
MODE_COSINE = 0  # sim = |s|, positive term Σ sim enters with a minus sign
MODE_SIGMOID = 1  # sim = σ(s), positive term Σ (1 − sim)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def affinity_labels(labels: torch.Tensor, ignore_index: int = 255, ignore_diagonal: bool = True) -> torch.Tensor:
    """(B,N,N) int64: 1 same label, 0 different, ``ignore_index`` where either token is ignored
    (and on the diagonal when ``ignore_diagonal``). ``labels`` (B,h,w) integer."""
    check_labels("labels", labels, ignore_index)
    flat = labels.flatten(1).long()
    aff = (flat.unsqueeze(2) == flat.unsqueeze(1)).long()
    ign = flat == ignore_index
    aff.masked_fill_(ign.unsqueeze(2) | ign.unsqueeze(1), ignore_index)
    if ignore_diagonal:
        aff.diagonal(dim1=1, dim2=2).fill_(ignore_index)
    return aff


def _pair_loss_reference(sim: torch.Tensor, labels: torch.Tensor, ignore_index: int, ignore_diagonal: bool,
                         mode: int) -> torch.Tensor:
    aff = affinity_labels(labels, ignore_index, ignore_diagonal)
    pos = (aff == 1).to(sim.dtype)
    neg = (aff == 0).to(sim.dtype)
    pos_term = (pos * sim).sum() / (pos.sum() + 1)
    neg_term = (neg * sim).sum() / (neg.sum() + 1)
    if mode == MODE_COSINE:
        return 0.5 * (1 - pos_term) + 0.5 * neg_term
    return 0.5 * ((pos * (1 - sim)).sum() / (pos.sum() + 1)) + 0.5 * neg_term


def masked_cosine_affinity_loss_reference(features: torch.Tensor, labels: torch.Tensor,
                                          ignore_index: int = 255) -> torch.Tensor:
    """ptc loss (SPEC §3.2) with the (B,N,N) cosine and label matrices materialised."""
    with torch.autocast(device_type=features.device.type, enabled=False):  # fp32 cosines also under AMP
        f = F.normalize(features.to(compute_dtype(features)).flatten(2), dim=1, eps=COS_EPS)  # (B,D,N)
        cos = (f.transpose(1, 2) @ f).abs()
        return _pair_loss_reference(cos, labels, ignore_index, True, MODE_COSINE)


def masked_sigmoid_affinity_loss_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                           ignore_diagonal: bool = False) -> torch.Tensor:
    """AReAM affinity loss (SPEC §5) on head-averaged logits (B,N,N), materialised."""
    p = torch.sigmoid(logits.to(compute_dtype(logits)))
    return _pair_loss_reference(p, labels, ignore_index, ignore_diagonal, MODE_SIGMOID)


def head_mean_logits(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """mean_h (scale · q_h k_hᵀ) (B,N,N) from q, k (B,Hd,N,dh); ``scale`` defaults to 1/√dh."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = compute_dtype(q)
    with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 logits also under AMP
        return (q.to(ct) @ k.to(ct).transpose(-1, -2)).mean(dim=1) * scale


def masked_sigmoid_affinity_loss_qk_reference(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor,
                                              ignore_index: int = 255, ignore_diagonal: bool = False,
                                              scale: Optional[float] = None) -> torch.Tensor:
    """``masked_sigmoid_affinity_loss_reference`` on the materialised head-mean logits."""
    return masked_sigmoid_affinity_loss_reference(head_mean_logits(q, k, scale), labels, ignore_index,
                                                  ignore_diagonal)


# ----------------------------------------------------------------------------------------------
# triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pair_classes(lab_b, rows, cols, N, ignore_index, IGNORE_DIAG: tl.constexpr):
    """(pos, neg) boolean tiles from the label map; out-of-range tokens count as ignored."""
    li = tl.load(lab_b + rows, mask=rows < N, other=ignore_index)
    lj = tl.load(lab_b + cols, mask=cols < N, other=ignore_index)
    valid = (li != ignore_index)[:, None] & (lj != ignore_index)[None, :]
    if IGNORE_DIAG:
        valid = valid & (rows[:, None] != cols[None, :])
    same = li[:, None] == lj[None, :]
    return valid & same, valid & (li[:, None] != lj[None, :])


@triton.jit
def _dot_tile(x_b, y_b, rows, cols, N, D, ACC: tl.constexpr, DOT_TY: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """s[i,j] = Σ_d x[i,d]·y[j,d] for a row block and a column block of (N,D) row-major x, y."""
    s = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x_b + rows[:, None] * D + dd[None, :], mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0)
        bt = tl.load(y_b + cols[None, :] * D + dd[:, None], mask=(cols[None, :] < N) & (dd[:, None] < D), other=0.0)
        s = tl.dot(a.to(DOT_TY), bt.to(DOT_TY), s, input_precision=DOT_PREC, out_dtype=ACC)
    return s


@triton.jit
def _tile_partials(s, pos, neg, part_ptr, MODE: tl.constexpr):
    """Write Σ_pos(positive term), Σ_neg sim, n_pos, n_neg of one tile to part_ptr[0:4]."""
    if MODE == 0:
        sim = tl.abs(s)
        pos_val = sim
    else:
        sim = tl.sigmoid(s)
        pos_val = tl.sigmoid(-s)  # 1 − σ(s) without cancellation
    zero = tl.zeros_like(sim)
    tl.store(part_ptr + 0, tl.sum(tl.sum(tl.where(pos, pos_val, zero), axis=1), axis=0))
    tl.store(part_ptr + 1, tl.sum(tl.sum(tl.where(neg, sim, zero), axis=1), axis=0))
    tl.store(part_ptr + 2, tl.sum(tl.sum(tl.where(pos, 1.0, 0.0), axis=1), axis=0).to(sim.dtype))
    tl.store(part_ptr + 3, tl.sum(tl.sum(tl.where(neg, 1.0, 0.0), axis=1), axis=0).to(sim.dtype))


@triton.jit
def _tile_grad(s, pos, neg, c_pos, c_neg, MODE: tl.constexpr):
    """dL/ds for a tile given c_pos = 0.5·ḡ/(n_pos+1), c_neg = 0.5·ḡ/(n_neg+1)."""
    if MODE == 0:
        dsim = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0)).to(s.dtype)  # d|s|/ds, 0 at 0 like torch
    else:
        p = tl.sigmoid(s)
        dsim = p * (1.0 - p)
    zero = tl.zeros_like(s)
    # cosine: −c_pos·d|s| on pos; sigmoid: d(1−σ) = −σ' on pos; both: +c_neg·dsim on neg
    return tl.where(pos, -c_pos * dsim, tl.where(neg, c_neg * dsim, zero))


@triton.jit
def _logits_loss_fwd_kernel(logit_ptr, lab_ptr, part_ptr, N, s_b, s_i, s_j, ignore_index,
                            ACC: tl.constexpr, IGNORE_DIAG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < N) & (cols[None, :] < N)
    s = tl.load(logit_ptr + b.to(tl.int64) * s_b + rows[:, None] * s_i + cols[None, :] * s_j, mask=inside,
                other=0.0).to(ACC)
    pos, neg = _pair_classes(lab_ptr + b * N, rows, cols, N, ignore_index, IGNORE_DIAG)
    tile = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    _tile_partials(s, pos, neg, part_ptr + tile * 4, 1)


@triton.jit
def _logits_loss_bwd_kernel(logit_ptr, lab_ptr, coef_ptr, grad_ptr, N, s_b, s_i, s_j, ignore_index,
                            ACC: tl.constexpr, IGNORE_DIAG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < N) & (cols[None, :] < N)
    s = tl.load(logit_ptr + b.to(tl.int64) * s_b + rows[:, None] * s_i + cols[None, :] * s_j, mask=inside,
                other=0.0).to(ACC)
    pos, neg = _pair_classes(lab_ptr + b * N, rows, cols, N, ignore_index, IGNORE_DIAG)
    g = _tile_grad(s, pos, neg, tl.load(coef_ptr).to(ACC), tl.load(coef_ptr + 1).to(ACC), 1)
    out = grad_ptr + b.to(tl.int64) * N * N + rows[:, None] * N + cols[None, :]
    tl.store(out, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every token count
def _dot_loss_fwd_kernel(x_ptr, y_ptr, lab_ptr, part_ptr, s_ptr, N, D, scale, ignore_index, MODE: tl.constexpr,
                         ACC: tl.constexpr, DOT_TY: tl.constexpr, DOT_PREC: tl.constexpr,
                         IGNORE_DIAG: tl.constexpr, STORE_S: tl.constexpr, BLOCK_I: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials of the loss on s = scale·x yᵀ; with STORE_S the s tile is kept for the backward."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    off = b.to(tl.int64) * N * D
    s = _dot_tile(x_ptr + off, y_ptr + off, rows, cols, N, D, ACC, DOT_TY, DOT_PREC, BLOCK_I, BLOCK_J,
                  BLOCK_D) * scale
    if STORE_S:
        tl.store(s_ptr + b.to(tl.int64) * N * N + rows[:, None] * N + cols[None, :], s,
                 mask=(rows[:, None] < N) & (cols[None, :] < N))
    pos, neg = _pair_classes(lab_ptr + b * N, rows, cols, N, ignore_index, IGNORE_DIAG)
    tile = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    _tile_partials(s, pos, neg, part_ptr + tile * 4, MODE)


@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every token count
def _dot_loss_bwd_kernel(s_ptr, y_ptr, lab_ptr, coef_ptr, dx_ptr, N, D, s_i, s_j, scale, ignore_index,
                         MODE: tl.constexpr, ACC: tl.constexpr, DOT_TY: tl.constexpr, DOT_PREC: tl.constexpr,
                         IGNORE_DIAG: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_DO: tl.constexpr):
    """dx[i, d-block] = scale · Σ_j dL/ds_ij · y[j, d-block] from the scores the forward stored.

    The pair classes are symmetric, so dy is this kernel with x for y and s read transposed
    (strides s_i, s_j swapped)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    dout = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    off = b.to(tl.int64) * N * D
    s_b = s_ptr + b.to(tl.int64) * N * N
    c_pos = tl.load(coef_ptr).to(ACC)
    c_neg = tl.load(coef_ptr + 1).to(ACC)
    acc = tl.zeros([BLOCK_I, BLOCK_DO], dtype=ACC)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        s = tl.load(s_b + rows[:, None] * s_i + cols[None, :] * s_j, mask=(rows[:, None] < N) & (cols[None, :] < N),
                    other=0.0).to(ACC)
        pos, neg = _pair_classes(lab_ptr + b * N, rows, cols, N, ignore_index, IGNORE_DIAG)
        g = _tile_grad(s, pos, neg, c_pos, c_neg, MODE)
        yj = tl.load(y_ptr + off + cols[:, None] * D + dout[None, :],
                     mask=(cols[:, None] < N) & (dout[None, :] < D), other=0.0)
        acc = tl.dot(g.to(DOT_TY), yj.to(DOT_TY), acc, input_precision=DOT_PREC, out_dtype=ACC)
    tl.store(dx_ptr + off + rows[:, None] * D + dout[None, :], acc * scale,
             mask=(rows[:, None] < N) & (dout[None, :] < D))


# ----------------------------------------------------------------------------------------------
# launch configurations: pure functions of (shape, dtype, device type), also read by
# wsss.kernels.aot, which compiles them for sm_80/sm_90 in the tests
# ----------------------------------------------------------------------------------------------
def _logit_config(N: int, dtype: torch.dtype, device_type: str) -> dict:
    """One BLOCK×BLOCK tile of logits per program; elementwise work, 64×64 over 8 warps (16
    elements a thread; 4 warps need ~170 registers in the forward's reductions)."""
    if device_type == "cuda":
        return dict(BLOCK=64, num_warps=8)
    return dict(BLOCK=128)  # the interpreter: fewer, larger numpy blocks


def _dot_fwd_config(N: int, D: int, dtype: torch.dtype, device_type: str) -> dict:
    """64×64 score tiles over 8 warps (16 accumulators a thread), the feature dim streamed in
    64-wide chunks through a software pipeline of 3 stages for half operands (48 KB of shared
    memory), 2 for fp32 (64 KB) — 4 warps or a third fp32 stage cap the occupancy at 1/8."""
    dot = dot_config(dtype, device_type)
    if device_type == "cuda":
        bi = max(16, min(64, triton.next_power_of_2(N)))
        bd = max(16, min(64, triton.next_power_of_2(D)))
        stages = 2 if dot["DOT_TY"] in (tl.float32, tl.float64) else 3
        return dict(BLOCK_I=bi, BLOCK_J=bi, BLOCK_D=bd, num_warps=8, num_stages=stages, **dot)
    bi = max(16, min(64 if N > 32 else 32, triton.next_power_of_2(N)))
    return dict(BLOCK_I=bi, BLOCK_J=bi, BLOCK_D=max(16, min(128, triton.next_power_of_2(D))), **dot)


def _dot_bwd_config(N: int, D: int, dtype: torch.dtype, device_type: str) -> dict:
    """Per program 64 rows × 64 feature columns of dx over 8 warps, streaming 32-column steps of
    the stored scores (64-column steps or 4 warps leave 1/8 occupancy).

    The operand of the dot is dL/ds ≈ 0.5/(n+1) (n: pairs in the batch, ~10⁶): below fp16's
    normal range, so fp16 inputs multiply in fp32 (TF32 as ``dot_config``); bf16 has fp32's
    exponent range."""
    dot = dot_config(torch.float32 if dtype == torch.float16 else dtype, device_type)
    if device_type == "cuda":
        bi = max(16, min(64, triton.next_power_of_2(N)))
        return dict(BLOCK_I=bi, BLOCK_J=max(16, min(32, triton.next_power_of_2(N))),
                    BLOCK_DO=max(16, min(64, triton.next_power_of_2(D))), num_warps=8, num_stages=3, **dot)
    bi = max(16, min(64 if N > 32 else 32, triton.next_power_of_2(N)))
    return dict(BLOCK_I=bi, BLOCK_J=bi, BLOCK_DO=max(16, min(256, triton.next_power_of_2(D))), **dot)


# ----------------------------------------------------------------------------------------------
# launchers and custom ops (autograd, torch.compile: opaque ops with fake impls)
# ----------------------------------------------------------------------------------------------
def _finish(parts: torch.Tensor, mode: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss from the per-tile partials (summed in float64) and the pair counts (int64)."""
    tot = parts.double().sum(dim=0)
    pos_term = tot[0] / (tot[2] + 1)
    neg_term = tot[1] / (tot[3] + 1)
    loss = 0.5 * (1 - pos_term) + 0.5 * neg_term if mode == MODE_COSINE else 0.5 * pos_term + 0.5 * neg_term
    return loss.to(out_dtype), tot[2:].round().long()


def _coefficients(grad: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(0.5·ḡ/(n_pos+1), 0.5·ḡ/(n_neg+1)) on the device, no host sync."""
    return (0.5 * grad.double() / (counts.double() + 1)).to(dtype).contiguous()


def _flat_labels(labels: torch.Tensor) -> torch.Tensor:
    return labels.reshape(labels.shape[0], -1).long().contiguous()


def _sigmoid_loss_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                          ignore_diagonal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, _ = logits.shape
    cfg = _logit_config(N, logits.dtype, launch_device_type(logits))
    grid = (B, triton.cdiv(N, cfg["BLOCK"]), triton.cdiv(N, cfg["BLOCK"]))
    ct = compute_dtype(logits)
    parts = torch.empty(grid[0] * grid[1] * grid[2], 4, dtype=ct, device=logits.device)
    launch(_logits_loss_fwd_kernel, grid, logits, _flat_labels(labels), parts, N, *logits.stride(), ignore_index,
           ACC=acc_type(logits.dtype), IGNORE_DIAG=ignore_diagonal, **cfg)
    return _finish(parts, MODE_SIGMOID, ct)


def _sigmoid_loss_backward(grad: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int, ignore_diagonal: bool) -> torch.Tensor:
    B, N, _ = logits.shape
    cfg = _logit_config(N, logits.dtype, launch_device_type(logits))
    grad_logits = torch.empty(B, N, N, dtype=logits.dtype, device=logits.device)
    launch(_logits_loss_bwd_kernel, (B, triton.cdiv(N, cfg["BLOCK"]), triton.cdiv(N, cfg["BLOCK"])),
           logits, _flat_labels(labels), _coefficients(grad, counts, compute_dtype(logits)), grad_logits, N,
           *logits.stride(), ignore_index, ACC=acc_type(logits.dtype), IGNORE_DIAG=ignore_diagonal, **cfg)
    return grad_logits


@torch.library.custom_op("wsss_kernels::sigmoid_affinity_loss", mutates_args=())
def _sigmoid_loss_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                     ignore_diagonal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sigmoid_loss_forward(logits, labels, ignore_index, ignore_diagonal)


@_sigmoid_loss_op.register_fake
def _(logits, labels, ignore_index, ignore_diagonal):
    return logits.new_empty((), dtype=compute_dtype(logits)), logits.new_empty(2, dtype=torch.long)


@torch.library.custom_op("wsss_kernels::sigmoid_affinity_loss_backward", mutates_args=())
def _sigmoid_loss_bwd_op(grad: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int, ignore_diagonal: bool) -> torch.Tensor:
    return _sigmoid_loss_backward(grad, counts, logits, labels, ignore_index, ignore_diagonal)


@_sigmoid_loss_bwd_op.register_fake
def _(grad, counts, logits, labels, ignore_index, ignore_diagonal):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sigmoid_setup(ctx, inputs, output):
    logits, labels, ignore_index, ignore_diagonal = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.options = (ignore_index, ignore_diagonal)


def _sigmoid_backward(ctx, grad_loss, _grad_counts):
    logits, labels, counts = ctx.saved_tensors
    return _sigmoid_loss_bwd_op(grad_loss, counts, logits, labels, *ctx.options), None, None, None


_sigmoid_loss_op.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)


def _dot_loss_forward(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, mode: int, ignore_index: int,
                      ignore_diagonal: bool, scale: float, save_scores: bool,
                      operand_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pair counts, scores): the loss on s = scale·x yᵀ per image, x, y (B,N,D) contiguous
    (cosine mode passes y = x), multiplied as ``operand_dtype``; the (B,N,N) scores when
    ``save_scores`` (what the backward reads), else an empty tensor."""
    B, N, D = x.shape
    cfg = _dot_fwd_config(N, D, operand_dtype, launch_device_type(x))
    x, y = _operands(x, y, mode, operand_dtype)
    grid = (B, triton.cdiv(N, cfg["BLOCK_I"]), triton.cdiv(N, cfg["BLOCK_J"]))
    ct = compute_dtype(x)
    parts = torch.empty(grid[0] * grid[1] * grid[2], 4, dtype=ct, device=x.device)
    scores = torch.empty((B, N, N) if save_scores else (0,), dtype=ct, device=x.device)
    launch(_dot_loss_fwd_kernel, grid, x, y, _flat_labels(labels), parts, scores if save_scores else parts, N, D,
           float(scale), ignore_index, MODE=mode, ACC=acc_type(x.dtype), IGNORE_DIAG=ignore_diagonal,
           STORE_S=save_scores, **cfg)
    return (*_finish(parts, mode, ct), scores)


def _operands(x: torch.Tensor, y: torch.Tensor, mode: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    xo = x.to(dtype)
    return xo, (xo if mode == MODE_COSINE else y.to(dtype))


def _dot_loss_backward(grad: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, x: torch.Tensor,
                       y: torch.Tensor, labels: torch.Tensor, mode: int, ignore_index: int, ignore_diagonal: bool,
                       scale: float, operand_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy) in the dtypes of x, y; the dot runs on ``operand_dtype`` operands (fp32 for fp16).
    Cosine mode (y is x): dL/dx = dx + dy = 2·dx since s is symmetric; dy is then empty."""
    B, N, D = x.shape
    cfg = _dot_bwd_config(N, D, operand_dtype, launch_device_type(x))
    out_dtypes = (x.dtype, y.dtype)
    x, y = _operands(x, y, mode, torch.float32 if operand_dtype == torch.float16 else operand_dtype)
    coef = _coefficients(grad, counts, compute_dtype(x))
    lab = _flat_labels(labels)
    grid = (B, triton.cdiv(N, cfg["BLOCK_I"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    meta = dict(MODE=mode, ACC=acc_type(x.dtype), IGNORE_DIAG=ignore_diagonal, **cfg)
    cosine = mode == MODE_COSINE
    dx = torch.empty(B, N, D, dtype=compute_dtype(x), device=x.device)
    launch(_dot_loss_bwd_kernel, grid, scores, y, lab, coef, dx, N, D, N, 1, float(scale) * (2 if cosine else 1),
           ignore_index, **meta)
    if cosine:
        return dx.to(out_dtypes[0]), y.new_empty(0, dtype=out_dtypes[1])
    dy = torch.empty_like(dx)
    launch(_dot_loss_bwd_kernel, grid, scores, x, lab, coef, dy, N, D, 1, N, float(scale), ignore_index, **meta)
    return dx.to(out_dtypes[0]), dy.to(out_dtypes[1])


@torch.library.custom_op("wsss_kernels::dot_affinity_loss", mutates_args=())
def _dot_loss_op(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, mode: int, ignore_index: int,
                 ignore_diagonal: bool, scale: float, save_scores: bool,
                 operand_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dot_loss_forward(x, y, labels, mode, ignore_index, ignore_diagonal, scale, save_scores, operand_dtype)


@_dot_loss_op.register_fake
def _(x, y, labels, mode, ignore_index, ignore_diagonal, scale, save_scores, operand_dtype):
    B, N, _ = x.shape
    ct = compute_dtype(x)
    return (x.new_empty((), dtype=ct), x.new_empty(2, dtype=torch.long),
            x.new_empty((B, N, N) if save_scores else (0,), dtype=ct))


@torch.library.custom_op("wsss_kernels::dot_affinity_loss_backward", mutates_args=())
def _dot_loss_bwd_op(grad: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, labels: torch.Tensor, mode: int, ignore_index: int, ignore_diagonal: bool,
                     scale: float, operand_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return _dot_loss_backward(grad, counts, scores, x, y, labels, mode, ignore_index, ignore_diagonal, scale,
                              operand_dtype)


@_dot_loss_bwd_op.register_fake
def _(grad, counts, scores, x, y, labels, mode, ignore_index, ignore_diagonal, scale, operand_dtype):
    return torch.empty_like(x), (y.new_empty(0) if mode == MODE_COSINE else torch.empty_like(y))


def _dot_setup(ctx, inputs, output):
    x, y, labels, mode, ignore_index, ignore_diagonal, scale, save_scores, operand_dtype = inputs
    ctx.save_for_backward(x, y, labels, output[1], output[2])
    ctx.options = (mode, ignore_index, ignore_diagonal, scale, operand_dtype)
    ctx.scores_saved = save_scores


def _dot_backward(ctx, grad_loss, _grad_counts, _grad_scores):
    x, y, labels, counts, scores = ctx.saved_tensors
    if not ctx.scores_saved:
        raise RuntimeError("dot_affinity_loss was run with save_scores=False; its backward needs the scores")
    dx, dy = _dot_loss_bwd_op(grad_loss, counts, scores, x, y, labels, *ctx.options)
    if ctx.options[0] == MODE_COSINE:  # x and y are one tensor: dx holds its whole gradient
        dy = None
    return dx, dy, None, None, None, None, None, None, None


_dot_loss_op.register_autograd(_dot_backward, setup_context=_dot_setup)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------
def _check_token_labels(labels, B: int, N: int, ignore_index: int, what: str) -> None:
    check_labels("labels", labels, ignore_index)
    if labels.shape[0] != B or labels.shape[1] * labels.shape[2] != N:
        raise ValueError(f"labels must be (B,h,w) with B={B} and h·w={N} ({what}), got shape {tuple(labels.shape)}")


def masked_cosine_affinity_loss(features: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                impl: str = "auto") -> torch.Tensor:
    """ToCo/MoRe ptc loss (SPEC §3.2) on (B,D,h,w) features with pairs from ``labels`` (B,h,w).

    Differentiable w.r.t. ``features``; fp32 result (float64 for float64 features)."""
    check_tensor("features", features, 4, floating=True)
    check_labels("labels", labels, ignore_index)
    if tuple(labels.shape) != (features.shape[0], *features.shape[-2:]):
        raise ValueError(f"labels must be (B,h,w)={(features.shape[0], *features.shape[-2:])}, "
                         f"got {tuple(labels.shape)}")
    check_same_device(features=features, labels=labels)
    if min(features.shape) < 1:
        raise ValueError(f"features must not be empty, got shape {tuple(features.shape)}")
    if resolve_impl(impl, "masked_cosine_affinity_loss", features, labels) == "reference":
        return masked_cosine_affinity_loss_reference(features, labels, ignore_index)
    # normalised in fp32 (float64); the kernels multiply half features' cosines as half operands
    f = F.normalize(features.to(compute_dtype(features)).flatten(2), dim=1, eps=COS_EPS).transpose(1, 2)
    f = f.contiguous()
    save = torch.is_grad_enabled() and features.requires_grad
    return _dot_loss_op(f, f, labels, MODE_COSINE, ignore_index, True, 1.0, save, features.dtype)[0]


def masked_sigmoid_affinity_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                 ignore_diagonal: bool = False, impl: str = "auto") -> torch.Tensor:
    """AReAM affinity loss (SPEC §5) on head-averaged pre-softmax logits (B,N,N) between patches.

    ``labels`` (B,h,w) at token resolution, h·w = N. Differentiable w.r.t. ``logits``."""
    check_tensor("logits", logits, 3, floating=True)
    if logits.shape[1] != logits.shape[2] or min(logits.shape) < 1:
        raise ValueError(f"logits must be a non-empty (B,N,N) tensor, got shape {tuple(logits.shape)}")
    _check_token_labels(labels, logits.shape[0], logits.shape[1], ignore_index, "N from logits")
    check_same_device(logits=logits, labels=labels)
    if resolve_impl(impl, "masked_sigmoid_affinity_loss", logits, labels) == "reference":
        return masked_sigmoid_affinity_loss_reference(logits, labels, ignore_index, ignore_diagonal)
    return _sigmoid_loss_op(logits, labels, ignore_index, bool(ignore_diagonal))[0]


def masked_sigmoid_affinity_loss_qk(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                    ignore_diagonal: bool = False, scale: Optional[float] = None,
                                    impl: str = "auto") -> torch.Tensor:
    """``masked_sigmoid_affinity_loss`` on the head-mean logits ``mean_h(scale·q_h k_hᵀ)`` of one layer.

    ``q``, ``k`` (B,Hd,N,dh) are the patch-token queries/keys; ``scale`` is the attention scale
    (default 1/√dh). The head mean equals ``Q·Kᵀ·scale/Hd`` over the concatenated head dims,
    which the Triton path computes tile by tile; it holds an N×N matrix only when a gradient is
    needed (the (B,N,N) fp32 logits its backward reads; the reference holds (B,Hd,N,N)).
    Differentiable w.r.t. ``q`` and ``k``."""
    check_tensor("q", q, 4, floating=True)
    check_tensor("k", k, 4, floating=True)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same (B,Hd,N,dh) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if min(q.shape) < 1:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    B, Hd, N, dh = q.shape
    _check_token_labels(labels, B, N, ignore_index, "N from q")
    check_same_device(q=q, k=k, labels=labels)
    scale = dh ** -0.5 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if resolve_impl(impl, "masked_sigmoid_affinity_loss_qk", q, k, labels) == "reference":
        return masked_sigmoid_affinity_loss_qk_reference(q, k, labels, ignore_index, ignore_diagonal, scale)
    # heads concatenated along the feature dim, in the input dtype (half q, k multiply as half)
    qc = q.transpose(1, 2).reshape(B, N, Hd * dh).contiguous()
    kc = k.transpose(1, 2).reshape(B, N, Hd * dh).contiguous()
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return _dot_loss_op(qc, kc, labels, MODE_SIGMOID, ignore_index, bool(ignore_diagonal), float(scale) / Hd, save,
                        q.dtype)[0]
