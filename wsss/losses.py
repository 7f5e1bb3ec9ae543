"""Training losses (SPEC §3.6). The fused affinity losses live in ``wsss.kernels``.

Every loss here is finite on degenerate batches (all ignore, no foreground or background,
no class present): it is then zero and still connected to its inputs' graph.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from wsss.crf.energy import DenseEnergyLoss  # noqa: F401  (the regularized loss, SPEC §6.1; C++/CUDA)


def _check_label(name: str, label: torch.Tensor, num_classes: int, ignore_index: int,
                 check_range: bool = True) -> None:
    """dtype always; with ``check_range`` also the values, which reads the tensor back (a host sync):
    callers whose labels are in range by construction (the training objectives' pseudo labels)
    pass ``check_labels=False`` to the losses."""
    if label.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise TypeError(f"{name} must be an integer tensor, got {label.dtype}")
    if not check_range:
        return
    bad = (label < 0) | ((label >= num_classes) & (label != ignore_index))
    if bool(bad.any()):
        values = torch.unique(label[bad])[:8].tolist()
        raise ValueError(f"{name} holds values {values} outside 0..{num_classes - 1} and {ignore_index}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses compute in fp32 under AMP; float64 stays float64 (gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _autocast_off(loss):
    """Run ``loss`` with autocast disabled on its first tensor's device: after ``_at_least_fp32``
    its matmuls and reductions then stay fp32 also when a caller computes it inside autocast
    (autocast would otherwise run ``t @ F`` in bf16/fp16)."""
    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        with torch.autocast(device_type=first.device.type, enabled=False):
            return loss(*args, **kwargs)
    return wrapper


@_autocast_off
def classification_loss(logits: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss on (B,C) logits against (B,C) 0/1 image labels."""
    if logits.shape != cls_label.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and cls_label {tuple(cls_label.shape)} differ")
    return F.multilabel_soft_margin_loss(_at_least_fp32(logits), cls_label.to(_at_least_fp32(logits).dtype))


@_autocast_off
def seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255, *,
             check_labels: bool = True) -> torch.Tensor:
    """Background/foreground-balanced cross-entropy (SPEC §3.6 L_seg).

    ``logits`` (B,K,H,W) at the label's resolution (the caller upsamples), ``label`` (B,H,W).
    Each part is ``sum / (count + 1e-6)``, so an all-ignore crop gives 0, not NaN.
    ``check_labels=False`` skips the label-range check (a host sync) for labels in range by
    construction.
    """
    if logits.dim() != 4 or label.dim() != 3 or logits.shape[0] != label.shape[0] \
            or logits.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"logits (B,K,H,W) and label (B,H,W) must match, got {tuple(logits.shape)} "
                         f"and {tuple(label.shape)}")
    _check_label("label", label, logits.shape[1], ignore_index, check_labels)
    label = label.long()
    ce = F.cross_entropy(_at_least_fp32(logits), label, ignore_index=ignore_index, reduction="none")
    bg = (label == 0).float()
    fg = ((label > 0) & (label != ignore_index)).float()
    bg_loss = (ce * bg).sum() / (bg.sum() + 1e-6)
    fg_loss = (ce * fg).sum() / (fg.sum() + 1e-6)
    return 0.5 * (bg_loss + fg_loss)


@_autocast_off
def token_regularization_loss(class_tokens: torch.Tensor, temp: float = 0.07) -> torch.Tensor:
    """Class-token contrast (SPEC §3.6 L_tok): each L2-normalised class token must be closest
    to itself among the image's class tokens; CE over ``t tᵀ / temp``, mean over B·C."""
    if class_tokens.dim() != 3:
        raise ValueError(f"class_tokens must be (B,C,D), got {tuple(class_tokens.shape)}")
    B, C, _ = class_tokens.shape
    t = F.normalize(_at_least_fp32(class_tokens), dim=-1)
    logits = t @ t.transpose(1, 2) / temp
    target = torch.arange(C, device=t.device).expand(B, C)
    return F.cross_entropy(logits.reshape(B * C, C), target.reshape(-1))


