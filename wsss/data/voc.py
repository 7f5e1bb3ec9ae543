"""PASCAL VOC 2012 data sets (SPEC §1) and the shared machinery of the VOC-style layouts.

Layout under ``root``: ``JPEGImages/<name>.jpg``, ``SegmentationClassAug/<name>.png`` (palette
PNGs of class indices 0..C, 255 = ignore), split lists ``ImageSets/Segmentation/<split>.txt``
(one image id per line) and the image-level labels ``cls_labels.npy`` or
``cls_labels_onehot.npy`` (a pickled dict ``{name: array of length C}``). An optional
``classes.txt`` (one name per line, background first) names the classes.

Bad data raises one :class:`DatasetError` naming the offending path: missing root, split file
or listed files (checked at construction), an empty split, a name without an image-level
label, and — when an item is loaded — an unreadable image or label values outside 0..C, 255.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .transforms import TrainTransform, normalize

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE_INDEX = 255
CLS_LABEL_FILES = ("cls_labels.npy", "cls_labels_onehot.npy")


class DatasetError(ValueError):
    """Missing, inconsistent or corrupt data; the message names the offending path."""


def load_cls_labels(path) -> Dict[str, np.ndarray]:
    """Image-level labels: a pickled dict ``{name: array (C,)}`` → ``{name: float32 (C,)}``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image-level label file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=True)
        obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except Exception as e:  # np.load raises many types for a corrupt file
        raise DatasetError(f"cannot read image-level labels from {path}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict {{name: one-hot array}}, got {type(obj).__name__}")
    if not obj:
        raise DatasetError(f"{path}: the image-level label dict is empty")
    labels, lengths = {}, {}
    for name, value in obj.items():
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: label of {name!r} is not numeric: {e}") from e
        if arr.ndim != 1:
            raise DatasetError(f"{path}: label of {name!r} must be a 1-D array, got shape {arr.shape}")
        lengths.setdefault(arr.shape[0], name)
        labels[str(name)] = arr
    if len(lengths) > 1:
        examples = ", ".join(f"{n!r} has {c}" for c, n in sorted(lengths.items()))
        raise DatasetError(f"{path}: label arrays differ in length ({examples})")
    return labels


def read_split(path) -> List[str]:
    """Image ids of a split list, one per line (the first whitespace-separated field)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"split file is empty: {path}")
    return names


def load_rgb(path) -> np.ndarray:
    """An image file as uint8 (H,W,3) RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_index_label(path, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A segmentation label PNG (class indices) as uint8 (H,W); values must lie in 0..C or be
    ``ignore_index``."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"segmentation label {path} must be a palette or grey PNG of class "
                                   f"indices, got mode {im.mode}")
            label = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read segmentation label {path}: {e}") from e
    values = np.unique(label)
    bad = values[(values > num_classes) & (values != ignore_index)]
    if bad.size:
        raise DatasetError(f"segmentation label {path} has values {bad.tolist()} outside 0..{num_classes} "
                           f"and {ignore_index}")
    return label


def labels_from_mask(label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Image-level one-hot (C,) float32: the classes present except background and ignore."""
    values = np.unique(label)
    values = values[(values != 0) & (values != ignore_index)].astype(np.int64)
    out = np.zeros(num_classes, dtype=np.float32)
    out[values - 1] = 1.0
    return out


def _check_files_exist(paths: Sequence[str], what: str, split_file: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{what} listed in {split_file} not found: {missing[0]}{more}")


class VOCStyleDataset(Dataset):
    """Shared core of the VOC-style data sets: root, split list, image-level labels and class
    names. Subclasses say where files live through :meth:`image_path` / :meth:`label_path`."""

    default_num_classes = 20
    default_class_names: Sequence[str] = VOC_CLASSES
    default_label_dir = "SegmentationClassAug"

    def __init__(self, root, split: str, cls_labels=None, require_cls_labels: bool = True,
                 label_dir: Optional[str] = None, ignore_index: int = IGNORE_INDEX):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"data set root not found: {self.root}")
        self.split = split
        self.label_dir = label_dir or self.default_label_dir
        self.ignore_index = int(ignore_index)
        self.split_file = self.split_path(split)
        self.names = read_split(self.split_file)
        self.cls_labels_path = self._resolve_cls_labels(cls_labels, require_cls_labels)
        self.cls_labels = load_cls_labels(self.cls_labels_path) if self.cls_labels_path else {}
        self._add_cls_label_aliases()
        if self.cls_labels:
            self._num_classes = len(next(iter(self.cls_labels.values())))
        else:
            names = self._read_class_names()
            self._num_classes = len(names) - 1 if names else self.default_num_classes
        self._class_names = self._make_class_names()
        log.debug("%s: split %r of %s, %d images, %d classes", type(self).__name__, split, self.root,
                  len(self.names), self._num_classes)

    # -- layout hooks ---------------------------------------------------------------------
    def split_path(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        return self.root / self.label_dir / f"{name}.png"

    def cls_label_aliases(self, name: str) -> Sequence[str]:
        """Other keys under which the image-level label of ``name`` may be stored (none for VOC)."""
        return ()

    def _check_images_exist(self) -> None:
        _check_files_exist([str(self.image_path(n)) for n in self.names], "image", self.split_file)

    def _check_labels_exist(self) -> None:
        _check_files_exist([str(self.label_path(n)) for n in self.names], "segmentation label", self.split_file)

    # -- classes --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes."""
        return self._num_classes

    @property
    def class_names(self) -> List[str]:
        """C+1 names, background first."""
        return list(self._class_names)

    def _read_class_names(self) -> Optional[List[str]]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return None
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise DatasetError(f"{path}: expected background plus at least one class name, got {len(names)} lines")
        return names

    def _make_class_names(self) -> List[str]:
        C = self._num_classes
        names = self._read_class_names()
        if names is not None:
            if len(names) != C + 1:
                raise DatasetError(f"{self.root / 'classes.txt'} lists {len(names)} names but the image-level "
                                   f"labels have {C} classes (expected {C + 1} names, background first)")
            return names
        if C == len(self.default_class_names) - 1:
            return list(self.default_class_names)
        return ["background"] + [f"class_{i}" for i in range(1, C + 1)]

    def _resolve_cls_labels(self, cls_labels, required: bool) -> Optional[Path]:
        if cls_labels:
            path = Path(cls_labels)
            if not path.is_file():
                raise DatasetError(f"image-level label file not found: {path}")
            return path
        for fname in CLS_LABEL_FILES:
            if (self.root / fname).is_file():
                return self.root / fname
        if required:
            raise DatasetError(f"no image-level label file in {self.root} (looked for {', '.join(CLS_LABEL_FILES)})")
        return None

    def _add_cls_label_aliases(self) -> None:
        if not self.cls_labels:
            return
        for name in self.names:
            if name not in self.cls_labels:
                alias = next((a for a in self.cls_label_aliases(name) if a in self.cls_labels), None)
                if alias is not None:
                    self.cls_labels[name] = self.cls_labels[alias]

    def _check_cls_label_entries(self) -> None:
        missing = [n for n in self.names if n not in self.cls_labels]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"{self.cls_labels_path} has no image-level label for {missing[0]!r}{more} "
                               f"listed in {self.split_file}")

    def __len__(self) -> int:
        return len(self.names)


