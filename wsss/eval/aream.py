"""Evaluation of an AReAM checkpoint (SPEC §5): pseudo-label quality on the train split.

Rows: the patch-head CAM, the CAM gated by the class attention (MCTformer's CAM), the
entropy-weighted affinity-refined gated CAM (each at the best background threshold of a sweep)
and its PAR refinement with the two background scores. With
``eval.layerwise`` also the paper's layer-wise analysis: the mIoU of the CAM re-activated by
each single layer's affinity, beside the aggregated one, as a table and a PNG line plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from wsss.cam import multi_scale_aream_cam, multi_scale_maps, refine_cams_with_bkg
from wsss.config import Config
from wsss.data.transforms import denormalize

from .inference import best_threshold, cam_threshold_sweep
from .metrics import ConfusionMatrix
from .report import heatmap, save_panel


@torch.no_grad()
def evaluate_aream_pseudo_labels(model, dataset, cfg: Config, device, K: int, limit: int, par,
                                 panel_dir: Optional[Path] = None):
    """(rows, notes, background, layerwise) where ``layerwise`` is a list of (name, best mIoU)
    or None. ``rows`` map a result name to a confusion matrix."""
    a = cfg.aream
    sweep = [float(t) for t in cfg.eval.bkg_sweep]
    scales = tuple(cfg.eval.cam_scales)
    refine_w, _ = model.layer_weights(a.entropy)
    cam_m = {t: ConfusionMatrix(K) for t in sweep}
    gated_m = {t: ConfusionMatrix(K) for t in sweep}
    ref_m = {t: ConfusionMatrix(K) for t in sweep}
    par_m, background = ConfusionMatrix(K), ConfusionMatrix(K)
    layer_m = [{t: ConfusionMatrix(K) for t in sweep} for _ in range(model.depth)] if cfg.eval.layerwise else None
    n = len(dataset) if not limit else min(limit, len(dataset))
    for i in range(n):
        item = dataset[i]
        image = item["image"][None].to(device)
        gt, y = item["label"], item["cls_label"][None].to(device)
        cam = multi_scale_maps(model.cams, image, scales, model.patch_size, eps=1e-6, flip_merge="sum")
        cam_threshold_sweep(cam, y, gt, sweep, cam_m)
        refined, gated, singles = multi_scale_aream_cam(model, image, scales, a.layer_index, refine_w, impl=cfg.impl,
                                                        extras=True)
        cam_threshold_sweep(gated, y, gt, sweep, gated_m)
        if layer_m is not None:
            for mats, m in zip(layer_m, singles):
                cam_threshold_sweep(m, y, gt, sweep, mats)
        cam_threshold_sweep(refined, y, gt, sweep, ref_m)
        lab = refine_cams_with_bkg(denormalize(image), refined * y[:, :, None, None], y, a.score_h, a.score_l,
                                   down_scale=cfg.cam.par_down_scale, par=par)
        par_m.update(torch.where(lab == 255, 0, lab), gt)  # uncertain pixels count as background
        background.update(torch.zeros_like(gt), gt)
        if panel_dir is not None and i < cfg.eval.panels:
            yy = y[:, :, None, None]
            tiles = [item["image_uint8"].numpy(), heatmap((cam * yy)[0].amax(0).cpu().numpy()),
                     heatmap((refined * yy)[0].amax(0).cpu().numpy())]
            save_panel(panel_dir / f"{item['name']}.png", tiles, ["image", "CAM", "AReAM CAM"])
    rows, notes = {}, {}
    for key, sweep_m in (("CAM pseudo labels (train)", cam_m), ("gated CAM pseudo labels (train)", gated_m),
                         ("AReAM CAM pseudo labels (train)", ref_m)):
        thr, rows[key] = best_threshold(sweep_m)
        notes[key] = f"best bkg threshold {thr:g}"
    key = "AReAM CAM + PAR pseudo labels (train)"
    rows[key], notes[key] = par_m, f"scores {a.score_l:g} / {a.score_h:g}"
    layerwise = None
    if layer_m is not None:
        layerwise = [(f"layer {i}", best_threshold(m)[1].miou()) for i, m in enumerate(layer_m)]
        layerwise.append(("aggregated", rows["AReAM CAM pseudo labels (train)"].miou()))
    return rows, notes, background, layerwise


def write_layerwise(layerwise: List, out_dir: Path, label: str = "this model") -> str:
    """Markdown table + ``layerwise.json`` + ``layerwise.png`` of one model's layer-wise mIoU."""
    (out_dir / "layerwise.json").write_text(json.dumps({label: layerwise}, indent=2))
    plot_layerwise({label: layerwise}, out_dir / "layerwise.png")
    lines = ["| layer | pseudo-label mIoU |", "|---|---|"]
    lines += [f"| {name} | {100 * v:.1f} |" for name, v in layerwise]
    return "\n".join(lines) + "\n"


def plot_layerwise(curves: Dict[str, List], path: Path) -> None:
    """Line plot of per-layer mIoU (one line per model), aggregated values as dashed levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, points) in enumerate(curves.items()):
        layers = [(int(n.split()[1]), v) for n, v in points if n.startswith("layer ")]
        color = f"C{i}"
        ax.plot([l for l, _ in layers], [100 * v for _, v in layers], marker="o", color=color, label=label)
        agg = [v for n, v in points if n == "aggregated"]
        if agg:
            ax.axhline(100 * agg[0], color=color, linestyle="--", linewidth=1, label=f"{label}: aggregated")
    ax.set_xlabel("layer whose affinity re-activates the CAM")
    ax.set_ylabel("pseudo-label mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
