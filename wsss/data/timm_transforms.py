"""AReAM's training augmentation: timm's ImageNet training transform, as the official
``main_voc_mctformer.py`` builds it (SPEC §5), made reproducible per item.

``timm.data.create_transform(input_size=S, is_training=True, color_jitter=0.4,
auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel",
re_count=1)``: random-resized crop (area 0.08–1, bicubic), horizontal flip, RandAugment (timm
skips the colour jitter when an auto-augment policy is given), normalise, random erasing with
per-pixel normal noise. The in-training pseudo labels and PAR see this image, erasing included.

timm's transforms draw from the global RNGs of Python (``random``), NumPy (``np.random``) and
torch. :class:`TimmTrainTransform` seeds all three from the per-item ``np.random.Generator`` the
data set passes (``default_rng([seed, epoch, index])``) and restores their previous states
afterwards, so an item's augmentation is a pure function of (seed, epoch, index), whichever
worker loads it, and the caller's global random streams (dropout, drop path, ...) are untouched.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .transforms import _check_image

# SPEC §5, "Training details of the official main_voc_mctformer.py".
TIMM_TRAIN_ARGS = dict(is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                       interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
# The official evaluation transform (DeiT's): resize the short side to S·256/224 (bicubic), centre crop S.
EVAL_CROP_PCT = 224 / 256


@contextmanager
def seeded_global_rngs(rng: np.random.Generator):
    """Seed Python's, NumPy's and torch's global RNGs from ``rng`` for the block, then restore
    their previous states."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seeds = rng.integers(0, 2 ** 32, size=3)
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    torch.manual_seed(int(seeds[2]))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class TimmTrainTransform:
    """``__call__(image, rng, label=None)`` takes a uint8 (H,W,3) RGB array and returns
    ``(image (3,S,S) float32 normalised, valid (S,S) bool (all True), None)``, the interface of
    :class:`wsss.data.transforms.TrainTransform`. Segmentation labels are not supported: timm's
    photometric and geometric ops cannot be replayed on a mask."""

    def __init__(self, crop_size: int):
        from timm.data import create_transform

        if not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        self.crop_size = int(crop_size)
        self.transform = create_transform(input_size=self.crop_size, **TIMM_TRAIN_ARGS)

    def __repr__(self) -> str:
        return f"TimmTrainTransform(crop_size={self.crop_size}, {self.transform!r})"

    def __call__(self, image: np.ndarray, rng: np.random.Generator, label=None):
        if label is not None:
            raise ValueError("the timm augmentation (data.aug=timm) cannot transform segmentation labels")
        pil = Image.fromarray(_check_image(image))
        with seeded_global_rngs(rng):
            x = self.transform(pil)
        S = self.crop_size
        return x.float().contiguous(), torch.ones(S, S, dtype=torch.bool), None


def timm_eval_transform(size: int):
    """The official evaluation input (DeiT's): short side resized to ``size / 0.875`` (bicubic),
    centre crop ``size``, normalise; a callable PIL image -> (3,size,size) tensor."""
    from timm.data import create_transform

    return create_transform(input_size=int(size), is_training=False, interpolation="bicubic", crop_pct=EVAL_CROP_PCT)
