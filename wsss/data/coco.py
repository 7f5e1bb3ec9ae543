"""MS COCO 2014 in a VOC-style layout (SPEC §1, §3.0; C = 80), in either of two folder layouts.

The layout is detected once per data set from the image folders under ``root`` and logged; it is
never guessed: a root holding the folders of neither layout, or of both, is a :class:`DatasetError`.

**Public-code layout** (what MoRe's ``scripts/train_coco.py`` reads; SPEC §3.0)::

    JPEGImages/train/COCO_train2014_<12-digit id>.jpg   JPEGImages/val/COCO_val2014_<12-digit id>.jpg
    SegmentationClass/train/<12-digit id>.png           SegmentationClass/val/<12-digit id>.png

Split lists may name an image with its prefix (``COCO_train2014_000000000009``) or by the bare
12-digit id; a bare id in folder ``f`` is the file ``COCO_{f}2014_<id>.jpg``. The folder tried
first is the split's (``train*`` → ``train/``, ``val*`` → ``val/``; a split named otherwise takes
the folder of the name's prefix). A train image missing from ``train/`` is looked up in ``val/``
(as the public code does); its label is ``<id>.png`` (prefix stripped) in the folder where the
image was found.

**README layout** (the MoRe README's)::

    JPEGImages/train2014/<name>.jpg          JPEGImages/val2014/<name>.jpg
    SegmentationClass/train2014/<name>.png   SegmentationClass/val2014/<name>.png

Files are named exactly as listed. The folder of a name is the one its id carries
(``COCO_train2014_...`` / ``COCO_val2014_...``); ids without it take the folder from the split
(``train*`` → train2014, ``val*`` → val2014).

**Both layouts**::

    ImageSets/Segmentation/train.txt     (82 081 ids)
    ImageSets/Segmentation/val.txt       (40 137 ids)
    ImageSets/Segmentation/val_part.txt  (a subset of val for periodic validation)
    cls_labels.npy or cls_labels_onehot.npy   ({name: array (80,)})

Image-level label keys may be the prefixed name or the bare id, whichever the split list uses.
Labels are palette/grey PNGs of class indices 0..80 (255 = ignore). Training reads no train
masks (``build_datasets(..., train_masks=False)``); only evaluating pseudo labels on the train
split does. Missing files are found at construction, one ``os.path.isfile`` per file tried.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .voc import IGNORE_INDEX, ClassificationDataset, DatasetError, SegmentationDataset

log = logging.getLogger(__name__)

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

PUBLIC_CODE_LAYOUT = "public-code"
README_LAYOUT = "readme"
# The image folders (under JPEGImages/ and the label folder) each layout is recognised by.
LAYOUT_FOLDERS = {PUBLIC_CODE_LAYOUT: ("train", "val"), README_LAYOUT: COCO_SUBSETS}
_LAYOUT_DESCRIPTIONS = {
    PUBLIC_CODE_LAYOUT: "public-code layout (MoRe's code): images JPEGImages/{{train,val}}/"
                        "COCO_{{train,val}}2014_<id>.jpg, labels {label_dir}/{{train,val}}/<id>.png",
    README_LAYOUT: "readme layout (the MoRe README's): images JPEGImages/{{train2014,val2014}}/<name>.jpg, "
                   "labels {label_dir}/{{train2014,val2014}}/<name>.png",
}
_PREFIXED_NAME = re.compile(r"COCO_(train|val)2014_(.+)")


def parse_coco_name(name: str) -> Tuple[Optional[str], str]:
    """``(subset, id)`` of an image name: the subset (``"train"``/``"val"``) its ``COCO_<subset>2014_``
    prefix names, None for a bare id, and the id without the prefix."""
    match = _PREFIXED_NAME.fullmatch(name)
    return (match.group(1), match.group(2)) if match else (None, name)


def detect_coco_layout(root) -> str:
    """:data:`PUBLIC_CODE_LAYOUT` or :data:`README_LAYOUT`, from the image folders under ``root``."""
    root = Path(root)
    found = {layout: [f"JPEGImages/{f}" for f in folders if (root / "JPEGImages" / f).is_dir()]
             for layout, folders in LAYOUT_FOLDERS.items()}
    present = [layout for layout, dirs in found.items() if dirs]
    if len(present) == 1:
        return present[0]
    if not present:
        looked = ", ".join(f"JPEGImages/{f}" for folders in LAYOUT_FOLDERS.values() for f in folders)
        raise DatasetError(f"no COCO 2014 image folders under {root}: looked for {looked} (public-code layout: "
                           f"train/ and val/; readme layout: train2014/ and val2014/)")
    both = "; ".join(f"{layout} layout: {', '.join(dirs)}" for layout, dirs in found.items())
    raise DatasetError(f"ambiguous COCO 2014 layout under {root}: found the folders of both layouts ({both}); "
                       f"keep only one")


class _COCOLayout:
    """Layout hooks of the COCO data sets: the layout is detected on first use (see the module doc)."""

    default_num_classes = 80
    default_class_names = COCO_CLASSES
    default_label_dir = "SegmentationClass"

    @property
    def layout(self) -> str:
        """:data:`PUBLIC_CODE_LAYOUT` or :data:`README_LAYOUT`, detected once per data set."""
        layout = self.__dict__.get("_layout")
        if layout is None:
            layout = self._layout = detect_coco_layout(self.root)
            log.info("%s %r at %s: COCO 2014 %s", type(self).__name__, self.split, self.root,
                     _LAYOUT_DESCRIPTIONS[layout].format(label_dir=self.label_dir))
        return layout

    def subset(self, name: str) -> str:
        """The folder (under JPEGImages/ and the label folder) that holds image ``name``."""
        if self.layout == PUBLIC_CODE_LAYOUT:
            return self._public_folder(name)
        for sub in COCO_SUBSETS:
            if sub in name:
                return sub
        for sub in COCO_SUBSETS:
            if self.split.startswith(sub[:-4]):  # "train..." / "val..."
                return sub
        raise DatasetError(f"cannot tell whether {name!r} of split {self.split!r} ({self.split_file}) belongs to "
                           f"{' or '.join(COCO_SUBSETS)}: name the split train* or val*")

    def image_path(self, name: str) -> Path:
        folder = self.subset(name)
        if self.layout == PUBLIC_CODE_LAYOUT:
            return Path(self._public_image_file(name, folder))
        return self.root / "JPEGImages" / folder / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        folder = self.subset(name)
        if self.layout == PUBLIC_CODE_LAYOUT:
            ident = parse_coco_name(name)[1]
            return Path(f"{os.path.join(self.root, self.label_dir)}{os.sep}{folder}{os.sep}{ident}.png")
        return self.root / self.label_dir / folder / f"{name}.png"

    def cls_label_aliases(self, name: str) -> Sequence[str]:
        ident = parse_coco_name(name)[1]
        return [key for key in (ident, f"COCO_train2014_{ident}", f"COCO_val2014_{ident}") if key != name]

    # -- public-code layout: the folder of an image is where it is found ----------------------
    # Paths are joined as strings: the check at construction visits all 82k train images.
    @property
    def _image_folders(self) -> Dict[str, str]:
        return self.__dict__.setdefault("_found_in", {})

    def _public_image_file(self, name: str, folder: str) -> str:
        prefix, ident = parse_coco_name(name)
        stem = name if prefix else f"COCO_{folder}2014_{ident}"
        return f"{os.path.join(self.root, 'JPEGImages')}{os.sep}{folder}{os.sep}{stem}.jpg"

    def _public_folders(self, name: str) -> Tuple[str, ...]:
        """The folders tried for image ``name``, in order: the split's, then ``val`` for a train image."""
        first = next((f for f in LAYOUT_FOLDERS[PUBLIC_CODE_LAYOUT] if self.split.startswith(f)), None)
        first = first or parse_coco_name(name)[0]
        if first is None:
            raise DatasetError(f"cannot tell whether {name!r} of split {self.split!r} ({self.split_file}) is in "
                               f"JPEGImages/train or JPEGImages/val: name the split train* or val*, or list the "
                               f"image as COCO_train2014_<id> / COCO_val2014_<id>")
        return ("train", "val") if first == "train" else (first,)

    def _locate(self, name: str) -> Optional[str]:
        """The folder holding image ``name`` (remembered), or None if no folder tried does."""
        for folder in self._public_folders(name):
            if os.path.isfile(self._public_image_file(name, folder)):
                self._image_folders[name] = folder
                return folder
        return None

    def _public_folder(self, name: str) -> str:
        folder = self._image_folders.get(name) or self._locate(name)
        # an image missing everywhere: its paths name the split's own folder
        return folder or self._public_folders(name)[0]

    def _check_images_exist(self) -> None:
        if self.layout != PUBLIC_CODE_LAYOUT:
            super()._check_images_exist()
            return
        missing = [name for name in self.names if self._locate(name) is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            tried = " or ".join(self._public_image_file(missing[0], f) for f in self._public_folders(missing[0]))
            raise DatasetError(f"image listed in {self.split_file} not found: {tried}{more}")

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
