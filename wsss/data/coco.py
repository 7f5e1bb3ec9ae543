"""MS COCO 2014 in the VOC-style layout of SPEC §1 (C = 80).

Layout under ``root``::

    JPEGImages/train2014/<name>.jpg      JPEGImages/val2014/<name>.jpg
    SegmentationClass/train2014/<name>.png   SegmentationClass/val2014/<name>.png
    ImageSets/Segmentation/train.txt     (82 081 ids)
    ImageSets/Segmentation/val.txt       (40 137 ids)
    ImageSets/Segmentation/val_part.txt  (a subset of val for periodic validation)
    cls_labels.npy or cls_labels_onehot.npy   ({name: array (80,)})

Labels are palette/grey PNGs of class indices 0..80 (255 = ignore). The image folder of a name
is the one its id carries (``COCO_train2014_...`` / ``COCO_val2014_...``); ids without it take
the folder from the split (``train*`` → train2014, ``val*`` → val2014).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .voc import IGNORE_INDEX, ClassificationDataset, DatasetError, SegmentationDataset

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COCO_SUBSETS = ("train2014", "val2014")


class _COCOLayout:
    """Layout hooks: files live in the ``train2014`` / ``val2014`` sub-folders."""

    default_num_classes = 80
    default_class_names = COCO_CLASSES
    default_label_dir = "SegmentationClass"

    def subset(self, name: str) -> str:
        for sub in COCO_SUBSETS:
            if sub in name:
                return sub
        for sub in COCO_SUBSETS:
            if self.split.startswith(sub[:-4]):  # "train..." / "val..."
                return sub
        raise DatasetError(f"cannot tell whether {name!r} of split {self.split!r} ({self.split_file}) belongs to "
                           f"{' or '.join(COCO_SUBSETS)}: name the split train* or val*")

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / self.subset(name) / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        return self.root / self.label_dir / self.subset(name) / f"{name}.png"


class COCOClassification(_COCOLayout, ClassificationDataset):
    """COCO 2014 training images with image-level labels; items as :class:`VOCClassification`."""

    def __init__(self, root, split: str = "train", crop_size: int = 448, cls_labels=None, aug: str = "more",
                 seed: int = 0, ignore_index: int = IGNORE_INDEX):
        super().__init__(root, split, crop_size, cls_labels, aug, seed, ignore_index)


class COCOSegmentation(_COCOLayout, SegmentationDataset):
    """COCO 2014 images with segmentation labels; items as :class:`VOCSegmentation`."""

    def __init__(self, root, split: str = "val", cls_labels=None, label_dir: str = "SegmentationClass",
                 resize: Optional[int] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__(root, split, cls_labels, label_dir=label_dir, resize=resize, ignore_index=ignore_index)
