"""The single-stage CAM → PAR → segmentation baseline MoRe extends (``model.method=baseline``):
the MoRe network without GCR, trained with the classification and auxiliary classification
losses, and once its stage starts (``loss.starts.seg``) the segmentation head on PAR-refined CAM
pseudo labels."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from wsss.cam import cam_to_label, multi_scale_cam, normalize_maps, refine_cams_with_bkg
from wsss.data.transforms import denormalize
from wsss.losses import classification_loss, seg_loss

from wsss.eval.engine import as_batch

from .base import (IGNORE, Method, Protocol, Row, Schedule, bare, cam_crf_labels, crf_labels, image_size, make_par,
                   resize_square, to_label_size)
from .export import Export, protocol_export


def idle_decoder_term(out) -> torch.Tensor:
    """Zero that still depends on the decoder: before the seg stage every parameter must take
    part in the loss so DDP's gradient all-reduce sees the same set on every step."""
    return out.seg_logits.sum() * 0.0


@torch.no_grad()
def training_cams(model, images, cfg):
    """Multi-scale CAMs of the batch (SPEC §3 step 1), from the bare model also under DDP."""
    return multi_scale_cam(bare(model), images, tuple(cfg.cam.scales))


@torch.no_grad()
def refined_pseudo_labels(images, cam, cls_label, valid, cfg, max_classes=None):
    """Label-masked CAM → PAR with two background scores (SPEC §3 steps 2–3); IGNORE outside
    ``valid`` (a crop's padding). ``max_classes``: see :func:`par_pseudo_labels`."""
    return par_pseudo_labels(images, cam, cls_label, cfg, max_classes).masked_fill_(~valid, IGNORE)


def baseline_losses(model, batch, step: int, cfg, schedule: Schedule, amp_ctx) -> Dict[str, torch.Tensor]:
    images, cls_label, valid = batch["image"], batch["cls_label"], batch["valid"]
    seg_on = schedule.started("seg", step) and cfg.loss.w_seg > 0
    with amp_ctx:
        out = model(images, with_score_maps=False)
    losses = {"cls": classification_loss(out.cls_logits, cls_label),
              "aux": cfg.loss.w_aux * classification_loss(out.aux_cls_logits, cls_label)}
    if seg_on:
        cam, _ = training_cams(model, images, cfg)
        # "max_classes": counted by the training loop on the loader's host labels (no device read)
        label = refined_pseudo_labels(images, cam, cls_label, valid, cfg, batch.get("max_classes"))
        seg = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        # the pseudo label is in range by construction: no label check (a host sync)
        losses["seg"] = cfg.loss.w_seg * seg_loss(seg, label, IGNORE, check_labels=False)
    else:
        losses["seg"] = idle_decoder_term(out)
    return losses


# -- evaluation (SPEC §4) --------------------------------------------------------------------

def eval_input_size(cfg) -> int:
    """The square size the official scripts resize every evaluated image to (448)."""
    return cfg.eval.input_size or cfg.data.crop_size


def square_batch(batch, size: int, device) -> torch.Tensor:
    """(B,3,S,S): each item's normalised image resized to ``size × size`` (bilinear, one image
    at a time, as the official scripts do per image), stacked on ``device``."""
    return torch.cat([resize_square(item["image"][None].to(device, non_blocking=True), size) for item in batch])


@torch.no_grad()
def fused_segmentation_logits(model, images, scales, base_size: int, out_sizes) -> list:
    """SPEC §4 E3 for a batch: for each scale a square ``base_size·s`` input and its flip,
    logits resized to each image's label size, the un-flipped flip logits added, element-wise
    max over scales. ``images``: a sequence of (1,3,H,W) (any sizes); ``out_sizes`` one (h,w)
    each. One forward pass per scale for the whole batch. Returns a list of (1,K,h,w)."""
    B = len(images)
    fused = [None] * B
    for s in scales:
        side = int(round(base_size * s))
        x = torch.cat([resize_square(im, side) for im in images])
        logits = model(torch.cat([x, x.flip(-1)]), with_score_maps=False).seg_logits.float()
        for i, size in enumerate(out_sizes):
            pair = F.interpolate(logits[i::B], size=tuple(size), mode="bilinear", align_corners=False)
            one = pair[:1] + pair[1:].flip(-1)
            fused[i] = one if fused[i] is None else torch.maximum(fused[i], one)
    return fused


