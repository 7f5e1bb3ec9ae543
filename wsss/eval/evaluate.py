"""Full evaluation of a trained checkpoint (SPEC §4).

(a) CAM (and LAM with GCR) pseudo labels on the train split, best background threshold of a
sweep; (b) the PAR-refined pseudo labels; (c) the segmentation head on val with scales +
flip, optionally followed by the dense CRF. Each beside the all-background baseline.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from wsss.cam import multi_scale_cam, multi_scale_lam, refine_cams_with_bkg
from wsss.config import Config, save_config
from wsss.data import build_datasets
from wsss.data.transforms import denormalize
from wsss.kernels import par_refine
from wsss.utils.device import resolve_device
from wsss.utils.preflight import extension_problem, missing_file, raise_if
from wsss.utils.logging import get_logger

from .inference import best_threshold, cam_threshold_sweep, predict_segmentation
from .metrics import ConfusionMatrix
from .report import colorize, format_markdown, heatmap, results_table, save_panel, write_csv


def load_model(cfg: Config, ckpt_path, device):
    """``(model in eval mode on device, num_classes)`` from a wsss checkpoint or one saved by the
    official MoRe or AReAM / MCTformer-V2 code, recognised by its keys
    (``wsss.models.checkpoints.load_trained_model``)."""
    from wsss.models.checkpoints import FORMATS, load_trained_model

    model, num_classes, fmt = load_trained_model(ckpt_path, cfg.model, device)
    get_logger().info("loaded %s from %s", FORMATS[fmt], ckpt_path)
    return model.eval(), num_classes


def _items(dataset, limit: int):
    n = len(dataset) if not limit else min(limit, len(dataset))
    for i in range(n):
        yield dataset[i]


def _par(cfg: Config):
    return lambda img, masks: par_refine(img, masks, dilations=tuple(cfg.cam.par_dilations),
                                         num_iter=cfg.cam.par_iters, impl=cfg.impl)


@torch.no_grad()
def evaluate_pseudo_labels(model, dataset, cfg: Config, device, K: int):
    """Confusion matrices of CAM/LAM (threshold sweep) and their PAR refinement on ``dataset``."""
    sweep = [float(t) for t in cfg.eval.bkg_sweep]
    use_lam = getattr(model, "graph_layer", None) is not None
    mats = {"cam": {t: ConfusionMatrix(K) for t in sweep}}
    refined = {"cam+PAR": ConfusionMatrix(K)}
    if use_lam:
        mats["lam"] = {t: ConfusionMatrix(K) for t in sweep}
        refined["lam+PAR"] = ConfusionMatrix(K)
    background = ConfusionMatrix(K)
    for item in _items(dataset, cfg.eval.train_images):
        image = item["image"][None].to(device)
        gt, y = item["label"], item["cls_label"][None].to(device)
        maps = {"cam": multi_scale_cam(model, image, tuple(cfg.eval.cam_scales))[0]}
        if use_lam:
            maps["lam"] = multi_scale_lam(model, image, tuple(cfg.eval.cam_scales))
        for name, m in maps.items():
            cam_threshold_sweep(m, y, gt, sweep, mats[name])
            lab = refine_cams_with_bkg(denormalize(image), m * y[:, :, None, None], y, cfg.cam.high_thre,
                                       cfg.cam.low_thre, down_scale=cfg.cam.par_down_scale, par=_par(cfg))
            # pixels the refinement leaves uncertain (ignore) count as background
            refined[f"{name}+PAR"].update(torch.where(lab == 255, 0, lab), gt)
        background.update(torch.zeros_like(gt), gt)
    return mats, refined, background


@torch.no_grad()
def evaluate_segmentation(model, dataset, cfg: Config, device, K: int, panel_dir: Path):
    seg, seg_crf, background = ConfusionMatrix(K), ConfusionMatrix(K), ConfusionMatrix(K)
    crf_batch: List = []

    def flush_crf():
        from wsss.crf import dense_crf_many

        outs = dense_crf_many([b[0] for b in crf_batch], [b[1] for b in crf_batch],
                              num_workers=cfg.eval.crf_workers or (os.cpu_count() or 1))
        for q, (_, _, gt) in zip(outs, crf_batch):
            seg_crf.update(torch.as_tensor(np.asarray(q)).argmax(dim=0), gt)
        crf_batch.clear()

    for i, item in enumerate(_items(dataset, cfg.eval.val_images)):
        image = item["image"][None].to(device)
        gt = item["label"]
        probs = predict_segmentation(model, image, tuple(cfg.eval.scales), flip=True, out_size=gt.shape[-2:])
        pred = probs.argmax(dim=1)[0].cpu()
        seg.update(pred, gt)
        background.update(torch.zeros_like(gt), gt)
        if cfg.eval.crf:
            crf_batch.append((item["image_uint8"].numpy(), probs[0].cpu().numpy(), gt))
            if len(crf_batch) >= 16:
                flush_crf()
        if i < cfg.eval.panels:
            y = item["cls_label"][None].to(device)
            cam = multi_scale_cam(model, image, (1.0,), out_size=gt.shape[-2:])[0] * y[:, :, None, None]
            tiles = [item["image_uint8"].numpy(), colorize(gt.numpy()), heatmap(cam[0].amax(0).cpu().numpy()),
                     colorize(pred.numpy())]
            save_panel(panel_dir / f"{item['name']}.png", tiles, ["image", "ground truth", "CAM", "prediction"])
    if crf_batch:
        flush_crf()
    return seg, (seg_crf if cfg.eval.crf else None), background


def evaluate(cfg: Config, ckpt_path, out_dir=None) -> Dict:
    log = get_logger()
    device = resolve_device(cfg.device)
    # checked before the model is built or any image is read: every problem in one message
    problems = missing_file("--ckpt", ckpt_path)
    if cfg.eval.crf:
        problems += extension_problem("eval.crf=true (dense CRF)")
    try:
        _, train_seg, val_seg = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split,
                                               cfg.data.val_split, cfg.data.crop_size,
                                               cls_labels=cfg.data.cls_labels or None, aug=cfg.data.aug,
                                               seed=cfg.seed, eval_resize=None)
    except ValueError as e:  # DatasetError and bad arguments
        problems.append(f"data ({cfg.data.dataset} at data.root={cfg.data.root}): {e}")
    raise_if("evaluation", problems)
    out_dir = Path(out_dir or Path(cfg.run_dir) / "eval")
    (out_dir / "panels").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    model, C = load_model(cfg, ckpt_path, device)
    if train_seg.num_classes != C:
        raise ValueError(f"checkpoint has {C} classes but the data set at {cfg.data.root} has {train_seg.num_classes}")
    K = C + 1
    class_names = list(val_seg.class_names)
    if cfg.model.method == "aream":
        return _evaluate_aream(cfg, model, train_seg, device, K, class_names, out_dir, ckpt_path)
    t0 = time.time()
    mats, refined, bg_train = evaluate_pseudo_labels(model, train_seg, cfg, device, K)
    log.info("pseudo labels evaluated in %.1fs", time.time() - t0)
    t0 = time.time()
    seg, seg_crf, bg_val = evaluate_segmentation(model, val_seg, cfg, device, K, out_dir / "panels")
    log.info("segmentation evaluated in %.1fs", time.time() - t0)

    rows, baselines, notes = {}, {}, {}
    for name, sweep in mats.items():
        thr, mat = best_threshold(sweep)
        key = f"{name.upper()} pseudo labels (train)"
        rows[key], baselines[key], notes[key] = mat, bg_train, f"best bkg threshold {thr:g}"
    for name, mat in refined.items():
        key = f"{name.upper().replace('+PAR', '')} + PAR pseudo labels (train)"
        rows[key], baselines[key] = mat, bg_train
        notes[key] = f"high {cfg.cam.high_thre:g} / low {cfg.cam.low_thre:g}"
    key = "segmentation (val)"
    rows[key], baselines[key] = seg, bg_val
    notes[key] = f"scales {list(cfg.eval.scales)} + flip"
    if seg_crf is not None:
        key = "segmentation + CRF (val)"
        rows[key], baselines[key], notes[key] = seg_crf, bg_val, "dense CRF, SPEC §4 parameters"
    header = (f"Evaluation of `{ckpt_path}` on `{cfg.data.root}` ({len(val_seg)} val images, "
              f"{min(len(train_seg), cfg.eval.train_images or len(train_seg))} train images)")
    return _write_results(rows, baselines, notes, class_names, header, out_dir)


def _write_results(rows, baselines, notes, class_names, header: str, out_dir: Path, extra: str = "") -> Dict:
    table = results_table(rows, baselines, notes)
    markdown = format_markdown(table, rows, class_names, header) + extra
    (out_dir / "results.md").write_text(markdown)
    write_csv(table, rows, class_names, out_dir / "results.csv")
    (out_dir / "results.json").write_text(json.dumps(table, indent=2))
    return {"table": table, "markdown": markdown, "out_dir": str(out_dir)}


def _evaluate_aream(cfg: Config, model, train_seg, device, K: int, class_names, out_dir: Path, ckpt_path) -> Dict:
    from .aream import evaluate_aream_pseudo_labels, write_layerwise

    t0 = time.time()
    rows, notes, background, layerwise = evaluate_aream_pseudo_labels(
        model, train_seg, cfg, device, K, cfg.eval.train_images, _par(cfg), out_dir / "panels")
    get_logger().info("AReAM pseudo labels evaluated in %.1fs", time.time() - t0)
    extra = ""
    if layerwise is not None:
        extra = ("\nLayer-wise analysis: pseudo-label mIoU (best background threshold) of the CAM re-activated by "
                 "each single layer's affinity, and by the entropy-weighted aggregate (`layerwise.png`)\n\n"
                 + write_layerwise(layerwise, out_dir))
    n = min(len(train_seg), cfg.eval.train_images or len(train_seg))
    header = f"Evaluation of `{ckpt_path}` (AReAM, entropy {cfg.aream.entropy}) on `{cfg.data.root}` ({n} train images)"
    result = _write_results(rows, {k: background for k in rows}, notes, class_names, header, out_dir, extra)
    result["layerwise"] = layerwise
    return result
