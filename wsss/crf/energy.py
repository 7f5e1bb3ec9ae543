"""Regularized (dense CRF) loss of Tang et al. 2018 as MoRe uses it (SPEC §6.1).

``DenseEnergyLoss`` runs on CPU and CUDA tensors without moving data between devices: the
bilateral filter is the permutohedral-lattice op of ``wsss._C`` on the tensors' device. Inside
autocast the loss is computed in float32 (float64 inputs stay float64, which the tests use).

The gradient is rloss's: ``-2 · weight · R ⊙ G ⊙ (W S) / B`` w.r.t. the (downscaled) soft
segmentation S, with the gate G treated as a constant (SPEC §6.1 step 5); autograd carries it
through the bilinear downscale and the softmax back to the logits. It equals the derivative of
the forward only when G is constant and W symmetric; the lattice W is slightly asymmetric
(its d+1 blur passes do not commute), see ``tests/test_energy_loss.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss.crf._ext import ops

__all__ = ["DenseEnergyLoss", "dense_energy_loss_reference", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _DenseEnergyFunction(torch.autograd.Function):
    """loss = -(weight / B) Σ S ⊙ G ⊙ (W S); grad_S = -2 (weight / B) G ⊙ (W S). G is constant."""

    @staticmethod
    def forward(ctx, seg, features, gate, weight):
        B, K, h, w = seg.shape
        values = seg.detach().permute(0, 2, 3, 1).reshape(B, h * w, K).contiguous()
        filtered = ops().permutohedral_filter(features, values, False)
        gated = filtered.reshape(B, h, w, K).permute(0, 3, 1, 2) * gate.unsqueeze(1)
        ctx.save_for_backward(gated)
        ctx.scale = weight / B
        return -(seg.detach() * gated).sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_output):
        (gated,) = ctx.saved_tensors
        return -2.0 * ctx.scale * grad_output * gated, None, None, None


def _check_inputs(images, seg_logits, label, roi):
    for name, t in (("images", images), ("seg_logits", seg_logits), ("label", label)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got shape {tuple(images.shape)}")
    if seg_logits.dim() != 4 or seg_logits.shape[0] != images.shape[0] or seg_logits.shape[2:] != images.shape[2:]:
        raise ValueError(f"seg_logits must be (B,K,H,W) matching images {tuple(images.shape)}, "
                         f"got shape {tuple(seg_logits.shape)}")
    if label.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"label must be (B,H,W)={(images.shape[0], *images.shape[2:])}, got shape {tuple(label.shape)}")
    if not images.is_floating_point() or not seg_logits.is_floating_point():
        raise TypeError(f"images and seg_logits must be floating tensors, got {images.dtype} and {seg_logits.dtype}")
    if label.is_complex() or label.dtype == torch.bool:
        raise TypeError(f"label must be a real-valued tensor of class indices, got {label.dtype}")
    if roi is not None:
        if not isinstance(roi, torch.Tensor):
            raise TypeError(f"roi must be a tensor or None, got {type(roi).__name__}")
        if roi.shape != label.shape:
            raise ValueError(f"roi must be (B,H,W)={tuple(label.shape)}, got shape {tuple(roi.shape)}")
    devices = {t.device for t in (images, seg_logits, label) + ((roi,) if roi is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"images, seg_logits, label and roi must be on one device, got {sorted(map(str, devices))}")


def _prepare(images, seg_logits, label, roi, sigma_rgb, sigma_xy, scale_factor, ignore_index, mean, std):
    """SPEC §6.1 steps 1-3: (S·R, lattice features, gate) at the downscaled resolution."""
    dtype = torch.float64 if seg_logits.dtype == torch.float64 else torch.float32
    seg = torch.softmax(seg_logits.to(dtype), dim=1)
    x = images.to(dtype)
    image = torch.stack([x[:, c] * (255.0 * std[c]) + 255.0 * mean[c] for c in range(3)], dim=1)
    roi = torch.ones_like(label, dtype=dtype) if roi is None else roi.to(dtype)
    lab = label.to(dtype)
    if scale_factor != 1.0:
        image = F.interpolate(image, scale_factor=scale_factor, mode="nearest")
        seg = F.interpolate(seg, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        roi = F.interpolate(roi.unsqueeze(1), scale_factor=scale_factor, mode="nearest").squeeze(1)
        lab = F.interpolate(lab.unsqueeze(1), scale_factor=scale_factor, mode="nearest").squeeze(1)
    B, K, h, w = seg.shape
    with torch.no_grad():
        gate = roi - seg.max(dim=1).values
        gate = torch.where(lab.long() == ignore_index, torch.ones_like(gate), gate).clamp_min(0)
        sxy = sigma_xy * scale_factor
        ys = torch.arange(h, device=seg.device, dtype=dtype).view(h, 1).expand(h, w) / sxy
        xs = torch.arange(w, device=seg.device, dtype=dtype).view(1, w).expand(h, w) / sxy
        xy = torch.stack([xs, ys], dim=-1).expand(B, h, w, 2)
        rgb = image.permute(0, 2, 3, 1) / sigma_rgb
        features = torch.cat([xy, rgb], dim=-1).reshape(B, h * w, 5).contiguous()
    return seg * roi.unsqueeze(1), features, gate


class DenseEnergyLoss(nn.Module):
    """Regularized loss (SPEC §6.1): ``weight · (-(1/B) Σ S ⊙ G ⊙ W S)`` at ``scale_factor``.

    Args:
        weight: multiplies the loss inside the module (MoRe: 1e-7); the trainer's ``w_reg``
            multiplies the module's output on top.
        sigma_rgb, sigma_xy: bilateral kernel widths (colour in 0..255, xy in pixels at full
            resolution; sigma_xy is scaled by ``scale_factor`` with the images).
        scale_factor: images, segmentation, roi and label are downscaled by this factor first.
        ignore_index: label value whose pixels get gate 1.
        mean, std: the normalisation of ``images`` (in [0,1] units; ×255 inside).

    ``forward(images_normalised (B,3,H,W), seg_logits (B,K,H,W), label (B,H,W), roi=None)``
    applies softmax to the logits and returns a scalar with the gradient w.r.t. the logits.
    """

    def __init__(self, weight: float = 1e-7, sigma_rgb: float = 15.0, sigma_xy: float = 100.0,
                 scale_factor: float = 0.5, ignore_index: int = 255, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        for name, value in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale_factor", scale_factor)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 entries, got {mean!r} and {std!r}")
        self.weight = float(weight)
        self.sigma_rgb = float(sigma_rgb)
        self.sigma_xy = float(sigma_xy)
        self.scale_factor = float(scale_factor)
        self.ignore_index = int(ignore_index)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
                f"scale_factor={self.scale_factor}")

    def forward(self, images: torch.Tensor, seg_logits: torch.Tensor, label: torch.Tensor,
                roi: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(images, seg_logits, label, roi)
        with torch.autocast(device_type=seg_logits.device.type, enabled=False):
            seg, features, gate = _prepare(images, seg_logits, label, roi, self.sigma_rgb, self.sigma_xy,
                                           self.scale_factor, self.ignore_index, self.mean, self.std)
            return _DenseEnergyFunction.apply(seg, features, gate, self.weight)


def dense_energy_loss_reference(images, seg_logits, label, roi=None, weight=1e-7, sigma_rgb=15.0, sigma_xy=100.0,
                                scale_factor=0.5, ignore_index=255, filter_fn=None):
    """Plain-PyTorch statement of SPEC §6.1 for small inputs, with rloss's gradient.

    ``filter_fn(features (N,5), values (N,K)) -> (N,K)`` defaults to the NumPy lattice
    reference. The gradient comes from ``(2S - S.detach()) · const``, whose value is S · const and
    whose derivative is 2 · const, the rloss gradient.
    """
    from wsss.crf.lattice_reference import permutohedral_filter_reference

    if filter_fn is None:
        def filter_fn(f, v):
            out = permutohedral_filter_reference(f.detach().cpu().numpy(), v.detach().cpu().numpy())
            return torch.from_numpy(out).to(v)
    _check_inputs(images, seg_logits, label, roi)
    seg, features, gate = _prepare(images, seg_logits, label, roi, sigma_rgb, sigma_xy, scale_factor, ignore_index,
                                   IMAGENET_MEAN, IMAGENET_STD)
    B, K, h, w = seg.shape
    filtered = torch.stack([filter_fn(features[b], seg[b].detach().reshape(K, -1).t()).t().reshape(K, h, w)
                            for b in range(B)])
    gated = (filtered * gate.unsqueeze(1)).detach()
    return -((2 * seg - seg.detach()) * gated).sum() * (weight / B)