@torch.no_grad()
def par_pseudo_labels(images: torch.Tensor, maps: torch.Tensor, y: torch.Tensor, cfg, max_classes=None) -> torch.Tensor:
    """The training's refinement (SPEC §3 steps 2–3) of maps at the image size: the label-masked
    maps → PAR with the background scores ``cam.high_thre`` / ``cam.low_thre``. ``images``
    (B,3,H,W) normalised; (B,H,W) labels, IGNORE where uncertain. ``max_classes``: the most
    classes of one image (``refine_cams_with_bkg``; None reads it from ``y``, a device read)."""
    return refine_cams_with_bkg(denormalize(images), maps * y[:, :, None, None], y, cfg.cam.high_thre,
                                cfg.cam.low_thre, ignore_index=IGNORE, down_scale=cfg.cam.par_down_scale,
                                par=make_par(cfg), max_classes=max_classes)


def _present(y: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(y > 0).flatten()


class BaselineMethod(Method):
    name = "baseline"
    gcr = False

    def build_model(self, model_cfg, num_classes: int):
        from wsss.models import MoRe

        return MoRe(num_classes, backbone=model_cfg.backbone, num_reg_tokens=model_cfg.num_reg_tokens,
                    aux_layer=model_cfg.aux_layer, gcr=self.gcr and model_cfg.gcr,
                    pretrained=model_cfg.pretrained or None, embed_dim=model_cfg.embed_dim, depth=model_cfg.depth,
                    num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size, img_size=model_cfg.img_size,
                    drop_path_rate=model_cfg.drop_path, decoder_dim=model_cfg.decoder_dim)

    def objective(self, cfg, device):
        return baseline_losses

    def describe_schedule(self, schedule: Schedule) -> str:
        return f"seg loss from iteration {schedule.loss_starts.get('seg', 0)}"

    # -- periodic validation: the official columns (SPEC §4) ------------------------------------
    def validate(self, model, item, cfg, device) -> Dict[str, torch.Tensor]:
        image = item["image"][None].to(device)
        y = item["cls_label"][None].to(device)
        size = image_size(item)
        bkg = cfg.eval.bkg_thre
        cam, cam_aux = multi_scale_cam(model, image, tuple(cfg.cam.scales), out_size=size)
        cols = {"cam": cam_to_label(cam, y, bkg_thre=bkg)[1][0],
                "aux_cam": cam_to_label(cam_aux, y, bkg_thre=bkg)[1][0]}
        out = model(image, with_score_maps=False)
        if getattr(model, "graph_layer", None) is not None:
            # Score Map: the forward's F · class tokens, one scale, no flip (SPEC §4)
            score = torch.einsum("bdhw,bcd->bchw", out.patch_features.float(), out.class_tokens.float())
            score = normalize_maps(to_label_size(score, size))
            cols["score_map"] = cam_to_label(score, y, bkg_thre=bkg)[1][0]
            cols["fused"] = cam_to_label(normalize_maps(cam * score), y, bkg_thre=bkg)[1][0]
        cols["seg"] = to_label_size(out.seg_logits, size).argmax(dim=1)[0]
        return cols

    # -- evaluation protocols (SPEC §4) ---------------------------------------------------------
    def default_protocols(self, cfg) -> List[str]:
        return ["E1-CAM", "E3"]

    def protocol_table(self, cfg) -> Dict:
        return {"E1-CAM": lambda: self._e1(cfg, "CAM"), "E3": lambda: self._e3(cfg),
                "extra-CAM": lambda: self._extra(cfg, "CAM")}

    def _maps(self, model, x, kind: str, scales, size):
        if kind == "CAM":
            return multi_scale_cam(model, x, scales, out_size=size)[0]
        raise ValueError(f"model.method={self.name} has no {kind!r} maps; known: CAM")

    def _batch_maps(self, model, batch, device, kind: str, cfg):
        """E1's CAM/LAM of a batch: one (1,C,H,W) map per item at its image size, and the image
        labels (B,C): every image resized to the square input size, ``eval.cam_scales`` + flip
        (SPEC §4), one forward pass per scale for the batch; computed once per batch for all the
        protocols that read it."""
        S, scales = eval_input_size(cfg), tuple(cfg.eval.cam_scales)

        def compute():
            maps = self._maps(model, square_batch(batch, S, device), kind, scales, (S, S))
            per_item = [to_label_size(maps[i:i + 1], image_size(item)) for i, item in enumerate(batch)]
            return per_item, torch.stack([item["cls_label"] for item in batch]).to(device)

        return as_batch(batch).memo(("maps", kind, scales, S), compute)

    def _e1(self, cfg, kind: str) -> Protocol:
        """E1 pseudo-label quality (train, ground-truth image labels, SPEC §4)."""
        scales = tuple(cfg.eval.cam_scales)
        S, bkg = eval_input_size(cfg), cfg.eval.bkg_thre
        raw = Row(f"E1 {kind} pseudo labels (train)", f"{S}², scales {list(scales)} + flip, bkg {bkg:g}")
        rows = [raw]
        if cfg.eval.crf:
            rows.append(Row(f"E1 {kind} + CRF pseudo labels (train)", "crf_post, dense CRF t=10 1/3/67/3/4"))

        def predict(model, batch, device):
            maps, ys = self._batch_maps(model, batch, device, kind, cfg)
            outs = []
            for item, m, y in zip(batch, maps, ys):
                valid, lab = cam_to_label(m, y[None], bkg_thre=bkg)
                out = {raw.name: lab[0]}
                if cfg.eval.crf:
                    out[rows[1].name] = cam_crf_labels(item["image_uint8"], valid[0], _present(y), cfg)
                outs.append(out)
            return outs

        return Protocol(f"E1-{kind}", "train", rows, predict, "pseudo-label quality (infer_cam/infer_lam)")

    def _e3(self, cfg) -> Protocol:
        """E3 segmentation head (val): square multi-scale, flip sum, max over scales (SPEC §4)."""
        scales = tuple(cfg.eval.scales)
        S = eval_input_size(cfg)
        raw = Row("E3 segmentation (val)", f"square {S}·s, s in {list(scales)}, flip sum, max over scales")
        rows = [raw]
        if cfg.eval.crf:
            rows.append(Row("E3 segmentation + CRF (val)", "softmax of the fused logits, dense CRF t=10 1/3/67/3/4"))

        def predict(model, batch, device):
            images = [item["image"][None].to(device, non_blocking=True) for item in batch]
            fused = fused_segmentation_logits(model, images, scales, S, [image_size(item) for item in batch])
            outs = []
            for item, logits in zip(batch, fused):
                out = {raw.name: logits.argmax(dim=1)[0]}
                if cfg.eval.crf:
                    out[rows[1].name] = crf_labels(item["image_uint8"], logits[0].softmax(dim=0), cfg)
                outs.append(out)
            return outs

        return Protocol("E3", "val", rows, predict, "segmentation head (infer_seg_voc)")

    def _extra(self, cfg, kind: str) -> Protocol:
        """Not an official protocol: the best background threshold of a sweep, and the PAR
        refinement the training uses (uncertain pixels scored as background)."""
        sweep = tuple(float(t) for t in cfg.eval.bkg_sweep)
        swept = Row(f"extra: {kind} pseudo labels, best threshold (train)", f"sweep {list(sweep)}", sweep=sweep)
        par = Row(f"extra: {kind} + PAR pseudo labels (train)", f"high {cfg.cam.high_thre:g} / low {cfg.cam.low_thre:g}")

        def predict(model, batch, device):
            maps, ys = self._batch_maps(model, batch, device, kind, cfg)
            outs = []
            for item, m, y in zip(batch, maps, ys):
                out = {swept.name: {t: cam_to_label(m, y[None], bkg_thre=t)[1][0] for t in sweep}}
                lab = par_pseudo_labels(item["image"][None].to(device), m, y[None], cfg)
                out[par.name] = torch.where(lab == IGNORE, 0, lab)[0]
                outs.append(out)
            return outs

        return Protocol(f"extra-{kind}", "train", [swept, par], predict, "threshold sweep and PAR (not official)")

    # -- what python -m wsss.infer writes (wsss.methods.export) ----------------------------------
    def exports(self, cfg) -> Dict[str, Export]:
        return {"E1-CAM": self._e1_export(cfg, "CAM"), "E3": protocol_export(self._e3, cfg, needs_image_labels=False)}

    def default_export(self, cfg):
        return "E3"

    def _e1_export(self, cfg, kind: str) -> Export:
        """E1's rows, and ``par``: the ``extra-{kind}`` PAR labels with the uncertain pixels kept as
        IGNORE (the pseudo labels of a second-stage network)."""

        def par(model, batch, device):
            maps, ys = self._batch_maps(model, batch, device, kind, cfg)
            return [par_pseudo_labels(item["image"][None].to(device), m, y[None], cfg)[0]
                    for item, m, y in zip(batch, maps, ys)]

        note = (f"E1 {kind} → PAR with background scores {cfg.cam.high_thre:g} / {cfg.cam.low_thre:g}, "
                f"{IGNORE} where uncertain")
        return protocol_export(lambda c: self._e1(c, kind), cfg, needs_image_labels=True, extra={"par": (note, par)})

    def panel(self, model, item, cfg, device):
        image = item["image"][None].to(device)
        y = item["cls_label"][None, :, None, None].to(device)
        cam = multi_scale_cam(model, image, (1.0,), out_size=image_size(item))[0] * y
        return [cam[0].amax(0).cpu().numpy()], ["CAM"]
