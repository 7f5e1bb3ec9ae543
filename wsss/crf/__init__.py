"""Dense CRF inference and the permutohedral-lattice Gaussian filter (SPEC §6).

Public entry points validate their inputs and call the compiled ops of ``wsss._C`` (CPU, and
CUDA when the extension was built with a toolkit):

- :func:`dense_crf` — one image as NumPy arrays, pydensecrf's parameters and semantics;
- :func:`dense_crf_batch` — a batch of tensors (B,3,H,W) uint8 + (B,K,H,W), on CPU or CUDA;
- :func:`dense_crf_many` — a list of differently sized images, optionally on worker threads;
- :func:`permutohedral_filter` — the lattice filter itself, differentiable w.r.t. the values.

The regularized loss built on the same lattice is :class:`wsss.crf.energy.DenseEnergyLoss`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch

from wsss.crf._ext import ops
from wsss.crf.energy import DenseEnergyLoss

__all__ = ["dense_crf", "dense_crf_batch", "dense_crf_many", "permutohedral_filter", "DenseEnergyLoss",
           "MAX_FEATURE_DIM", "MAX_POINTS"]

MAX_FEATURE_DIM = 16  # kMaxFeatureDim in csrc/cpu/lattice_embed.h
# kMaxLatticePoints in csrc/cpu/lattice_build.h: points (pixels) per lattice.
MAX_POINTS = 2**26
# Lattice keys are int32: |feature| · (d+1)² stays far below 2^31 under this bound.
_MAX_ABS_FEATURE = 1e6


def _check_params(num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w) -> None:
    if isinstance(num_iter, bool) or not isinstance(num_iter, Integral) or num_iter < 0:
        raise ValueError(f"num_iter must be an integer >= 0, got {num_iter!r}")
    for name, value in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std)):
        if not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("pos_w", pos_w), ("bi_w", bi_w)):
        if not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_probs_values(name: str, probs: torch.Tensor) -> None:
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} must be >= 0, found minimum {float(probs.min())}")


def dense_crf(image_uint8_hw3: np.ndarray, probs_khw: np.ndarray, num_iter: int = 10, pos_xy_std: float = 1,
              pos_w: float = 3, bi_xy_std: float = 67, bi_rgb_std: float = 3, bi_w: float = 4) -> np.ndarray:
    """Fully connected CRF mean-field inference on one image (SPEC §6.3; defaults: §4).

    Same model as pydensecrf's ``DenseCRF2D`` with ``setUnaryEnergy(unary_from_softmax(probs))``,
    ``addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)``,
    ``addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)`` and
    ``inference(num_iter)``.

    Args:
        image_uint8_hw3: (H,W,3) uint8 RGB image.
        probs_khw: (K,H,W) class probabilities (float, finite, >= 0); the unary is
            ``-log(clip(p, 1e-5, 1))``.
    Returns:
        Q, (K,H,W) float32 NumPy array of marginals.
    """
    return _dense_crf_numpy(image_uint8_hw3, probs_khw, num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w)


def _dense_crf_numpy(image_uint8_hw3, probs_khw, num_iter=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3,
                     bi_w=4, num_threads=0) -> np.ndarray:
    if not isinstance(image_uint8_hw3, np.ndarray):
        raise TypeError(f"image_uint8_hw3 must be a NumPy array, got {type(image_uint8_hw3).__name__} "
                        "(use dense_crf_batch for tensors)")
    if not isinstance(probs_khw, np.ndarray):
        raise TypeError(f"probs_khw must be a NumPy array, got {type(probs_khw).__name__}")
    if image_uint8_hw3.dtype != np.uint8:
        raise TypeError(f"image_uint8_hw3 must have dtype uint8, got {image_uint8_hw3.dtype}")
    if image_uint8_hw3.ndim != 3 or image_uint8_hw3.shape[2] != 3:
        raise ValueError(f"image_uint8_hw3 must be (H,W,3), got shape {image_uint8_hw3.shape}")
    if not np.issubdtype(probs_khw.dtype, np.floating):
        raise TypeError(f"probs_khw must be a floating array, got dtype {probs_khw.dtype}")
    if probs_khw.ndim != 3 or probs_khw.shape[1:] != image_uint8_hw3.shape[:2] or probs_khw.shape[0] < 1:
        raise ValueError(f"probs_khw must be (K,H,W) with (H,W)={image_uint8_hw3.shape[:2]} and K >= 1, "
                         f"got shape {probs_khw.shape}")
    image = torch.from_numpy(np.ascontiguousarray(image_uint8_hw3.transpose(2, 0, 1)))[None]
    probs = torch.from_numpy(np.ascontiguousarray(probs_khw, dtype=np.float32))[None]
    out = dense_crf_batch(image, probs, num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w, num_threads)
    return out[0].numpy()


def dense_crf_batch(images: torch.Tensor, probs: torch.Tensor, num_iter: int = 10, pos_xy_std: float = 1,
                    pos_w: float = 3, bi_xy_std: float = 67, bi_rgb_std: float = 3, bi_w: float = 4,
                    num_threads: int = 0) -> torch.Tensor:
    """Batched :func:`dense_crf` on tensors: ``images`` (B,3,H,W) uint8, ``probs`` (B,K,H,W) float,
    on the same device (CPU, or CUDA when built). Returns Q (B,K,H,W) float32 on that device.
    ``num_threads`` bounds the CPU threads (0: ``torch.get_num_threads()``)."""
    if not isinstance(images, torch.Tensor) or not isinstance(probs, torch.Tensor):
        raise TypeError("images and probs must be tensors")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must have dtype uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got shape {tuple(images.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
    if probs.dim() != 4 or probs.shape[0] != images.shape[0] or probs.shape[2:] != images.shape[2:] \
            or probs.shape[1] < 1:
        raise ValueError(f"probs must be (B,K,H,W) matching images {tuple(images.shape)} with K >= 1, "
                         f"got shape {tuple(probs.shape)}")
    if probs.device != images.device:
        raise ValueError(f"images ({images.device}) and probs ({probs.device}) must be on the same device")
    if images.shape[2] * images.shape[3] > MAX_POINTS:
        raise ValueError(f"images may have at most {MAX_POINTS} pixels, got {images.shape[2]}x{images.shape[3]}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, Integral) or num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0, got {num_threads!r}")
    _check_params(num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w)
    _check_probs_values("probs", probs)
    return ops().dense_crf(images.contiguous(), probs.float().contiguous(), int(num_iter), float(pos_xy_std),
                           float(pos_w), float(bi_xy_std), float(bi_rgb_std), float(bi_w), int(num_threads))


def dense_crf_many(images: Sequence[np.ndarray], probs: Sequence[np.ndarray], num_workers: int = 1,
                   **params) -> list[np.ndarray]:
    """:func:`dense_crf` over lists of (H,W,3) images and (K,H,W) probabilities of any sizes.

    With ``num_workers > 1`` images run concurrently on threads (the op releases the GIL), each
    with ``torch.get_num_threads() // num_workers`` CPU threads (at least 1)."""
    if len(images) != len(probs):
        raise ValueError(f"images and probs must have the same length, got {len(images)} and {len(probs)}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, Integral) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    unknown = set(params) - {"num_iter", "pos_xy_std", "pos_w", "bi_xy_std", "bi_rgb_std", "bi_w"}
    if unknown:
        raise TypeError(f"unknown dense_crf parameters {sorted(unknown)}")
    if num_workers == 1 or len(images) <= 1:
        return [dense_crf(im, p, **params) for im, p in zip(images, probs)]
    threads = max(1, torch.get_num_threads() // num_workers)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(lambda pair: _dense_crf_numpy(*pair, num_threads=threads, **params),
                             zip(images, probs)))


