"""Per-layer attention entropies of a trained AReAM classifier (SPEC §5, the official offline way,
``ent_voc_mctformer.py``).

    python -m wsss.tools.layer_entropy --cfg configs/voc_aream.yaml --ckpt runs/voc_aream_cls/checkpoint_best.pt \
        [--out entropy.json] [--max-images N] [--size S] [key=value ...]

One pass over the training split (``data.train_split``), one image at a time, resized to S×S
(bicubic; default ``data.crop_size``, 224 in the VOC recipe), no augmentation, the model in eval
mode: for each layer the raw CAMs (the head's ReLU output, not normalised) of the image's
classes are re-activated by that layer's head-mean patch affinity, summed, soft-maxed over
positions, and the entropy in bits is averaged over the images. Only the images and their
image-level labels are read (no segmentation masks). The JSON file it writes is what
``aream.entropy=offline aream.entropy_file=...`` trains with.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm


class ResizedImages(Dataset):
    """The images of a classification set (its split list, image files and image-level labels),
    each resized to ``size × size`` with PIL's bicubic filter and normalised; no augmentation.
    Items: ``name``, ``image`` (3,S,S), ``cls_label`` (C,)."""

    def __init__(self, cls_ds, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.cls_ds, self.size = cls_ds, int(size)

    def __len__(self) -> int:
        return len(self.cls_ds.names)

    def __getitem__(self, index: int) -> dict:
        from wsss.data.transforms import normalize
        from wsss.data.voc import load_rgb

        name = self.cls_ds.names[index]
        rgb = Image.fromarray(load_rgb(self.cls_ds.image_path(name))).resize((self.size, self.size), Image.BICUBIC)
        return {"name": name, "image": normalize(np.asarray(rgb)),
                "cls_label": torch.from_numpy(np.array(self.cls_ds.cls_labels[name], dtype=np.float32))}


@torch.no_grad()
def compute_layer_entropy(model, dataset, device, max_images: int = 0, impl: str = "auto") -> torch.Tensor:
    """Mean per-layer entropy in bits (L,) over the first ``max_images`` items (0 = all) of
    ``dataset`` (``image`` (3,H,W) at a multiple of the patch size, ``cls_label`` (C,)), the model
    in eval mode and its raw CAM (SPEC §5)."""
    from wsss.cam import layer_entropy_bits

    n = len(dataset) if not max_images else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("the data set holds no images")
    model.eval()
    total = torch.zeros(model.depth, dtype=torch.float64)
    for i in tqdm(range(n), desc="layer entropy", disable=not sys.stderr.isatty()):
        item = dataset[i]
        cam, q, k = model.cam_and_qk(item["image"][None].to(device))
        total += layer_entropy_bits(cam, q, k, item["cls_label"][None].to(device), model.attn_scale, impl,
                                    normalize=False)[:, 0].double().cpu()
    return (total / n).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.tools.layer_entropy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config with model.method=aream")
    parser.add_argument("--ckpt", required=True, help="checkpoint of a classifier-trained AReAM model")
    parser.add_argument("--out", default=None, help="JSON file to write (default <run_dir>/layer_entropy.json)")
    parser.add_argument("--max-images", type=int, default=0, help="images of the train split to use (0 = all)")
    parser.add_argument("--size", type=int, default=0, help="images are resized to size x size (0 = data.crop_size)")
    parser.add_argument("overrides", nargs="*")
    from wsss.utils.cli import parse_config

    args, cfg = parse_config(parser, argv)
    if cfg.model.method != "aream":
        parser.error(f"layer entropies need model.method=aream, the config has {cfg.model.method!r}")
    from wsss.cam import normalize_entropy
    from wsss.data import DATASETS, DatasetError
    from wsss.eval.evaluate import load_model
    from wsss.utils.checkpoint import write_text_atomic
    from wsss.utils.device import resolve_device
    from wsss.utils.logging import setup_logging

    log = setup_logging(None, "layer_entropy")
    device = resolve_device(cfg.device)
    if args.size < 0:
        parser.error(f"--size must be >= 0 (0 = data.crop_size), got {args.size}")
    size = args.size or cfg.data.crop_size
    try:
        cls_ds = DATASETS[cfg.data.dataset][0](cfg.data.root, cfg.data.train_split, crop_size=size,
                                               cls_labels=cfg.data.cls_labels or None, seed=cfg.seed)
    except DatasetError as e:
        parser.error(f"data ({cfg.data.dataset} at data.root={cfg.data.root}): {e}")
    model, _ = load_model(cfg, args.ckpt, device)
    if size % model.patch_size:
        parser.error(f"--size {size} is not a multiple of the patch size {model.patch_size}")
    images = ResizedImages(cls_ds, size)
    t0 = time.time()
    entropy = compute_layer_entropy(model, images, device, args.max_images, cfg.impl)
    out = Path(args.out or Path(cfg.run_dir) / "layer_entropy.json")
    record = {"entropy_bits": entropy.tolist(), "normalized": normalize_entropy(entropy).tolist(),
              "images": min(args.max_images or len(images), len(images)), "size": size,
              "checkpoint": str(args.ckpt), "data": cfg.data.root, "split": cfg.data.train_split,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_text_atomic(out, json.dumps(record, indent=2))
    log.info("layer entropies (bits) %s in %.1fs -> %s", " ".join(f"{v:.3f}" for v in entropy.tolist()),
             time.time() - t0, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
