"""Image normalisation and the training augmentations of SPEC §1.

The pipelines, all driven only by the ``np.random.Generator`` passed per call so that an
item's augmentation is a pure function of (seed, epoch, index):

- ``"more"`` (MoRe, default): random-resized crop to S×S (area scale [0.32, 1], aspect ratio
  3/4–4/3, bicubic), horizontal flip p=0.5, colour jitter with p=0.5 (brightness 0.4, contrast
  0.4, saturation 0.2, hue 0.1), normalise. The crop is always full: ``valid`` is all True.
- ``"toco"`` (ToCo): rescale by a random factor in [0.5, 2], flip, photometric distortion,
  normalise, random S×S crop padded with the mean colour (0 after normalisation); the padded
  area has ``valid=False`` and label ``ignore_index``.
- ``"timm"`` (AReAM, SPEC §5): timm's ImageNet training transform with the official arguments
  (:mod:`wsss.data.timm_transforms`; its global RNGs seeded from the per-item generator).
- ``"coco"`` (MoRe's COCO script, SPEC §3.0): colour jitter with p=0.8, rescale both sides by one
  factor in [0.32, 1] (bilinear), flip, random S×S crop padded with black (uint8 0, before the
  normalisation); the padding stays ``valid`` (the official loop passes no crop box), its label
  is ``ignore_index``.

A segmentation label, when given, undergoes the same geometry (nearest neighbour).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUG_MODES = ("more", "toco", "timm", "coco")
# SPEC §1: MoRe's random-resized crop and colour jitter.
RRC_AREA_SCALE = (0.32, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_P = 0.5
JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_SATURATION, JITTER_HUE = 0.4, 0.4, 0.2, 0.1
# SPEC §1: ToCo's rescale range; its photometric distortion uses the mmseg defaults below.
TOCO_SCALE_RANGE = (0.5, 2.0)
PHOTO_BRIGHTNESS_DELTA = 32.0
PHOTO_CONTRAST_RANGE = (0.5, 1.5)
PHOTO_SATURATION_RANGE = (0.5, 1.5)
PHOTO_HUE_DELTA = 18  # OpenCV hue units (0..180)
# SPEC §3.0: MoRe's COCO augmentation (same jitter strengths as §1, applied more often).
COCO_SCALE_RANGE = (0.32, 1.0)  # one rescale factor for both sides
COCO_JITTER_P = 0.8
COCO_PAD_VALUE = 0  # black, in uint8 space


def _check_image(img) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        raise ValueError(f"image must be a uint8 numpy array of shape (H, W, 3), got {desc}")
    return img


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 (H,W,3) RGB → float32 tensor (3,H,W): ``(x/255 − mean) / std`` (ImageNet)."""
    img = _check_image(img)
    if not (img.flags.writeable and img.flags.c_contiguous):
        img = np.array(img)  # torch.from_numpy wants a writeable array (PIL's are read-only)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _mean_std(dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std (3,1,1) on ``device``, copied there once: a host → device copy
    per call would block the host on every training step. Made outside inference mode, so a
    first call from an inference-mode evaluation does not cache tensors autograd refuses."""
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(3, 1, 1).to(device)
        std = torch.tensor(IMAGENET_STD, dtype=dtype).view(3, 1, 1).to(device)
    return mean, std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` for tensors (...,3,H,W): ``x·std + mean`` in [0,1] (SPEC §1).
    Keeps the device and dtype of ``x``."""
    if not torch.is_tensor(x) or x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be a tensor of shape (..., 3, H, W), got {getattr(x, 'shape', type(x))}")
    mean, std = _mean_std(x.dtype, x.device)
    return x * std + mean


