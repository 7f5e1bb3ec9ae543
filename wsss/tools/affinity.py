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
share one most-attended patch (sinks).

A second table asks how good an affinity must be for the re-activation to help on these images:
the model's class-attention-gated CAM (MCTformer's CAM, scale 1, no flip) scored as pseudo
labels as it is, re-activated by the model's own affinity (head mean, layers below
``aream.layer_index``, equal weights) and re-activated by mask-built reference affinities whose
rows put a share s of their mass uniformly on the query's own class and 1 − s uniformly on the
other classes' patches (s = 0.25 … 1; built from the ground truth: a yardstick, not a method;
s = 1 replaces each region by its mean, the best any affinity at token resolution can spread). Each row:
min-max normalised, upsampled to the image, best background threshold of ``eval.bkg_sweep``,
mIoU over the classes present.

Images are resized to S×S (bilinear, default ``data.crop_size``, the training input), masks to
the token grid (each token's majority label); the model in eval mode. Writes ``<run_dir>/affinity.md`` and
``affinity.json`` and prints both tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

REFERENCE_SHARES = (0.25, 0.5, 0.75, 0.9, 1.0)
COLUMNS = (("object_share", "own-class share"), ("object_chance", "uniform share"), ("patch_mass", "mass on patches"),
           ("distance", "mean distance"), ("distance_uniform", "uniform distance"), ("sink", "sink fraction"))


def token_labels(label: torch.Tensor, grid: int, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(1,grid,grid): the majority ground-truth label of each token's pixels (``label`` (H,W)
    with ``num_classes`` labels and ``ignore_index``; the image and its mask are squeezed to the
    same square)."""
    lab = label.long().clone()
    lab[lab == ignore_index] = num_classes
    onehot = F.one_hot(lab.clamp(0, num_classes), num_classes + 1).permute(2, 0, 1).float()[None]
    votes = F.adaptive_avg_pool2d(onehot, (grid, grid))[0].argmax(dim=0)
    return torch.where(votes == num_classes, ignore_index, votes)[None]


def reference_affinity(labels: torch.Tensor, share: float, ignore_index: int = 255) -> torch.Tensor:
    """(B,N,N) rows whose own-class share (``wsss.cam.affinity_statistics``) is ``share``: that
    mass spread uniformly over the patches of the query's own class, the rest uniformly over the
    patches of the other classes (ignored patches get none; a row with only one of the two parts
    — one class in the image, or an ignored query — puts everything there)."""
    lab = labels.flatten(1)
    valid = (lab != ignore_index)[:, None, :]
    same = (lab[:, :, None] == lab[:, None, :]) & valid
    other = ~same & valid
    own = same.float() / same.sum(-1, keepdim=True).clamp(min=1)
    rest = other.float() / other.sum(-1, keepdim=True).clamp(min=1)
    has_own, has_other = same.any(-1, keepdim=True), other.any(-1, keepdim=True)
    return torch.where(has_own & has_other, share * own + (1.0 - share) * rest, torch.where(has_own, own, rest))


@torch.no_grad()
def affinity_report(model, seg_dataset, size: int, device, layer_index: int, sweep, max_images: int = 0,
                    shares=REFERENCE_SHARES) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """One pass over the first ``max_images`` items (0 = all) of a segmentation set (``image``
    normalised, ``label``), each image resized to ``size × size`` and its label to the token grid
    (majority per token). Returns ``(statistics, reactivation)``: the per-layer statistics of
    ``wsss.cam.affinity_statistics`` averaged over the images, and the mIoU (best background
    threshold of ``sweep``) of the gated CAM as it is, re-activated by the model's affinity of
    layers ``[0, layer_index)`` and by :func:`reference_affinity` of each share."""
    from wsss.cam import _reactivate, affinity_statistics, cam_to_label, class_attention_gate, normalize_maps
    from wsss.eval.metrics import ConfusionMatrix
    from wsss.methods.base import image_size, resize_square, to_label_size

    if size % model.patch_size:
        raise ValueError(f"size {size} is not a multiple of the patch size {model.patch_size}")
    n = len(seg_dataset) if not max_images else min(max_images, len(seg_dataset))
    if n == 0:
        raise ValueError("the data set holds no images")
    model.eval()
    grid = size // model.patch_size
    K = seg_dataset.num_classes + 1
    names = (["gated CAM, no re-activation", f"model affinity, layers 0-{layer_index - 1}"]
             + [f"reference affinity, own-class share {s:g}" for s in shares])
    mats = {name: {t: ConfusionMatrix(K) for t in sweep} for name in names}
    total: Dict[str, torch.Tensor] = {}
    for i in range(n):
        item = seg_dataset[i]
        cam, q, k = model.cam_and_qk(resize_square(item["image"][None].to(device), size))
        label = token_labels(item["label"], grid, K).to(device)
        for key, v in affinity_statistics(q, k, label, model.attn_scale).items():
            total[key] = total.get(key, 0) + v.double().cpu()
        gated = cam.float() * class_attention_gate(q, k, cam.shape[1], cam.shape[-2:], model.attn_scale)
        maps = [gated, _reactivate(gated, q, k, slice(0, layer_index), None, model.attn_scale, "reference")]
        flat = gated.flatten(2)  # (1,C,N)
        for share in shares:
            maps.append((flat @ reference_affinity(label, share).transpose(1, 2)).reshape(gated.shape))
        y = item["cls_label"][None].to(device)
        for name, m in zip(names, maps):
            m = normalize_maps(to_label_size(m, image_size(item)))
            for t in sweep:
                mats[name][t].update(cam_to_label(m, y, bkg_thre=t)[1][0], item["label"])
    stats = {key: (v / n).tolist() for key, v in total.items()}
    return stats, {name: max(mat.miou() for mat in by_t.values()) for name, by_t in mats.items()}


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
    from wsss.utils.checkpoint import write_text_atomic
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
    layer_index = cfg.aream.layer_index
    if not 1 <= layer_index <= model.depth:
        parser.error(f"aream.layer_index={layer_index} must be in [1, {model.depth}] for this {model.depth}-block model")
    sweep = tuple(float(t) for t in cfg.eval.bkg_sweep)
    t0 = time.time()
    stats, curve = affinity_report(model, ds, size, device, layer_index, sweep, args.max_images)
    table = format_table(stats)
    table += ("\nPseudo-label mIoU (%) of the gated CAM re-activated by each affinity (scale 1, best background "
              f"threshold of {list(sweep)})\n\n| affinity | mIoU |\n|---|---|\n"
              + "".join(f"| {name} | {100 * v:.1f} |\n" for name, v in curve.items()))
    out = Path(cfg.run_dir)
    images = min(args.max_images or len(ds), len(ds))
    header = (f"Affinity statistics of `{args.ckpt}` on {images} images of {cfg.data.root} "
              f"({cfg.data.train_split}), {size}x{size}, {time.time() - t0:.1f} s\n\n")
    write_text_atomic(out / "affinity.md", header + table)
    write_text_atomic(out / "affinity.json", json.dumps({"statistics": stats, "reactivation": curve, "images": images,
                                                         "size": size, "checkpoint": str(args.ckpt)}, indent=2))
    print(header + table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
