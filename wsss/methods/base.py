"""The interface every method implements, and the pieces two or more methods share.

A method is what is particular to one WSSS recipe: how its network is built, its training
objective and pseudo labels, the columns of its periodic validation and its evaluation
protocols. The training loop, the evaluator and the tools call only this interface; the shared
machinery (CAM utilities, PAR, losses, kernels) stays in ``wsss.cam``, ``wsss.losses`` and
``wsss.kernels``. A method never reads metrics or files: it returns per-image predictions and
``wsss.eval`` scores, shards, reduces and reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from wsss.kernels import par_refine

IGNORE = 255


@dataclass
class Row:
    """One scored output of an evaluation protocol.

    ``sweep``: the background thresholds whose best mIoU is reported (empty: one prediction);
    ``over``: mIoU over the ground-truth classes ("gt", MoRe's ``scores``) or all ("all");
    ``series``: (series name, point name) when the row is one point of a plotted series."""

    name: str
    note: str = ""
    sweep: Tuple[float, ...] = ()
    over: str = "gt"
    series: Tuple[str, str] = ()


@dataclass
class Protocol:
    """A named evaluation protocol on one split. ``predict(model, item, device)`` returns, for one
    data-set item, ``{row name: (H,W) label tensor}`` (or ``{row name: {threshold: labels}}`` for
    a swept row) at the item's label size."""

    name: str
    split: str  # "train" | "val"
    rows: List[Row]
    predict: Callable
    description: str = ""


@dataclass
class Schedule:
    """Iteration thresholds derived from the fractions in the config."""

    seg_start: int
    cam2mask: int
    aff_start: int = 0  # AReAM: first iteration with the affinity loss

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        n = cfg.train.max_iters
        return cls(seg_start=int(round(cfg.train.seg_start * n)), cam2mask=int(round(cfg.train.cam2mask * n)),
                   aff_start=int(round(cfg.aream.aff_start * n)))


class Method:
    """Base class: subclasses set ``name`` and implement the methods that raise."""

    name = ""

    def build_model(self, model_cfg, num_classes: int):
        raise NotImplementedError

    def objective(self, cfg, device):
        """A callable ``(model, batch, step, cfg, schedule, amp_ctx) -> {loss name: weighted loss}``; it may
        have ``prepare(model, cfg)`` (called once before training) and ``generator``
        (a seeded ``torch.Generator`` saved in checkpoints)."""
        raise NotImplementedError

    def config_problems(self, cfg) -> List[str]:
        """Problems of the resolved config this method would hit mid-run (preflight)."""
        return []

    def describe_schedule(self, schedule: Schedule) -> str:
        """One line for the training log: when the method's loss stages start."""
        return ""

    def validate(self, model, item: dict, cfg, device) -> Dict[str, torch.Tensor]:
        """Periodic validation of one val item (image resized to the crop size by the data set):
        ``{column: (H,W) labels at the label size}``."""
        raise NotImplementedError

    def protocols(self, cfg) -> List[Protocol]:
        """The evaluation protocols ``wsss.eval`` runs for ``cfg`` (SPEC §4, §5)."""
        raise NotImplementedError

    def panel(self, model, item: dict, cfg, device) -> Tuple[List, List[str]]:
        """(maps to show as heat maps, their titles) for the evaluation panels of one item."""
        return [], []


# -- pieces shared by the CAM-based methods ---------------------------------------------------

def make_par(cfg):
    return partial(par_refine, dilations=tuple(cfg.cam.par_dilations), num_iter=cfg.cam.par_iters, impl=cfg.impl)


def bare(model):
    """The module under DDP's wrapper (for no-grad passes that must not touch DDP's hooks)."""
    return getattr(model, "module", model)


def image_size(item: dict) -> Tuple[int, int]:
    """(H, W) of a data-set item's original image: the size predictions are made at (labels,
    when the split has them, have this size too)."""
    return tuple(item["image_uint8"].shape[:2])


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised images resized to ``size × size`` (bilinear), as the official scripts feed them."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def to_label_size(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def crf_labels(image_uint8: torch.Tensor, probs: torch.Tensor, cfg, keys: torch.Tensor = None) -> torch.Tensor:
    """Dense CRF (SPEC §6.3) with ``cfg.eval``'s parameters (official: t=10, 1/3/67/3/4) on the
    original image; argmax, mapped through ``keys`` when the channels are a subset of classes."""
    from wsss.crf import dense_crf_batch

    e = cfg.eval
    q = dense_crf_batch(image_uint8.permute(2, 0, 1)[None].cpu(), probs[None].float().cpu(), e.crf_iters,
                        e.crf_pos_xy_std, e.crf_pos_w, e.crf_bi_xy_std, e.crf_bi_rgb_std, e.crf_bi_w)
    lab = q[0].argmax(dim=0)
    return lab if keys is None else keys.cpu()[lab]


def cam_crf_labels(image_uint8: torch.Tensor, valid_cam: torch.Tensor, classes: torch.Tensor, cfg) -> torch.Tensor:
    """SPEC §4 E1 ``crf_post``: probabilities ``[1 − max_c M_c ; M_c of the present classes]``
    (not renormalised), dense CRF, argmax mapped back through ``[0; present + 1]``.
    ``valid_cam`` (C,H,W) at the image size; ``classes`` the present class indices (0-based)."""
    present = valid_cam[classes]
    bkg = 1.0 - (present.amax(dim=0, keepdim=True) if len(classes) else torch.zeros_like(valid_cam[:1]))
    probs = torch.cat([bkg, present], dim=0)
    keys = torch.cat([torch.zeros(1, dtype=torch.long), classes.cpu() + 1])
    return crf_labels(image_uint8, probs, cfg, keys)
