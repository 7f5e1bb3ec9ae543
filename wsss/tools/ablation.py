"""MoRe ablation on one config: full, GCR off, LIR off, both off.

    python -m wsss.tools.ablation --cfg configs/demo.yaml [key=value ...]

Trains and evaluates each variant into ``<run_dir>/ablation/<variant>``, then writes
``<run_dir>/ablation/results.md`` (the measured table) and PNG panels
``image | CAM | LAM without GCR/LIR | LAM`` that show what the two modules change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

VARIANTS = {
    "full": [],
    "no GCR": ["model.gcr=false"],
    "no LIR": ["loss.w_cle=0", "loss.w_une=0"],
    "no GCR, no LIR": ["model.gcr=false", "loss.w_cle=0", "loss.w_une=0"],
}
ROWS = ("LAM pseudo labels (train)", "LAM + PAR pseudo labels (train)", "CAM pseudo labels (train)",
        "segmentation (val)")


def _slug(name: str) -> str:
    return name.replace(",", "").replace(" ", "_").lower()


def run_ablation(cfg_path, overrides, variants=tuple(VARIANTS)):
    from wsss.config import load_config
    from wsss.eval.evaluate import evaluate
    from wsss.train.loop import train

    base = load_config(cfg_path, overrides)
    if base.model.method != "more":
        raise ValueError(f"the ablation needs model.method=more, the config has {base.model.method!r}")
    out = Path(base.run_dir) / "ablation"
    results, ckpts = {}, {}
    for name in variants:
        cfg = load_config(cfg_path, list(overrides) + VARIANTS[name] + [f"run_dir={out / _slug(name)}"])
        ckpts[name] = (cfg, train(cfg))
        results[name] = {r["result"]: r["miou"] for r in evaluate(cfg, ckpts[name][1])["table"]}
    lines = [f"Ablation of `{cfg_path}` {' '.join(overrides)} (mIoU, %)", "",
             "| variant | " + " | ".join(ROWS) + " |", "|---|" + "---|" * len(ROWS)]
    for name, res in results.items():
        cells = [f"{100 * res[r]:.1f}" if r in res else "—" for r in ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    if "full" in ckpts and "no GCR, no LIR" in ckpts:
        write_panels(ckpts["full"], ckpts["no GCR, no LIR"], out / "panels")
    return table


@torch.no_grad()
def write_panels(full, plain, panel_dir: Path, count: int = 4):
    """image | CAM | LAM without GCR/LIR | LAM on the first val images."""
    from wsss.cam import multi_scale_cam, multi_scale_lam
    from wsss.data import build_datasets
    from wsss.eval.evaluate import load_model
    from wsss.eval.report import heatmap, save_panel
    from wsss.utils.device import resolve_device

    cfg, ckpt = full
    device = resolve_device(cfg.device)
    model_full, _ = load_model(cfg, ckpt, device)
    model_plain, _ = load_model(plain[0], plain[1], device)
    _, _, val = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.val_split,
                               cfg.data.crop_size, cls_labels=cfg.data.cls_labels or None)
    panel_dir.mkdir(parents=True, exist_ok=True)
    scales = tuple(cfg.eval.cam_scales)
    for i in range(min(count, len(val))):
        item = val[i]
        image = item["image"][None].to(device)
        y = item["cls_label"][None, :, None, None].to(device)
        maps = [multi_scale_cam(model_full, image, scales)[0], multi_scale_lam(model_plain, image, scales),
                multi_scale_lam(model_full, image, scales)]
        tiles = [item["image_uint8"].numpy()] + [heatmap((m * y)[0].amax(0).cpu().numpy()) for m in maps]
        save_panel(panel_dir / f"{item['name']}.png", tiles, ["image", "CAM", "LAM w/o GCR+LIR", "LAM"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.tools.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from wsss.utils.logging import setup_logging

    setup_logging(None, "ablation")
    print(run_ablation(args.cfg, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