class ClassificationDataset(VOCStyleDataset):
    """Training images with image-level labels, augmented by :class:`TrainTransform`.

    Items: ``name``, ``image`` (3,S,S) float32 normalised, ``cls_label`` (C,) float32, ``valid``
    (S,S) bool. Item ``i`` in epoch ``e`` is augmented with ``np.random.default_rng([seed, e, i])``,
    so the result does not depend on the worker that loads it.
    """

    def __init__(self, root, split: str = "train_aug", crop_size: int = 448, cls_labels=None, aug: str = "more",
                 seed: int = 0, ignore_index: int = IGNORE_INDEX):
        super().__init__(root, split, cls_labels, require_cls_labels=True, ignore_index=ignore_index)
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.transform = TrainTransform(crop_size, mode=aug, ignore_index=ignore_index)
        self.seed = int(seed)
        self.epoch = 0
        self._check_cls_label_entries()
        self._check_images_exist()

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Dict:
        name = self.names[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        image, valid, _ = self.transform(load_rgb(self.image_path(name)), rng)
        return {"name": name, "image": image, "cls_label": torch.from_numpy(self.cls_labels[name].copy()),
                "valid": valid}


class SegmentationDataset(VOCStyleDataset):
    """Images with segmentation labels, for evaluation.

    Items: ``name``; ``image`` (3,H',W') float32 normalised — resized to (resize, resize) bilinearly
    when ``resize`` is set, else at the original size; ``label`` (H,W) int64 at the original size;
    ``cls_label`` (C,) float32 (from the image-level label file, else derived from ``label``);
    ``image_uint8`` (H,W,3) uint8 at the original size.
    """

    def __init__(self, root, split: str = "val", cls_labels=None, label_dir: Optional[str] = None,
                 resize: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__(root, split, cls_labels, require_cls_labels=False, label_dir=label_dir,
                         ignore_index=ignore_index)
        if resize is not None and (not isinstance(resize, (int, np.integer)) or resize < 1):
            raise ValueError(f"resize must be None or a positive int, got {resize!r}")
        self.resize = int(resize) if resize else None
        self._check_images_exist()
        self._check_labels_exist()

    def __getitem__(self, index: int) -> Dict:
        name = self.names[index]
        image_path, label_path = self.image_path(name), self.label_path(name)
        rgb = load_rgb(image_path)
        label = load_index_label(label_path, self.num_classes, self.ignore_index)
        if label.shape != rgb.shape[:2]:
            raise DatasetError(f"segmentation label {label_path} is {label.shape[1]}x{label.shape[0]} but image "
                               f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]}")
        image = normalize(rgb)
        if self.resize:
            image = F.interpolate(image[None], size=(self.resize, self.resize), mode="bilinear",
                                  align_corners=False)[0]
        cls = self.cls_labels.get(name)
        if cls is None:
            cls = labels_from_mask(label, self.num_classes, self.ignore_index)
        return {"name": name, "image": image, "label": torch.from_numpy(label.astype(np.int64)),
                "cls_label": torch.from_numpy(np.array(cls, dtype=np.float32)),
                "image_uint8": torch.from_numpy(rgb)}


class VOCClassification(ClassificationDataset):
    """PASCAL VOC 2012 training set with image-level labels (SPEC §1)."""


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 images with ``SegmentationClassAug`` labels (SPEC §1)."""

    def __init__(self, root, split: str = "val", cls_labels=None, label_dir: str = "SegmentationClassAug",
                 resize: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__(root, split, cls_labels, label_dir=label_dir, resize=resize, ignore_index=ignore_index)