def permutohedral_filter(features: torch.Tensor, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Gaussian filter of ``values`` over ``features`` on the permutohedral lattice (SPEC §6.2).

    Computes ≈ Σ_j k(f_i, f_j) v_j with k the lattice's approximation of exp(-½‖f_i − f_j‖²)
    (unnormalised, self term included; scale features by 1/σ beforehand). ``features`` (N,d) or
    (B,N,d), 1 <= d <= 16, N <= 2**26; ``values`` (N,C) or (B,N,C) on the same device. float32
    and float64 run natively, half precision in float32. Differentiable w.r.t. ``values`` (the
    adjoint is ``transpose=True``); ``features`` get no gradient.
    """
    if not isinstance(features, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError("features and values must be tensors")
    if not features.is_floating_point() or not values.is_floating_point():
        raise TypeError(f"features and values must be floating tensors, got {features.dtype} and {values.dtype}")
    if features.dim() not in (2, 3) or values.dim() != features.dim():
        raise ValueError(f"features (N,d)/(B,N,d) and values (N,C)/(B,N,C) expected, got "
                         f"{tuple(features.shape)} and {tuple(values.shape)}")
    if features.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"features {tuple(features.shape)} and values {tuple(values.shape)} must agree on "
                         "all but the last dimension")
    d = features.shape[-1]
    if not 1 <= d <= MAX_FEATURE_DIM:
        raise ValueError(f"features must have 1..{MAX_FEATURE_DIM} channels, got {d}")
    if features.device != values.device:
        raise ValueError(f"features ({features.device}) and values ({values.device}) must be on the same device")
    if features.shape[-2] > MAX_POINTS:
        raise ValueError(f"features may have at most {MAX_POINTS} points, got {features.shape[-2]}")
    if features.numel() and not bool((features.abs() <= _MAX_ABS_FEATURE).all()):
        raise ValueError(f"features must be finite with |f| <= {_MAX_ABS_FEATURE:g} (scale them by 1/sigma)")
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    squeeze = features.dim() == 2
    f = features.detach().to(dtype).contiguous()
    v = values.to(dtype).contiguous()
    if squeeze:
        f, v = f[None], v[None]
    out = ops().permutohedral_filter(f, v, bool(transpose))
    out = out[0] if squeeze else out
    return out.to(values.dtype)
