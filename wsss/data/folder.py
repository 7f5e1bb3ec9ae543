"""Images without segmentation masks, for prediction (``python -m wsss.infer``).

- :class:`ImageFolder`: the images (JPEG, PNG, BMP, WebP, TIFF; any size, any colour mode) in a
  folder, optionally with its sub-folders. An item's name is its path relative to the folder
  without the extension (``street/dog``), so outputs mirror the folder.
- :func:`split_images`: the images of one split of a VOC-style data set (VOC, COCO, the
  synthetic set) read through the data set's own layout, with no mask read or required — a VOC
  ``test`` split has none. The evaluation sets (:class:`~wsss.data.voc.SegmentationDataset`) keep
  requiring masks.

Items: ``name``, ``image`` (3,H,W) float32 normalised at the original size, ``image_uint8``
(H,W,3) uint8, and ``cls_label`` (C,) float32 when the image-level label file has the image.
They never hold a ``label``. Problems raise :class:`~wsss.data.voc.DatasetError` naming the path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import COCO_CLASSES, _COCOLayout
from .transforms import normalize
from .voc import VOC_CLASSES, DatasetError, VOCStyleDataset, load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _item(name: str, rgb: np.ndarray, cls_label=None) -> Dict:
    item = {"name": name, "image": normalize(rgb), "image_uint8": torch.from_numpy(rgb)}
    if cls_label is not None:
        item["cls_label"] = torch.from_numpy(np.array(cls_label, dtype=np.float32))
    return item


class ImageFolder(Dataset):
    """Every image file in ``root`` (and below it with ``recursive``), sorted by relative path.
    Hidden files and folders are skipped, and so is everything under ``exclude`` (an output
    folder inside ``root`` is not read back as input)."""

    def __init__(self, root, recursive: bool = False, exclude=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder not found: {self.root}")
        exclude = Path(exclude).resolve() if exclude else None
        pattern = "**/*" if recursive else "*"
        files = []
        for path in self.root.glob(pattern):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
                continue
            if path.is_file():
                files.append(rel)
        if not files:
            where = "or below it" if recursive else "(sub-folders are read with recursive)"
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.root} {where}")
        files.sort(key=lambda p: p.as_posix())
        self.files = files
        self.names = [p.with_suffix("").as_posix() for p in files]
        seen: Dict[str, Path] = {}
        for name, rel in zip(self.names, files):
            if name in seen:  # a.jpg and a.png would write the same a.png
                raise DatasetError(f"{self.root / seen[name]} and {self.root / rel} have the same name without "
                                   f"the extension; rename one")
            seen[name] = rel

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict:
        return _item(self.names[index], load_rgb(self.root / self.files[index]))


class SplitImages(VOCStyleDataset):
    """The images of split ``split`` of a VOC-layout data set; see the module docstring."""

    def __init__(self, root, split: str, cls_labels=None):
        super().__init__(root, split, cls_labels, require_cls_labels=False)
        self._check_images_exist()

    def has_image_label(self, name: str) -> bool:
        return name in self.cls_labels

    def __getitem__(self, index: int) -> Dict:
        name = self.names[index]
        return _item(name, load_rgb(self.image_path(name)), self.cls_labels.get(name))


class COCOSplitImages(_COCOLayout, SplitImages):
    """The images of a COCO 2014 split in either layout (:mod:`wsss.data.coco`), no masks."""


SPLIT_IMAGES = {"voc": SplitImages, "coco": COCOSplitImages}


def split_images(dataset: str, root, split: str, cls_labels=None) -> SplitImages:
    """The images of ``split`` under ``root`` (``dataset`` "voc" or "coco"), masks never read."""
    if dataset not in SPLIT_IMAGES:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(SPLIT_IMAGES))}")
    return SPLIT_IMAGES[dataset](root, split, cls_labels=cls_labels or None)


def class_names_for(num_classes: int, root=None) -> List[str]:
    """C+1 names (background first) for the classes of a model with ``num_classes`` classes:
    ``<root>/classes.txt`` when it lists C+1 names (the synthetic set, custom sets), else VOC's or
    COCO's when C is 20 or 80, else ``class_1`` … ``class_C``."""
    path = Path(root) / "classes.txt" if root else None
    if path is not None and path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) == num_classes + 1:
            return names
    for names in (VOC_CLASSES, COCO_CLASSES):
        if len(names) == num_classes + 1:
            return list(names)
    return ["background"] + [f"class_{i}" for i in range(1, num_classes + 1)]


__all__ = ["IMAGE_EXTENSIONS", "COCOSplitImages", "ImageFolder", "SplitImages", "class_names_for", "split_images"]