def _check_token_inputs(class_tokens, patch_features, label, cls_label, check_labels: bool = True):
    if class_tokens.dim() != 3 or patch_features.dim() != 4:
        raise ValueError(f"class_tokens (B,C,D) and patch_features (B,D,h,w) expected, got "
                         f"{tuple(class_tokens.shape)} and {tuple(patch_features.shape)}")
    B, C, D = class_tokens.shape
    if patch_features.shape[:2] != (B, D):
        raise ValueError(f"patch_features must be (B={B},D={D},h,w), got {tuple(patch_features.shape)}")
    if label.shape != (B, *patch_features.shape[-2:]):
        raise ValueError(f"label must be (B,h,w)={(B, *patch_features.shape[-2:])}, got {tuple(label.shape)}")
    if cls_label.shape != (B, C):
        raise ValueError(f"cls_label must be (B,C)={(B, C)}, got {tuple(cls_label.shape)}")
    _check_label("label", label, C + 1, 255, check_labels)


@_autocast_off
def cle_loss(class_tokens: torch.Tensor, patch_features: torch.Tensor, label: torch.Tensor,
             cls_label: torch.Tensor, temp: float = 0.5, *, check_labels: bool = True) -> torch.Tensor:
    """Confident localisation loss (MoRe "CRELoss", SPEC §3.6 L_cle).

    For each present class c, the softmax over tokens of ``t̂_c · F_n / temp`` is pushed up on
    the tokens labelled c. ``ℓ_n = −log(e_n / (Σ e + 1e-4))`` is computed in log space, which
    equals the official exp form wherever that is finite and does not overflow for large
    feature norms. ``label`` (B,h,w): classes 1..C, 0 background, 255 ignore;
    ``check_labels=False`` skips its range check (a host sync).
    """
    _check_token_inputs(class_tokens, patch_features, label, cls_label, check_labels)
    B, C, _ = class_tokens.shape
    t = F.normalize(_at_least_fp32(class_tokens), dim=-1)
    feats = _at_least_fp32(patch_features.detach()).flatten(2)  # (B,D,N), not normalised
    s = t @ feats / temp  # (B,C,N)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    log_denominator = torch.logaddexp(lse, torch.full_like(lse, math.log(1e-4)))
    nll = log_denominator - s
    # Official fallback when Σe underflows to 0: ℓ = −log(1 / (1 + 1e-4)).
    nll = torch.where(lse < math.log(torch.finfo(s.dtype).tiny), torch.full_like(nll, math.log1p(1e-4)), nll)
    classes = torch.arange(1, C + 1, device=label.device).view(1, C, 1)
    mask = (label.flatten(1).unsqueeze(1) == classes).to(s.dtype)  # (B,C,N)
    per_class = (mask * nll).sum(-1) / (mask.sum(-1) + 1e-4)
    return (per_class * (cls_label > 0).to(s.dtype)).sum(1).mean()


UNE_BORDER = 3  # the inner region drops 3 tokens on every side (official code)
UNE_WINDOW = 6  # 6×6 window whose mean ROI value decides "uncertain next to foreground"
UNE_MIN_MEAN = 1.2
UNE_SAMPLES = 8


def une_candidates(label: torch.Tensor, ignore_index: int = 255):
    """Per image, the relative (i,j) positions UNE may sample (SPEC §3.6 L_une).

    Returns ``(kept, foreground, inner_shape)``: ``kept`` (B,h',w') bool marks uncertain cells
    of the inner region whose 6×6 window ``ROI[i:i+6, j:j+6]`` has mean ≥ 1.2; ``foreground``
    marks inner cells with ROI 2. ROI = 1 on ignore, 2 on foreground, 0 elsewhere.
    """
    B, h, w = label.shape
    hi, wi = h - 2 * UNE_BORDER, w - 2 * UNE_BORDER
    if hi <= 0 or wi <= 0:
        empty = torch.zeros(B, max(hi, 0), max(wi, 0), dtype=torch.bool, device=label.device)
        return empty, empty, (max(hi, 0), max(wi, 0))
    ignored = label == ignore_index
    roi = torch.where(ignored, 1.0, torch.where(label >= 1, 2.0, 0.0))
    inner = roi[:, UNE_BORDER:h - UNE_BORDER, UNE_BORDER:w - UNE_BORDER]
    window_mean = F.avg_pool2d(roi[:, None], UNE_WINDOW, stride=1)[:, 0, :hi, :wi]
    kept = (inner == 1) & (window_mean >= UNE_MIN_MEAN)
    return kept, inner == 2, (hi, wi)


