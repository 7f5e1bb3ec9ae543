"""The interface every method implements, and the pieces two or more methods share.

A method is what is particular to one WSSS recipe: how its network is built, its training
objective and pseudo labels, the columns of its periodic validation and its evaluation
protocols. The training loop, the evaluator and the tools call only this interface; the shared
machinery (CAM utilities, PAR, losses, kernels) stays in ``wsss.cam``, ``wsss.losses`` and
``wsss.kernels``. A method never reads metrics or files: it returns per-image predictions and
``wsss.eval`` scores, shards, reduces and reports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
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
    """A named evaluation protocol on one split. ``predict(model, batch, device)`` returns, for
    each data-set item of ``batch`` (a list; ``wsss.eval.engine.Batch`` in the engine),
    ``{row name: (H,W) label tensor}`` (or ``{row name: {threshold: labels}}`` for a swept row)
    at the item's label size; a label may be a future of one (a CRF running beside the network,
    ``wsss.eval.engine.crf_call``)."""

    name: str
    split: str  # "train" | "val"
    rows: List[Row]
    predict: Callable
    description: str = ""


def per_item(predict: Callable) -> Callable:
    """A batch ``predict(model, batch, device, *args)`` from a one-item ``predict(model, item,
    device, *args)`` (protocols whose inputs keep each image's own size)."""

    def batched(model, batch, device, *args):
        return [predict(model, item, device, *args) for item in batch]

    return batched


def stage_first_iteration(fraction: float, max_iters: int) -> int:
    """First (0-based) iteration of a loss stage given as ``loss.starts`` gives it: the iterations
    ``<= round(fraction * max_iters)`` run without the term (the official ``n_iter <= start``
    tests, SPEC §3.0/§3.6); fraction 0 = from iteration 0."""
    return 0 if fraction == 0 else int(round(fraction * max_iters)) + 1


@dataclass
class Schedule:
    """Iteration thresholds derived from the fractions in the config."""

    loss_starts: Dict[str, int] = field(default_factory=dict)  # staged loss -> its first iteration
    cam2mask: int = 0  # MoRe: first iteration whose CLE/UNE labels come from the main CAM
    aff_start: int = 0  # AReAM: first iteration with the affinity loss

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        n = cfg.train.max_iters
        starts = {f.name: stage_first_iteration(getattr(cfg.loss.starts, f.name), n)
                  for f in fields(cfg.loss.starts)}
        return cls(loss_starts=starts, cam2mask=int(round(cfg.train.cam2mask * n)),
                   aff_start=int(round(cfg.aream.aff_start * n)))

    def started(self, loss: str, step: int) -> bool:
        """Whether the staged ``loss`` is part of the objective at iteration ``step`` (0-based)."""
        return step >= self.loss_starts.get(loss, 0)

    @property
    def all_losses_from(self) -> int:
        """The first iteration at which every staged loss has started."""
        return max(self.loss_starts.values(), default=0)


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
        """The evaluation protocols ``wsss.eval`` runs for ``cfg`` (SPEC §4, §5): those named in
        ``eval.protocols``, else the method's default set."""
        wanted = list(cfg.eval.protocols) or self.default_protocols(cfg)
        table = self.protocol_table(cfg)
        unknown = [p for p in wanted if p not in table]
        if unknown:
            raise ValueError(f"eval.protocols: {unknown} unknown for model.method={self.name}; "
                             f"known: {', '.join(table)}")
        return [table[p]() for p in wanted]

    def protocol_table(self, cfg) -> Dict[str, Callable[[], Protocol]]:
        """Every protocol of the method by name, each built on demand."""
        raise NotImplementedError

    def default_protocols(self, cfg) -> List[str]:
        """The protocols run when ``eval.protocols`` is empty (the official set)."""
        raise NotImplementedError

    def panel(self, model, item: dict, cfg, device) -> Tuple[List, List[str]]:
        """(maps to show as heat maps, their titles) for the evaluation panels of one item."""
        return [], []

    # The ``epoch_end`` metric whose best (largest) value selects ``checkpoint_best.pt``; "" = none.
    best_metric = ""

    def epoch_end(self, model, val_ds, cfg, device) -> Dict[str, float]:
        """Metrics after every training epoch (the loop puts the model in eval mode and logs them
        as ``val/<name>``; AReAM: the val mAP, SPEC §5). Every rank calls it and must return the
        values one process would: shard the images and reduce inside. Default: none."""
        return {}

    def exports(self, cfg) -> Dict[str, "Export"]:  # noqa: F821 (wsss.methods.export.Export)
        """What ``python -m wsss.infer`` can write for ``cfg``, by name (``wsss.methods.export``)."""
        return {}

    def default_export(self, cfg):
        """The export that segments images without image-level labels (val/test, a folder), or
        None when the method has no such output (no segmentation head)."""
        return None


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


def _crf_on_device(probs: torch.Tensor) -> bool:
    """The CRF of ``probs`` runs where they are: on CUDA when ``wsss._C`` has a CUDA kernel."""
    if probs.device.type != "cuda":
        return False
    from wsss.crf._ext import ops

    ops()
    return torch._C._dispatch_has_kernel_for_dispatch_key("wsss::dense_crf", "CUDA")


def _crf_argmax(image_b3hw: torch.Tensor, probs_bkhw: torch.Tensor, params: tuple, keys, threads: int):
    from wsss.crf import dense_crf_batch

    lab = dense_crf_batch(image_b3hw, probs_bkhw, *params, num_threads=threads)[0].argmax(dim=0)
    return lab if keys is None else keys.to(lab.device)[lab]


def crf_labels(image_uint8: torch.Tensor, probs: torch.Tensor, cfg, keys: torch.Tensor = None):
    """Dense CRF (SPEC §6.3) with ``cfg.eval``'s parameters (official: t=10, 1/3/67/3/4) on the
    original image; argmax, mapped through ``keys`` when the channels are a subset of classes.
    On CUDA with a CUDA build it runs on the GPU, else on the CPU; inside the inference
    engine's stream (``wsss.eval.engine``) a CPU CRF runs on its thread pool and this returns
    a future of the labels."""
    from wsss.eval.engine import crf_call, crf_threads

    e = cfg.eval
    params = (e.crf_iters, e.crf_pos_xy_std, e.crf_pos_w, e.crf_bi_xy_std, e.crf_bi_rgb_std, e.crf_bi_w)
    if _crf_on_device(probs):
        image = image_uint8.to(probs.device, non_blocking=True).permute(2, 0, 1)[None]
        return _crf_argmax(image, probs[None].float(), params, keys, 0)
    image = image_uint8.permute(2, 0, 1)[None].cpu()
    return crf_call(_crf_argmax, image, probs[None].float().cpu(), params, keys, crf_threads())


def cam_crf_labels(image_uint8: torch.Tensor, valid_cam: torch.Tensor, classes: torch.Tensor, cfg) -> torch.Tensor:
    """SPEC §4 E1 ``crf_post``: probabilities ``[1 − max_c M_c ; M_c of the present classes]``
    (not renormalised), dense CRF, argmax mapped back through ``[0; present + 1]``.
    ``valid_cam`` (C,H,W) at the image size; ``classes`` the present class indices (0-based)."""
    present = valid_cam[classes]
    bkg = 1.0 - (present.amax(dim=0, keepdim=True) if len(classes) else torch.zeros_like(valid_cam[:1]))
    probs = torch.cat([bkg, present], dim=0)
    keys = torch.cat([classes.new_zeros(1), classes + 1])
    return crf_labels(image_uint8, probs, cfg, keys)
