"""Tiny inputs for tests/test_recipes.py: the synthetic VOC-layout set, a COCO 2014 set in the
public layout, and a timm-format ViT checkpoint with the shrunk shape (what a user passes as
``model.pretrained``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.data.synthetic import make_synthetic_dataset

# The synthetic classes 1..3 become these COCO classes (person, cat, dog).
COCO_CLASS_OF = {1: 1, 2: 17, 3: 18}
COCO_NUM_CLASSES = 80


def make_voc(root, num_train: int, num_val: int, size: int, num_classes: int = 3, seed: int = 0) -> Path:
    """The synthetic set in the VOC layout; it writes ``ImageSets/Segmentation/{train,train_aug,val}.txt``,
    so configs naming ``train_aug`` (VOC's split) run as shipped."""
    root = make_synthetic_dataset(root, seed=seed, num_train=num_train, num_val=num_val, size=size,
                                  num_classes=num_classes)
    for split in ("train", "train_aug", "val"):
        assert (root / "ImageSets" / "Segmentation" / f"{split}.txt").is_file(), split
    return root


def make_coco_public(root, num_train: int, num_val: int, size: int, seed: int = 0) -> Path:
    """MS COCO 2014 in the layout the public WSSS releases use (ToCo / MCTformer)::

        JPEGImages/train/COCO_train2014_<12-digit id>.jpg   JPEGImages/val/COCO_val2014_<id>.jpg
        SegmentationClass/val/<12-digit id>.png             (no train masks: training must not need them)
        ImageSets/Segmentation/{train,val,val_part}.txt      (names COCO_<subset>2014_<id>)
        cls_labels_onehot.npy                                {name: float32 (80,)}

    Images and masks are the synthetic set's, its classes mapped to COCO class indices."""
    root = Path(root)
    src = make_synthetic_dataset(root.parent / (root.name + "_src"), seed=seed, num_train=num_train,
                                 num_val=num_val, size=size, num_classes=len(COCO_CLASS_OF))
    lut = np.arange(256, dtype=np.uint8)
    for k, v in COCO_CLASS_OF.items():
        lut[k] = v
    splits = root / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n, first_id in (("train", num_train, 100), ("val", num_val, 500)):
        (root / "JPEGImages" / split).mkdir(parents=True, exist_ok=True)
        if split == "val":
            (root / "SegmentationClass" / split).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            image_id = f"{first_id + i:012d}"
            name = f"COCO_{split}2014_{image_id}"
            names.append(name)
            shutil.copyfile(src / "JPEGImages" / f"{split}_{i:05d}.jpg", root / "JPEGImages" / split / f"{name}.jpg")
            with Image.open(src / "SegmentationClass" / f"{split}_{i:05d}.png") as im:
                mask = lut[np.array(im)]
            if split == "val":
                Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / split / f"{image_id}.png")
            onehot = np.zeros(COCO_NUM_CLASSES, dtype=np.float32)
            present = np.unique(mask)
            present = present[(present != 0) & (present != 255)].astype(np.int64)
            onehot[present - 1] = 1.0
            labels[name] = onehot
        (splits / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        if split == "val":
            (splits / "val_part.txt").write_text("".join(f"{n}\n" for n in names))
    with open(root / "cls_labels_onehot.npy", "wb") as f:
        np.save(f, labels, allow_pickle=True)
    return root


def make_tiny_pretrained(path, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                         seed: int = 0) -> Path:
    """A timm ViT state dict of the shrunk shape saved with ``torch.save``, as an ImageNet
    checkpoint downloaded from timm would be (random weights: only the format matters)."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, patch_size=patch_size, img_size=img_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
