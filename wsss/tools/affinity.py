"""Do an AReAM model's attention affinities carry meaning? Per-layer statistics of the head-mean
patch affinity against the ground-truth masks of the training split (``wsss.cam.affinity_statistics``).

    python -m wsss.tools.affinity --cfg configs/demo_aream.yaml --ckpt runs/demo_aream/checkpoint.pt \
        [--max-images N] [--size S] [key=value ...]

AReAM re-activates a CAM by multiplying it with the patch-to-patch attention of chosen layers
(SPEC §5). That keeps an object's score on the object only when a foreground patch attends
mostly to patches of its own object, as the shallow layers of an ImageNet-pretrained DeiT do
(local, similar-appearance attention). The table says, per layer, the share of a foreground
patch's patch attention that lands on its own class (and that share for uniform attention), the
attention's mass on patches, its mean distance (and a uniform row's), and how many queries
share one most-attended patch (sinks). Images are resized to S×S (bilinear, default
``data.crop_size``, the training input), masks to the token grid (nearest); the model in eval
mode. Writes ``<run_dir>/affinity.md`` and ``affinity.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

COLUMNS = (("object_share", "own-class share"), ("object_chance", "uniform share"), ("patch_mass", "mass on patches"),
           ("distance", "mean distance"), ("distance_uniform", "uniform distance"), ("sink", "sink fraction"))


@torch.no_grad()
def compute_affinity_statistics(model, seg_dataset, size: int, device, max_images: int = 0) -> Dict[str, List[float]]:
    """Per-layer statistics (``wsss.cam.affinity_statistics``) averaged over the first
    ``max_images`` items (0 = all) of a segmentation set (``image`` normalised, ``label``),
    each image resized to ``size × size``, the label to the token grid."""
    from wsss.cam import affinity_statistics
    from wsss.methods.base import resize_square

    if size % model.patch_size:
        raise ValueError(f"size {size} is not a multiple of the patch size {model.patch_size}")
    n = len(seg_dataset) if not max_images else min(max_images, len(seg_dataset))
    if n == 0:
        raise ValueError("the data set holds no images")
    model.eval()
    grid = size // model.patch_size
    total: Dict[str, torch.Tensor] = {}
    for i in range(n):
        item = seg_dataset[i]
        _, q, k = model.cam_and_qk(resize_square(item["image"][None].to(device), size))
        label = F.interpolate(item["label"][None, None].float(), size=(grid, grid), mode="nearest")[0].long()
        stats = affinity_statistics(q, k, label.to(device), model.attn_scale)
        for key, v in stats.items():
            total[key] = total.get(key, 0) + v.double().cpu()
    return {key: (v / n).tolist() for key, v in total.items()}


def format_table(stats: Dict[str, List[float]]) -> str:
    lines = ["| layer | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for layer in range(len(stats["object_share"])):
        lines.append(f"| {layer} | " + " | ".join(f"{stats[key][layer]:.2f}" for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.tools.affinity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config with model.method=aream")
    parser.add_argument("--ckpt", required=True, help="a trained AReAM checkpoint (wsss or official)")
    parser.add_argument("--max-images", type=int, default=0, help="images of the train split to use (0 = all)")
    parser.add_argument("--size", type=int, default=0, help="images are resized to size x size (0 = data.crop_size)")
    parser.add_argument("overrides", nargs="*")
    from wsss.utils.cli import parse_config

    args, cfg = parse_config(parser, argv)
    if cfg.model.method != "aream":
        parser.error(f"the affinity statistics need model.method=aream, the config has {cfg.model.method!r}")
    if args.size < 0:
        parser.error(f"--size must be >= 0 (0 = data.crop_size), got {args.size}")
    if args.max_images < 0:
        parser.error(f"--max-images must be >= 0 (0 = all), got {args.max_images}")
    if not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    from wsss.data import DatasetError, build_segmentation_set
    from wsss.eval.evaluate import load_model
    from wsss.utils.device import resolve_device

    try:
        ds = build_segmentation_set(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.cls_labels or None)
    except DatasetError as e:
        parser.error(f"data ({cfg.data.dataset} at data.root={cfg.data.root}, split {cfg.data.train_split}, "
                     f"with masks): {e}")
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg, args.ckpt, device)
    size = args.size or cfg.data.crop_size
    if size % model.patch_size:
        parser.error(f"--size {size} is not a multiple of the patch size {model.patch_size}")
    t0 = time.time()
    stats = compute_affinity_statistics(model, ds, size, device, args.max_images)
    table = format_table(stats)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = min(args.max_images or len(ds), len(ds))
    header = (f"Affinity statistics of `{args.ckpt}` on {images} images of {cfg.data.root} "
              f"({cfg.data.train_split}), {size}x{size}, {time.time() - t0:.1f} s\n\n")
    for name, text in (("affinity.md", header + table),
                       ("affinity.json", json.dumps({"statistics": stats, "images": images, "size": size,
                                                     "checkpoint": str(args.ckpt)}, indent=2))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    print(header + table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
