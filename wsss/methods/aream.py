"""AReAM (SPEC §5, public MCTformer-V2 code): an MCTformer-style multi-class-token ViT trained
with two multi-label losses and, after ``aff_start``, the entropy-weighted sigmoid affinity loss
on the deep layers; its pseudo labels are CAMs re-activated by entropy-weighted shallow-layer
affinities. Evaluated by the official pseudo-label protocol and wsss's analysis rows."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from wsss.cam import (aream_refined_cam, cam_to_label, layer_entropy_bits, multi_scale_aream_cam, multi_scale_maps,
                      normalize_maps, refine_cams_with_bkg)
from wsss.data.transforms import denormalize
from wsss.kernels import masked_sigmoid_affinity_loss_qk
from wsss.losses import classification_loss

from .base import IGNORE, Method, Protocol, Row, Schedule, bare, image_size, make_par, per_item
from .export import Export


class AReAMLosses:
    """AReAM's objective (SPEC §5, public code): two multi-label soft-margin losses, and after
    ``aff_start`` the entropy-weighted sigmoid affinity loss on layers ≥ ``layer_index``,
    computed from their queries and keys (no N×N matrix on the fast path)."""

    def __init__(self, cfg, device):
        a = cfg.aream
        if a.entropy == "offline" and not a.entropy_file:
            raise ValueError("aream.entropy=offline needs aream.entropy_file (python -m wsss.tools.layer_entropy "
                             "writes it), or use aream.entropy=online|none")
        if not 0.0 <= a.entropy_momentum < 1.0:
            raise ValueError(f"aream.entropy_momentum must be in [0, 1), got {a.entropy_momentum}")
        if not 0.0 < a.score_l < a.score_h < 1.0:
            raise ValueError(f"aream needs 0 < score_l < score_h < 1, got {a.score_l} and {a.score_h}")

    def prepare(self, model, cfg) -> None:
        """Checks the layer split against the model and loads the offline entropies."""
        if not 1 <= cfg.aream.layer_index < model.depth:
            raise ValueError(f"aream.layer_index={cfg.aream.layer_index} must be in [1, {model.depth - 1}] for a "
                             f"{model.depth}-block backbone")
        if cfg.aream.entropy == "offline":
            model.load_layer_entropy(cfg.aream.entropy_file)

    @torch.no_grad()
    def pseudo_labels(self, model, images, y, valid, cfg, max_classes=None, refine_weights=None) -> torch.Tensor:
        """Entropy-weighted affinity-refined CAM → PAR with the two background scores (B,H,W).

        ``images`` are the augmented training batch (timm's transform with random erasing, as the
        official code feeds them); the model stays in training mode, so stochastic depth is
        active in this no-grad pass too (SPEC §5). ``refine_weights``: the model's refinement
        weights when the caller has them already; ``max_classes``: see ``aream_par_labels``."""
        a = cfg.aream
        refine_w = model.layer_weights(a.entropy)[0] if refine_weights is None else refine_weights
        cam = multi_scale_aream_cam(model, images, tuple(a.scales), a.layer_index, refine_w, impl=cfg.impl)
        return aream_par_labels(images, cam, y, cfg, max_classes).masked_fill_(~valid, IGNORE)

    def __call__(self, model, batch, step: int, cfg, schedule: Schedule, amp_ctx):
        images, y, valid = batch["image"], batch["cls_label"], batch["valid"]
        a = cfg.aream
        net = bare(model)
        L, C = net.depth, net.num_classes
        aff_on = step >= schedule.aff_start and a.w_aff > 0
        online = aff_on and a.entropy == "online"
        # the online entropy estimate reads every layer's q, k of this forward (no extra pass)
        qk_layers = range(0 if online else a.layer_index, L) if aff_on else ()
        with amp_ctx:
            out = model(images, qk_layers=qk_layers)
        losses = {"cls": classification_loss(out.cls_logits, y), "patch": classification_loss(out.patch_logits, y)}
        if not aff_on:
            return losses
        if online:
            q = torch.stack([out.qk[i][0].detach() for i in range(L)])
            k = torch.stack([out.qk[i][1].detach() for i in range(L)])
            estimate = layer_entropy_bits(F.relu(out.cam.detach().float()), q, k, y, net.attn_scale, cfg.impl)
            net.update_layer_entropy(estimate.mean(dim=1), a.entropy_momentum)
        refine_w, loss_w = net.layer_weights(a.entropy)  # once per step: the model reads its update count
        # "max_classes": counted by the training loop on the loader's host labels (no device read)
        label = self.pseudo_labels(net, images, y, valid, cfg, batch.get("max_classes"), refine_w)
        token_label = F.interpolate(label[:, None].float(), size=out.cam.shape[-2:], mode="nearest")[:, 0].long()
        terms = []
        for i in range(a.layer_index, L):
            q, k = out.qk[i]
            loss = masked_sigmoid_affinity_loss_qk(q[:, :, C:], k[:, :, C:], token_label, ignore_index=IGNORE,
                                                   ignore_diagonal=False, scale=net.attn_scale, impl=cfg.impl)
            terms.append(loss_w[i] * loss)
        losses["aff"] = a.w_aff * torch.stack(terms).mean()
        return losses


@torch.no_grad()
def aream_par_labels(images: torch.Tensor, cam: torch.Tensor, y: torch.Tensor, cfg, max_classes=None) -> torch.Tensor:
    """AReAM's pseudo labels from its refined CAM (SPEC §5): the label-masked CAM → PAR with the
    two background scores ``score_h`` / ``score_l``; (B,H,W), IGNORE where uncertain.
    ``max_classes``: the most classes of one image (``refine_cams_with_bkg``; None reads ``y``)."""
    a = cfg.aream
    return refine_cams_with_bkg(denormalize(images), cam * y[:, :, None, None], y, a.score_h, a.score_l,
                                ignore_index=IGNORE, down_scale=cfg.cam.par_down_scale, par=make_par(cfg),
                                max_classes=max_classes)


def _refine_weights(model, cfg):
    """The entropy weights the model holds, or equal weights while it holds none yet (an online
    run validated before its first affinity step, or an official checkpoint without them)."""
    if cfg.aream.entropy == "none" or int(model.entropy_updates) == 0:
        return None
    return model.layer_weights(cfg.aream.entropy)[0]


@torch.no_grad()
def official_pseudo_label_maps(model, image: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """SPEC §5 "Official pseudo-label evaluation": the image at its original size, zero-padded
    (bottom/right, in normalised space) to a multiple of the patch size, and its flip; each pass's
    CAM gated by the class attention of all layers and re-activated by the uniform mean of all
    layers' head-mean patch affinities; upsampled to the padded size, cropped, the flip un-flipped;
    the two passes summed and min-max normalised per map. (1,C,H,W) in [0,1]."""
    H, W = image.shape[-2:]
    P = model.patch_size
    pad = (0, (-W) % P, 0, (-H) % P)
    x = torch.cat([F.pad(image, pad), F.pad(image.flip(-1), pad)])
    cam, q, k = model.cam_and_qk(x)
    refined = aream_refined_cam(cam, q, k, model.depth, None, model.attn_scale, impl)
    refined = F.interpolate(refined.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :H, :W]
    return normalize_maps(refined[:1] + refined[1:].flip(-1), eps=1e-5)


class AReAMMethod(Method):
    name = "aream"
    best_metric = "mAP"  # of epoch_end: the official checkpoint_best.pth

    def build_model(self, model_cfg, num_classes: int):
        from wsss.models import AReAM

        return AReAM(num_classes, backbone=model_cfg.backbone, pretrained=model_cfg.pretrained or None,
                     embed_dim=model_cfg.embed_dim, depth=model_cfg.depth, num_heads=model_cfg.num_heads,
                     patch_size=model_cfg.patch_size, img_size=model_cfg.img_size,
                     drop_path_rate=model_cfg.drop_path)

    def objective(self, cfg, device):
        return AReAMLosses(cfg, device)

    def config_problems(self, cfg) -> List[str]:
        from wsss.utils.preflight import missing_file

        if cfg.aream.entropy == "offline" and cfg.aream.w_aff > 0:
            return missing_file("aream.entropy_file", cfg.aream.entropy_file,
                                "written by python -m wsss.tools.layer_entropy; or aream.entropy=online|none")
        return []

    def describe_schedule(self, schedule: Schedule) -> str:
        return f"affinity loss from iteration {schedule.aff_start}"

    def epoch_end(self, model, val_ds, cfg, device) -> Dict[str, float]:
        """SPEC §5 (official ``main_voc_mctformer.py``): each epoch the val split's multi-label
        mAP of σ(class logits), each image as the official evaluation transform gives it (short
        side to S·256/224 bicubic, centre crop S = ``data.crop_size``); the first
        ``eval.val_images`` images (0 = all). The best epoch becomes ``checkpoint_best.pt``."""
        if not cfg.aream.epoch_map:
            return {}
        from wsss.data.timm_transforms import timm_eval_transform
        from wsss.eval.multilabel import mean_image_average_precision
        from wsss.utils.device import autocast

        net = bare(model)

        def predict(images):
            with autocast(device, cfg.amp):
                return net(images).cls_logits

        return {"mAP": mean_image_average_precision(predict, val_ds, timm_eval_transform(cfg.data.crop_size), device,
                                                    max_images=cfg.eval.val_images,
                                                    batch_size=cfg.train.batch_size)}

    def validate(self, model, item, cfg, device) -> Dict[str, torch.Tensor]:
        """CAM and affinity-refined CAM at ``eval.bkg_thre`` (AReAM has no segmentation head)."""
        image = item["image"][None].to(device)
        y = item["cls_label"][None].to(device)
        size = image_size(item)
        scales = tuple(cfg.aream.scales)
        cam = multi_scale_maps(model.cams, image, scales, model.patch_size, size, eps=1e-6, flip_merge="sum")
        refined = multi_scale_aream_cam(model, image, scales, cfg.aream.layer_index, _refine_weights(model, cfg),
                                        out_size=size, impl=cfg.impl)
        bkg = cfg.eval.bkg_thre
        return {"cam": cam_to_label(cam, y, bkg_thre=bkg)[1][0], "aream_cam": cam_to_label(refined, y, bkg_thre=bkg)[1][0]}

    def protocol_table(self, cfg) -> Dict:
        return {"official": lambda: self._official(cfg), "analysis": lambda: self._analysis(cfg)}

    def default_protocols(self, cfg) -> List[str]:
        return ["official", "analysis"]

    def _official(self, cfg) -> Protocol:
        sweep = tuple(round(0.01 * i, 2) for i in range(99))  # 0.00 .. 0.98
        row = Row("official: AReAM CAM pseudo labels (train)", "original size padded to a multiple of the patch, "
                  "scale 1 + flip, all layers uniform, bkg swept 0.00-0.98, mIoU over all classes", sweep=sweep,
                  over="all")

        def predict(model, item, device):
            maps = official_pseudo_label_maps(model, item["image"][None].to(device), cfg.impl)
            y = item["cls_label"][None].to(device)
            return {row.name: {t: cam_to_label(maps, y, bkg_thre=t)[1][0] for t in sweep}}

        return Protocol("official", "train", [row], per_item(predict), "official pseudo-label evaluation (evaluate.py)")

    def _analysis(self, cfg) -> Protocol:
        """wsss's rows: CAM, class-attention-gated CAM, the training-time refined CAM (entropy
        weights, layers < layer_index) and its PAR labels; with ``eval.layerwise`` the CAM
        re-activated by each single layer (the paper's layer-wise analysis)."""
        a = cfg.aream
        scales, sweep = tuple(cfg.eval.cam_scales), tuple(float(t) for t in cfg.eval.bkg_sweep)
        note = f"scales {list(scales)} + flip, best of {list(sweep)}"
        cam_r, gated_r, ref_r = (Row(f"{n} pseudo labels (train)", note, sweep=sweep)
                                 for n in ("CAM", "gated CAM", "AReAM CAM"))
        par_r = Row("AReAM CAM + PAR pseudo labels (train)", f"scores {a.score_l:g} / {a.score_h:g}")
        layer_rows = []
        if cfg.eval.layerwise:
            from wsss.models.vit import backbone_shape

            m = cfg.model
            depth = backbone_shape(m.backbone, m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size)[1]
            ref_r.series = ("layerwise", "aggregated")
            layer_rows = [Row(f"layer {i} affinity: gated CAM pseudo labels (train)", "layer-wise analysis",
                              sweep=sweep, series=("layerwise", f"layer {i}")) for i in range(depth)]
        rows = [cam_r, gated_r, ref_r, par_r]

        def predict(model, item, device):
            image = item["image"][None].to(device)
            y = item["cls_label"][None].to(device)
            cam = multi_scale_maps(model.cams, image, scales, model.patch_size, eps=1e-6, flip_merge="sum")
            refined, gated, singles = multi_scale_aream_cam(model, image, scales, a.layer_index,
                                                            _refine_weights(model, cfg), impl=cfg.impl, extras=True)
            out = {r.name: {t: cam_to_label(m, y, bkg_thre=t)[1][0] for t in sweep}
                   for r, m in ((cam_r, cam), (gated_r, gated), (ref_r, refined))}
            for r, m in zip(layer_rows, singles):
                out[r.name] = {t: cam_to_label(m, y, bkg_thre=t)[1][0] for t in sweep}
            lab = aream_par_labels(image, refined, y, cfg)
            out[par_r.name] = torch.where(lab == IGNORE, 0, lab)[0]  # uncertain pixels count as background
            return out

        return Protocol("analysis", "train", rows + layer_rows, per_item(predict), "wsss analysis rows (not official)")

    def exports(self, cfg) -> Dict[str, Export]:
        """``pseudo-labels``: the training-time pseudo labels (as ``AReAMLosses.pseudo_labels``) of
        an image with ground-truth image labels, at its original size, the network in eval mode (no
        stochastic depth). Nothing for unlabelled images: AReAM has no segmentation head."""
        a = cfg.aream

        def predict(model, item, device, row: str):
            image = item["image"][None].to(device)
            y = item["cls_label"][None].to(device)
            cam = multi_scale_aream_cam(model, image, tuple(a.scales), a.layer_index, _refine_weights(model, cfg),
                                        impl=cfg.impl)
            if row == "raw":
                return cam_to_label(cam, y, bkg_thre=cfg.eval.bkg_thre)[1][0]
            return aream_par_labels(image, cam, y, cfg)[0]

        rows = {"par": f"AReAM CAM (aream.scales {list(a.scales)} + flip) → PAR with background scores "
                       f"{a.score_h:g} / {a.score_l:g}, {IGNORE} where uncertain (the training's labels)",
                "raw": f"AReAM CAM, bkg {cfg.eval.bkg_thre:g}"}
        return {"pseudo-labels": Export("pseudo-labels", rows, per_item(predict), needs_image_labels=True,
                                        description="training-time pseudo labels")}

    def panel(self, model, item, cfg, device):
        image = item["image"][None].to(device)
        yy = item["cls_label"][None, :, None, None].to(device)
        size = image_size(item)
        cam = multi_scale_maps(model.cams, image, (1.0,), model.patch_size, size, eps=1e-6, flip_merge="sum")
        refined = multi_scale_aream_cam(model, image, (1.0,), cfg.aream.layer_index, _refine_weights(model, cfg),
                                        out_size=size, impl=cfg.impl)
        return [(cam * yy)[0].amax(0).cpu().numpy(), (refined * yy)[0].amax(0).cpu().numpy()], ["CAM", "AReAM CAM"]
