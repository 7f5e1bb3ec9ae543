"""Inference for evaluation: segmentation with scales + flip, CAM pseudo labels, quick validation."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from wsss.cam import (_scaled_size, cam_to_label, multi_scale_aream_cam, multi_scale_cam, multi_scale_lam,
                      multi_scale_maps)

from wsss.utils.distributed import all_reduce_confusion, shard

from .metrics import ConfusionMatrix


@torch.no_grad()
def predict_segmentation(model, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                         out_size=None) -> torch.Tensor:
    """Class probabilities (B,K,H,W): softmax of the segmentation head averaged over scales
    and flips, each resized back to ``out_size`` (default: the input size) bilinearly."""
    H, W = images.shape[-2:]
    out_size = tuple(out_size or (H, W))
    B = images.shape[0]
    probs = None
    for s in scales:
        size = _scaled_size((H, W), s, model.patch_size)
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        logits = model(x, with_score_maps=False).seg_logits.float()
        p = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(dim=1)
        if flip:
            p = p[:B] + p[B:].flip(-1)
        probs = p if probs is None else probs + p
    return probs / (len(scales) * (2 if flip else 1))


def _loader_items(dataset, max_images: int):
    """This rank's shard of the first ``max_images`` items (all when 0)."""
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    for i in shard(n):
        yield dataset[i]


@torch.no_grad()
def quick_validate(model, val_ds, cfg, device, max_images: int = 0) -> Dict[str, float]:
    """Periodic validation (SPEC §4): images resized to the crop size by the dataset,
    predictions resized to the label; CAM (multi-scale, bkg 0.5), LAM (with GCR), Seg mIoU.

    Under torch.distributed every rank validates its strided shard and the confusion matrices
    are summed, so all ranks return the same scores as one process would (SPEC §4); every rank
    must call it."""
    K = val_ds.num_classes + 1
    if cfg.model.method == "aream":
        return _quick_validate_aream(model, val_ds, cfg, device, max_images)
    mats = {"cam": ConfusionMatrix(K), "seg": ConfusionMatrix(K)}
    with_lam = getattr(model, "graph_layer", None) is not None
    if with_lam:
        mats["lam"] = ConfusionMatrix(K)
    for item in _loader_items(val_ds, max_images):
        image = item["image"][None].to(device)
        gt = item["label"]
        y = item["cls_label"][None].to(device)
        size = tuple(gt.shape[-2:])
        cam, _ = multi_scale_cam(model, image, tuple(cfg.cam.scales), out_size=size)
        mats["cam"].update(cam_to_label(cam, y, bkg_thre=cfg.cam.bkg_thre)[1], gt)
        if with_lam:
            lam = multi_scale_lam(model, image, tuple(cfg.cam.scales), out_size=size)
            mats["lam"].update(cam_to_label(lam, y, bkg_thre=cfg.cam.bkg_thre)[1], gt)
        probs = predict_segmentation(model, image, scales=(1.0,), flip=False, out_size=size)
        mats["seg"].update(probs.argmax(dim=1), gt)
    all_reduce_confusion(mats.values())
    return {k: m.miou() for k, m in mats.items()}


def _quick_validate_aream(model, val_ds, cfg, device, max_images: int) -> Dict[str, float]:
    """AReAM has no segmentation head: CAM and affinity-refined CAM at bkg ``cam.bkg_thre``."""
    K = val_ds.num_classes + 1
    mats = {"cam": ConfusionMatrix(K), "aream_cam": ConfusionMatrix(K)}
    refine_w, _ = model.layer_weights(cfg.aream.entropy) if int(model.entropy_updates) or \
        cfg.aream.entropy == "none" else (None, None)
    for item in _loader_items(val_ds, max_images):
        image = item["image"][None].to(device)
        gt = item["label"]
        y = item["cls_label"][None].to(device)
        size = tuple(gt.shape[-2:])
        cam = multi_scale_maps(model.cams, image, tuple(cfg.aream.scales), model.patch_size, size, eps=1e-6,
                               flip_merge="sum")
        refined = multi_scale_aream_cam(model, image, tuple(cfg.aream.scales), cfg.aream.layer_index, refine_w,
                                        out_size=size, impl=cfg.impl)
        mats["cam"].update(cam_to_label(cam, y, bkg_thre=cfg.cam.bkg_thre)[1], gt)
        mats["aream_cam"].update(cam_to_label(refined, y, bkg_thre=cfg.cam.bkg_thre)[1], gt)
    all_reduce_confusion(mats.values())
    return {k: m.miou() for k, m in mats.items()}


def best_threshold(mats: Dict[float, ConfusionMatrix]):
    """(threshold, matrix) with the highest mIoU from a background-threshold sweep."""
    thr = max(mats, key=lambda t: mats[t].miou())
    return thr, mats[thr]


def cam_threshold_sweep(maps: torch.Tensor, cls_label: torch.Tensor, gt: torch.Tensor, thresholds,
                        mats: Dict[float, ConfusionMatrix]) -> None:
    for t in thresholds:
        mats[t].update(cam_to_label(maps, cls_label, bkg_thre=t)[1], gt)


__all__ = ["predict_segmentation", "quick_validate", "best_threshold", "cam_threshold_sweep"]
