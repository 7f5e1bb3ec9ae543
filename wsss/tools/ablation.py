"""Ablations on one config: MoRe (full, GCR off, LIR off, both off) or AReAM (no affinity
loss, affinity loss without entropy weights, full), chosen by ``model.method``.

    python -m wsss.tools.ablation --cfg configs/demo.yaml [key=value ...]
    python -m wsss.tools.ablation --cfg configs/demo_aream.yaml [key=value ...]

Trains and evaluates each variant into ``<run_dir>/ablation/<variant>``, then writes
``<run_dir>/ablation/results.md`` (the measured table). MoRe adds PNG panels
``image | CAM | LAM without GCR/LIR | LAM`` that show what the two modules change; AReAM adds
``layerwise.png``, the per-layer pseudo-label mIoU with and without AReAM, and per variant and
layer the share of a foreground patch's attention that stays on its own class
(``wsss.tools.affinity``), which says whether the affinities can re-activate a CAM at all.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

VARIANTS = {
    "full": [],
    "no GCR": ["model.gcr=false"],
    "no LIR": ["loss.w_cle=0", "loss.w_une=0"],
    "no GCR, no LIR": ["model.gcr=false", "loss.w_cle=0", "loss.w_une=0"],
}
ROWS = ("E1 LAM pseudo labels (train)", "extra: LAM + PAR pseudo labels (train)", "E1 CAM pseudo labels (train)",
        "E3 segmentation (val)")
# E1/E3 and the PAR extra; the LAM protocols only for variants with GCR
MORE_PROTOCOLS = {True: "eval.protocols=[E1-CAM,E1-LAM,E3,extra-LAM]", False: "eval.protocols=[E1-CAM,E3]"}
AREAM_VARIANTS = {
    "no affinity loss, no entropy weights": ["aream.w_aff=0", "aream.entropy=none", "eval.layerwise=true"],
    "affinity loss, no entropy weights": ["aream.entropy=none", "eval.layerwise=false"],
    "AReAM (affinity loss + entropy weights)": ["eval.layerwise=true"],
}
AREAM_ROWS = ("CAM pseudo labels (train)", "gated CAM pseudo labels (train)", "AReAM CAM pseudo labels (train)",
              "AReAM CAM + PAR pseudo labels (train)")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _finished_checkpoint(cfg):
    """The variant's checkpoint if a finished run of it is already there, else None."""
    path = Path(cfg.run_dir) / "checkpoint.pt"
    if not path.is_file():
        return None
    from wsss.utils.checkpoint import read_torch_file

    return path if int(read_torch_file(path).get("step", -1)) == cfg.train.max_iters else None


def run_ablation(cfg_path, overrides, variants=None, reuse: bool = False):
    from wsss.config import load_config
    from wsss.eval.evaluate import evaluate
    from wsss.train.loop import train

    base = load_config(cfg_path, overrides)
    if base.model.method not in ("more", "aream"):
        raise ValueError(f"the ablation needs model.method=more or aream, the config has {base.model.method!r}")
    aream = base.model.method == "aream"
    table_of, rows = (AREAM_VARIANTS, AREAM_ROWS) if aream else (VARIANTS, ROWS)
    variants = tuple(variants or table_of)
    out = Path(base.run_dir) / "ablation"
    results, ckpts, curves, affinity = {}, {}, {}, {}
    for name in variants:
        if name not in table_of:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(table_of)}")
        extra = table_of[name] + [f"run_dir={out / _slug(name)}"]
        if not aream:
            extra.append(MORE_PROTOCOLS["model.gcr=false" not in table_of[name]])
        cfg = load_config(cfg_path, list(overrides) + extra)
        ckpt = _finished_checkpoint(cfg) if reuse else None
        ckpts[name] = (cfg, ckpt or train(cfg))
        result = evaluate(cfg, ckpts[name][1])
        results[name] = {r["result"]: r["miou"] for r in result["table"]}
        if result["series"].get("layerwise"):
            curves[name] = result["series"]["layerwise"]
        if aream:
            affinity[name] = _affinity(cfg, ckpts[name][1])
    lines = [f"Ablation of `{cfg_path}` {' '.join(overrides)} (mIoU, %)", "",
             "| variant | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for name, res in results.items():
        cells = [f"{100 * res[r]:.1f}" if r in res else "—" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if curves:
        from wsss.eval.report import plot_series

        plot_series(curves, out / "layerwise.png", xlabel="layer whose affinity re-activates the gated CAM")
        names = list(curves)
        layers = [n for n, _ in curves[names[0]]]
        table += ("\nLayer-wise pseudo-label mIoU (%) of the CAM re-activated by one layer's affinity "
                  "(`layerwise.png`)\n\n| layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
        for i, layer in enumerate(layers):
            table += f"| {layer} | " + " | ".join(f"{100 * curves[n][i][1]:.1f}" for n in names) + " |\n"
    if affinity:
        names = list(affinity)
        chance = next(iter(affinity.values()))["object_chance"][0]
        table += ("\nShare of a foreground patch's patch attention on its own class, per layer (`wsss.tools.affinity`; "
                  f"uniform attention: {chance:.2f}; the re-activation keeps a score on its object only well above 0.5)"
                  "\n\n| layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
        for i in range(len(affinity[names[0]]["object_share"])):
            table += f"| {i} | " + " | ".join(f"{affinity[n]['object_share'][i]:.2f}" for n in names) + " |\n"
        table += ("\nPseudo-label mIoU (%) of the gated CAM re-activated by the model's affinity and by mask-built "
                  "reference affinities of a given own-class share (`wsss.tools.affinity`; scale 1, best background "
                  "threshold)\n\n| affinity | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
        for row in affinity[names[0]]["reactivation"]:
            table += f"| {row} | " + " | ".join(f"{100 * affinity[n]['reactivation'][row]:.1f}" for n in names) + " |\n"
    (out / "results.md").write_text(table)
    if "full" in ckpts and "no GCR, no LIR" in ckpts:
        write_panels(ckpts["full"], ckpts["no GCR, no LIR"], out / "panels")
    return table


def _affinity(cfg, ckpt):
    """``wsss.tools.affinity``'s statistics and re-activation table of a variant on its
    ``eval.train_images`` train images."""
    from wsss.data import build_segmentation_set
    from wsss.eval.evaluate import load_model
    from wsss.utils.device import resolve_device

    from .affinity import affinity_report

    device = resolve_device(cfg.device)
    model, _ = load_model(cfg, ckpt, device)
    ds = build_segmentation_set(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.cls_labels or None)
    stats, reactivation = affinity_report(model, ds, cfg.data.crop_size, device, cfg.aream.layer_index,
                                          tuple(float(t) for t in cfg.eval.bkg_sweep), cfg.eval.train_images)
    return {**stats, "reactivation": reactivation}


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
                               cfg.data.crop_size, cls_labels=cfg.data.cls_labels or None, train_masks=False)
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
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate a variant's finished checkpoint instead of training it again")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from wsss.utils.logging import setup_logging

    setup_logging(None, "ablation")
    print(run_ablation(args.cfg, args.overrides, reuse=args.reuse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