def _label_to_pil(label, shape: Tuple[int, int]) -> Image.Image:
    label = np.asarray(label)
    if label.shape != shape:
        raise ValueError(f"label must have the image's shape {shape}, got {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(label), mode="L")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = RRC_AREA_SCALE,
                            ratio: Sequence[float] = RRC_RATIO) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction ``scale`` of the area with a random
    log-uniform aspect ratio; ten tries, then a centred crop with the ratio clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue adjustments in a random order (SPEC §1)."""
    b = rng.uniform(1 - JITTER_BRIGHTNESS, 1 + JITTER_BRIGHTNESS)
    c = rng.uniform(1 - JITTER_CONTRAST, 1 + JITTER_CONTRAST)
    s = rng.uniform(1 - JITTER_SATURATION, 1 + JITTER_SATURATION)
    h = rng.uniform(-JITTER_HUE, JITTER_HUE)
    ops = (lambda im: TF.adjust_brightness(im, b), lambda im: TF.adjust_contrast(im, c),
           lambda im: TF.adjust_saturation(im, s), lambda im: TF.adjust_hue(im, h))
    for i in rng.permutation(4):
        img = ops[i](img)
    return img


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ToCo's photometric distortion (mmseg style): each step with p=0.5 — brightness shift,
    contrast scale (before or after the HSV steps), saturation scale, hue shift."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-PHOTO_BRIGHTNESS_DELTA, PHOTO_BRIGHTNESS_DELTA), 0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(v):
        if rng.random() < 0.5:
            v = np.clip(v * rng.uniform(*PHOTO_CONTRAST_RANGE), 0, 255)
        return v

    if contrast_first:
        x = contrast(x)
    hsv = cv2.cvtColor(np.round(x).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*PHOTO_SATURATION_RANGE), 0, 255)
    if rng.random() < 0.5:
        hsv[..., 0] = np.mod(hsv[..., 0] + int(rng.integers(-PHOTO_HUE_DELTA, PHOTO_HUE_DELTA + 1)), 180)
    x = cv2.cvtColor(np.round(hsv).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        x = contrast(x)
    return np.round(x).astype(np.uint8)


class TrainTransform:
    """Training augmentation (SPEC §1); see the module docstring for the modes.

    ``scale_range`` is the crop's area fraction in mode ``"more"`` (default (0.32, 1.0)) and the
    rescale factor in modes ``"toco"`` (default (0.5, 2.0)) and ``"coco"`` (default (0.32, 1.0)).

    ``__call__(image, rng, label=None)`` takes a uint8 (H,W,3) RGB array and returns
    ``(image (3,S,S) float32 normalised, valid (S,S) bool, label (S,S) int64 or None)``.
    """

    def __init__(self, crop_size: int, mode: str = "more", scale_range: Optional[Sequence[float]] = None,
                 ignore_index: int = 255):
        if mode not in AUG_MODES:
            raise ValueError(f"mode must be one of {AUG_MODES}, got {mode!r}")
        if not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        if scale_range is None:
            scale_range = {"more": RRC_AREA_SCALE, "coco": COCO_SCALE_RANGE}.get(mode, TOCO_SCALE_RANGE)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi or (mode == "more" and hi > 1):
            limit = "(0, 1]" if mode == "more" else "(0, inf)"
            raise ValueError(f"scale_range must satisfy 0 < low <= high within {limit}, got {tuple(scale_range)}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must lie in 0..255, got {ignore_index}")
        self.crop_size = int(crop_size)
        self.mode = mode
        self.scale_range = (lo, hi)
        self.ignore_index = int(ignore_index)
        self._timm = None
        if mode == "timm":  # AReAM (SPEC §5): timm's ImageNet transform, seeded per item
            from .timm_transforms import TimmTrainTransform

            self._timm = TimmTrainTransform(self.crop_size)

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, mode={self.mode!r}, scale_range={self.scale_range})"

    def __call__(self, image: np.ndarray, rng: np.random.Generator, label=None):
        if self._timm is not None:
            return self._timm(image, rng, label)
        image = _check_image(image)
        lab = None if label is None else _label_to_pil(label, image.shape[:2])
        if self.mode == "more":
            return self._more(image, rng, lab)
        if self.mode == "coco":
            return self._coco(image, rng, lab)
        return self._toco(image, rng, lab)

    def _more(self, image, rng, lab):
        S = self.crop_size
        top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, self.scale_range)
        box = (left, top, left + w, top + h)
        img = Image.fromarray(image).resize((S, S), Image.BICUBIC, box=box)
        if lab is not None:
            lab = lab.resize((S, S), Image.NEAREST, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lab = None if lab is None else lab.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < JITTER_P:
            img = color_jitter(img, rng)
        x = normalize(np.asarray(img))
        valid = torch.ones(S, S, dtype=torch.bool)
        out_label = None if lab is None else torch.from_numpy(np.asarray(lab).astype(np.int64))
        return x, valid, out_label

    def _toco(self, image, rng, lab):
        S = self.crop_size
        H, W = image.shape[:2]
        r = rng.uniform(*self.scale_range)
        h, w = max(1, int(H * r + 0.5)), max(1, int(W * r + 0.5))
        img = Image.fromarray(image).resize((w, h), Image.BILINEAR)
        if lab is not None:
            lab = lab.resize((w, h), Image.NEAREST)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lab = None if lab is None else lab.transpose(Image.FLIP_LEFT_RIGHT)
        x = normalize(photometric_distortion(np.asarray(img), rng))
        # Place the image at a random offset in a canvas of at least S×S (mean colour = 0 after
        # normalisation, label ignore), then take a random S×S crop of the canvas.
        Hc, Wc = max(h, S), max(w, S)
        py, px = int(rng.integers(0, Hc - h + 1)), int(rng.integers(0, Wc - w + 1))
        cy, cx = int(rng.integers(0, Hc - S + 1)), int(rng.integers(0, Wc - S + 1))
        canvas = torch.zeros(3, Hc, Wc, dtype=torch.float32)
        canvas[:, py:py + h, px:px + w] = x
        valid = torch.zeros(Hc, Wc, dtype=torch.bool)
        valid[py:py + h, px:px + w] = True
        out_label = None
        if lab is not None:
            full = torch.full((Hc, Wc), self.ignore_index, dtype=torch.int64)
            full[py:py + h, px:px + w] = torch.from_numpy(np.asarray(lab).astype(np.int64))
            out_label = full[cy:cy + S, cx:cx + S].clone()
        crop = (slice(cy, cy + S), slice(cx, cx + S))
        return canvas[:, crop[0], crop[1]].clone(), valid[crop].clone(), out_label

    def _coco(self, image, rng, lab):
        S = self.crop_size
        img = Image.fromarray(image)
        if rng.random() < COCO_JITTER_P:
            img = color_jitter(img, rng)
        r = rng.uniform(*self.scale_range)
        h, w = max(1, int(img.height * r + 0.5)), max(1, int(img.width * r + 0.5))
        img = img.resize((w, h), Image.BILINEAR)
        if lab is not None:
            lab = lab.resize((w, h), Image.NEAREST)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lab = None if lab is None else lab.transpose(Image.FLIP_LEFT_RIGHT)
        # the image at a random offset in a black canvas of at least S×S, then a random S×S crop
        Hc, Wc = max(h, S), max(w, S)
        py, px = int(rng.integers(0, Hc - h + 1)), int(rng.integers(0, Wc - w + 1))
        cy, cx = int(rng.integers(0, Hc - S + 1)), int(rng.integers(0, Wc - S + 1))
        canvas = np.full((Hc, Wc, 3), COCO_PAD_VALUE, dtype=np.uint8)
        canvas[py:py + h, px:px + w] = np.asarray(img)
        x = normalize(canvas[cy:cy + S, cx:cx + S])
        valid = torch.ones(S, S, dtype=torch.bool)  # padding included: no crop box (SPEC §3.0)
        out_label = None
        if lab is not None:
            full = np.full((Hc, Wc), self.ignore_index, dtype=np.int64)
            full[py:py + h, px:px + w] = np.asarray(lab)
            out_label = torch.from_numpy(full[cy:cy + S, cx:cx + S].copy())
        return x, valid, out_label
