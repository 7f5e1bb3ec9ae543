"""Data sets (VOC, COCO and the synthetic VOC-layout set) and the training augmentation.

``build_datasets`` is what training and evaluation call; ``python -m wsss.data.synthetic``
writes the synthetic set (see :mod:`wsss.data.synthetic`).
"""
from __future__ import annotations

from typing import Optional, Tuple

from .coco import COCO_CLASSES, COCOClassification, COCOSegmentation
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, denormalize, normalize
from .voc import VOC_CLASSES, DatasetError, VOCClassification, VOCSegmentation, load_cls_labels

DATASETS = {
    "voc": (VOCClassification, VOCSegmentation),
    "coco": (COCOClassification, COCOSegmentation),
}

__all__ = [
    "COCO_CLASSES", "COCOClassification", "COCOSegmentation", "DATASETS", "DatasetError", "IMAGENET_MEAN",
    "IMAGENET_STD", "TrainTransform", "VOC_CLASSES", "VOCClassification", "VOCSegmentation", "build_datasets",
    "build_segmentation_set",
    "denormalize", "load_cls_labels", "normalize",
]


def build_datasets(dataset: str, root, train_split: str, val_split: str, crop_size: int, cls_labels=None,
                   aug: str = "more", seed: int = 0, eval_resize: Optional[int] = None,
                   train_masks: bool = True) -> Tuple:
    """(train classification set, train split as a segmentation set for pseudo-label evaluation,
    val segmentation set). ``eval_resize`` resizes the images of both segmentation sets.

    With ``train_masks=False`` the second element is None and no train mask is read or checked:
    training needs none (COCO's 82k train masks are only for evaluating pseudo labels)."""
    cls_ds, _ = _dataset_classes(dataset)
    train = cls_ds(root, train_split, crop_size=crop_size, cls_labels=cls_labels, aug=aug, seed=seed)
    train_seg = build_segmentation_set(dataset, root, train_split, cls_labels, eval_resize) if train_masks else None
    val = build_segmentation_set(dataset, root, val_split, cls_labels, eval_resize)
    return train, train_seg, val


def build_segmentation_set(dataset: str, root, split: str, cls_labels=None, resize: Optional[int] = None):
    """One split with its masks, for evaluation (``resize``: images resized to resize × resize)."""
    _, seg_ds = _dataset_classes(dataset)
    return seg_ds(root, split, cls_labels=cls_labels, resize=resize)


def _dataset_classes(dataset: str):
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]