def _random_members(member: torch.Tensor, k: int, generator) -> torch.Tensor:
    """(B,k) indices of up to ``k`` distinct members of each row of ``member`` (B,M) bool, drawn
    uniformly without replacement (the k largest of i.i.d. uniform keys), and -1 where a row has
    fewer members. Everything stays on the device: no count is read back."""
    keys = torch.rand(member.shape, generator=generator, device=generator.device if generator is not None
                      else member.device)
    keys = keys.to(member.device).masked_fill(~member, -1.0)
    top, idx = keys.topk(min(k, member.shape[1]), dim=1)
    return idx.masked_fill(top < 0, -1)


def une_sample(label: torch.Tensor, generator: torch.Generator = None, ignore_index: int = 255):
    """The UNE sampling rule (SPEC §3.6 L_une) for the whole batch on the device.

    Returns ``(index, valid)``, each (B,S) with S ≤ 8 + 2: flat token indices into h·w (the relative inner
    (i,j) used as an absolute position — the official quirk) and which slots hold a sample.
    Per image: more than 8 kept cells → 8 of them at random; otherwise all kept plus
    ``(8 − kept)//4`` random foreground cells of the inner region (from the whole inner region
    when it has fewer foreground cells than that). ``generator`` (on the label's device, or
    CPU) draws the random keys; the same seed gives the same samples.
    """
    B, h, w = label.shape
    kept, fg, (hi, wi) = une_candidates(label, ignore_index)
    extra_max = UNE_SAMPLES // 4
    if hi == 0 or wi == 0:
        empty = torch.zeros(B, 0, dtype=torch.long, device=label.device)
        return empty, empty.bool()
    kept, fg = kept.flatten(1), fg.flatten(1)
    n_kept = kept.sum(1, keepdim=True)
    extra = torch.where(n_kept > UNE_SAMPLES, 0, (UNE_SAMPLES - n_kept) // 4)  # (B,1)
    pool = torch.where(fg.sum(1, keepdim=True) < extra, torch.ones_like(fg), fg)
    from_kept = _random_members(kept, UNE_SAMPLES, generator)  # all kept when ≤ 8
    from_pool = _random_members(pool, extra_max, generator)
    slot = torch.arange(from_pool.shape[1], device=label.device)
    from_pool = from_pool.masked_fill(slot >= extra, -1)
    rel = torch.cat([from_kept, from_pool], dim=1)
    valid = rel >= 0
    rel = rel.clamp_min(0)
    return (rel // wi) * w + rel % wi, valid


def une_select(label: torch.Tensor, generator: torch.Generator = None, ignore_index: int = 255):
    """Per image, the flat token indices :func:`une_sample` chooses (a list of 1-D tensors; for
    inspection and tests — reading the per-image counts back syncs with the device)."""
    index, valid = une_sample(label, generator, ignore_index)
    return [index[b][valid[b]] for b in range(label.shape[0])]


@_autocast_off
def une_loss(class_tokens: torch.Tensor, patch_features: torch.Tensor, label: torch.Tensor,
             cls_label: torch.Tensor, temp: float = 0.5, generator: torch.Generator = None, *,
             check_labels: bool = True) -> torch.Tensor:
    """Uncertain-region loss (MoRe "URELoss", SPEC §3.6 L_une), vectorised and seedable.

    Each selected feature ``u`` (normalised, with grad) against the normalised, detached class
    tokens: ``s = |u·t̂|``, term ``0.5(1 − Σ y s/(Σy+1)) + 0.5 Σ(1−y) s/(Σ(1−y)+1)``; mean over
    all selected features (:func:`une_sample`, one gather for the batch). ``temp`` is accepted
    for API symmetry with ``cle_loss``; the official loss does not use a temperature.
    ``check_labels=False`` skips the label-range check (a host sync).
    """
    _check_token_inputs(class_tokens, patch_features, label, cls_label, check_labels)
    feats = F.normalize(_at_least_fp32(patch_features), dim=1).flatten(2)  # (B,D,N)
    index, valid = une_sample(label, generator)
    if index.shape[1] == 0:  # no inner region: nothing to sample
        return feats.sum() * 0.0
    t = F.normalize(_at_least_fp32(class_tokens.detach()), dim=-1)
    y = (cls_label > 0).to(feats.dtype)[:, :, None]  # (B,C,1)
    u = feats.gather(2, index[:, None].expand(-1, feats.shape[1], -1))  # (B,D,S)
    s = (t @ u).abs()  # (B,C,S)
    pos = (s * y).sum(1) / (y.sum(1) + 1)
    neg = (s * (1 - y)).sum(1) / ((1 - y).sum(1) + 1)
    terms = (0.5 * (1 - pos) + 0.5 * neg) * valid
    return terms.sum() / valid.sum().clamp_min(1)
