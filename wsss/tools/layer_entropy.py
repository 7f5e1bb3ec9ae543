"""Per-layer attention entropies of a trained AReAM classifier (SPEC §5, the official offline way).

    python -m wsss.tools.layer_entropy --cfg configs/voc_aream.yaml --ckpt runs/voc_aream_cls/checkpoint.pt \
        [--out entropy.json] [--max-images N] [key=value ...]

One pass over the training split, one image at a time at its own size (rounded to the patch
size), no augmentation: for each layer the CAMs of the image's classes are re-activated by that
layer's head-mean patch affinity, summed, soft-maxed over positions, and the entropy in bits is
averaged over the images. Only image-level labels are read. The JSON file it writes is what
``aream.entropy=offline aream.entropy_file=...`` trains with.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def compute_layer_entropy(model, dataset, device, max_images: int = 0, impl: str = "auto") -> torch.Tensor:
    """Mean per-layer entropy in bits (L,) over the first ``max_images`` images (0 = all)."""
    from wsss.cam import _scaled_size, layer_entropy_bits

    n = len(dataset) if not max_images else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("the data set holds no images")
    total = torch.zeros(model.depth, dtype=torch.float64)
    for i in tqdm(range(n), desc="layer entropy", disable=not sys.stderr.isatty()):
        item = dataset[i]
        image = item["image"][None].to(device)
        size = _scaled_size(image.shape[-2:], 1.0, model.patch_size)
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        cam, q, k = model.cam_and_qk(image)
        total += layer_entropy_bits(cam, q, k, item["cls_label"][None].to(device), model.attn_scale,
                                    impl)[:, 0].double().cpu()
    return (total / n).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.tools.layer_entropy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config with model.method=aream")
    parser.add_argument("--ckpt", required=True, help="checkpoint of a classifier-trained AReAM model")
    parser.add_argument("--out", default=None, help="JSON file to write (default <run_dir>/layer_entropy.json)")
    parser.add_argument("--max-images", type=int, default=0, help="images of the train split to use (0 = all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from wsss.config import ConfigError, load_config

    try:
        cfg = load_config(args.cfg, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if cfg.model.method != "aream":
        parser.error(f"layer entropies need model.method=aream, the config has {cfg.model.method!r}")
    from wsss.cam import normalize_entropy
    from wsss.data import build_datasets
    from wsss.eval.evaluate import load_model
    from wsss.utils.device import resolve_device
    from wsss.utils.logging import setup_logging

    log = setup_logging(None, "layer_entropy")
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg, args.ckpt, device)
    _, train_seg, _ = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.val_split,
                                     cfg.data.crop_size, cls_labels=cfg.data.cls_labels or None)
    t0 = time.time()
    entropy = compute_layer_entropy(model, train_seg, device, args.max_images, cfg.impl)
    out = Path(args.out or Path(cfg.run_dir) / "layer_entropy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"entropy_bits": entropy.tolist(), "normalized": normalize_entropy(entropy).tolist(),
              "images": min(args.max_images or len(train_seg), len(train_seg)), "checkpoint": str(args.ckpt),
              "data": cfg.data.root, "split": cfg.data.train_split,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    log.info("layer entropies (bits) %s in %.1fs -> %s", " ".join(f"{v:.3f}" for v in entropy.tolist()),
             time.time() - t0, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
