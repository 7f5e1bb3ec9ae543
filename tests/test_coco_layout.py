"""The two MS COCO 2014 folder layouts (SPEC §3.0): detection, loading, the train image found under
val/, training without train masks, and the errors that name the path looked for."""
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.data import COCOClassification, COCOSegmentation, DatasetError, build_datasets
from wsss.data.coco import PUBLIC_CODE_LAYOUT, README_LAYOUT, detect_coco_layout, parse_coco_name

C = 80
H, W = 40, 48
TRAIN_IDS = (9, 25, 30)
VAL_IDS = (73, 74, 77)
MOVED_ID = 42  # a val2014 image listed in the train split: the public code finds it under val/
LAYOUTS = (PUBLIC_CODE_LAYOUT, README_LAYOUT)


def _ident(i):
    return f"{i:012d}"


def _class_of(i):
    return i % C + 1


def _write_pair(image_file, label_file, i, with_label=True):
    rng = np.random.default_rng(i)
    image_file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image_file)
    if with_label:
        label = np.zeros((H, W), np.uint8)
        label[5:30, 8:40] = _class_of(i)
        label[0] = 255
        label_file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, mode="L").save(label_file)


def make_coco(root, layout, prefixed=True, cls_keys="prefixed", train_masks=True):
    """A tiny COCO 2014 set in ``layout``; split lists name images with or without the
    ``COCO_<subset>2014_`` prefix, the image-level label dict is keyed either way."""
    entries = {"train": [("train", i) for i in TRAIN_IDS], "val": [("val", i) for i in VAL_IDS]}
    if layout == PUBLIC_CODE_LAYOUT:
        entries["train"].append(("val", MOVED_ID))
    labels = {}
    for split, items in entries.items():
        names = []
        for subset, i in items:
            full, ident = f"COCO_{subset}2014_{_ident(i)}", _ident(i)
            name = full if prefixed else ident
            if layout == PUBLIC_CODE_LAYOUT:
                image = root / "JPEGImages" / subset / f"{full}.jpg"
                label = root / "SegmentationClass" / subset / f"{ident}.png"
            else:
                image = root / "JPEGImages" / f"{subset}2014" / f"{name}.jpg"
                label = root / "SegmentationClass" / f"{subset}2014" / f"{name}.png"
            _write_pair(image, label, i, with_label=train_masks or split != "train")
            onehot = np.zeros(C, np.uint8)
            onehot[_class_of(i) - 1] = 1
            labels[full if cls_keys == "prefixed" else ident] = onehot
            names.append(name)
        split_dir = root / "ImageSets" / "Segmentation"
        split_dir.mkdir(parents=True, exist_ok=True)
        (split_dir / f"{split}.txt").write_text("\n".join(names) + "\n")
        if split == "val":
            (split_dir / "val_part.txt").write_text("\n".join(names[:2]) + "\n")
    np.save(root / "cls_labels_onehot.npy", labels, allow_pickle=True)
    return root


@pytest.fixture
def layout_log(caplog, monkeypatch):
    """Records of wsss.data.coco at INFO, also after a test ran ``setup_logging`` (which stops the
    ``wsss`` logger from propagating to caplog's root handler)."""
    monkeypatch.setattr(logging.getLogger("wsss"), "propagate", True)
    caplog.set_level(logging.INFO, logger="wsss.data.coco")
    return caplog


def _layout_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "wsss.data.coco" and r.levelno == logging.INFO]


def test_parse_coco_name():
    assert parse_coco_name("COCO_train2014_000000000009") == ("train", "000000000009")
    assert parse_coco_name("COCO_val2014_000000000042") == ("val", "000000000042")
    assert parse_coco_name("000000000009") == (None, "000000000009")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prefixed", [True, False], ids=["prefixed", "bare"])
@pytest.mark.parametrize("cls_keys", ["prefixed", "bare"])
def test_layout_detected_and_items_load(tmp_path, layout_log, layout, prefixed, cls_keys):
    root = make_coco(tmp_path / "coco", layout, prefixed=prefixed, cls_keys=cls_keys)
    assert detect_coco_layout(root) == layout

    train = COCOClassification(root, "train", crop_size=32)
    lines = _layout_lines(layout_log)
    assert len(lines) == 1 and layout in lines[0] and str(root) in lines[0]
    assert train.layout == layout and train.num_classes == C
    assert len(train) == len(TRAIN_IDS) + (layout == PUBLIC_CODE_LAYOUT)
    for index in range(len(train)):
        item = train[index]
        assert item["image"].shape == (3, 32, 32) and item["cls_label"].shape == (C,)
        assert item["cls_label"].sum() == 1
    assert len(_layout_lines(layout_log)) == 1, "the layout is detected once per data set"

    val = COCOSegmentation(root, "val_part", resize=24)
    assert len(val) == 2 and len(_layout_lines(layout_log)) == 2
    item = val[1]
    assert item["image"].shape == (3, 24, 24) and item["label"].shape == (H, W)
    assert item["image_uint8"].shape == (H, W, 3)
    assert set(np.unique(item["label"].numpy())) == {0, _class_of(VAL_IDS[1]), 255}
    assert item["cls_label"].argmax().item() == _class_of(VAL_IDS[1]) - 1 and item["cls_label"].sum() == 1
    folder = "val" if layout == PUBLIC_CODE_LAYOUT else "val2014"
    assert val.image_path(val.names[0]).parent == root / "JPEGImages" / folder
    assert val.label_path(val.names[0]).parent == root / "SegmentationClass" / folder


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefixed", "bare"])
def test_public_layout_paths_and_train_image_under_val(tmp_path, prefixed):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT, prefixed=prefixed)
    seg = COCOSegmentation(root, "train")
    first, moved = seg.names[0], seg.names[-1]
    assert seg.image_path(first) == root / "JPEGImages" / "train" / f"COCO_train2014_{_ident(TRAIN_IDS[0])}.jpg"
    assert seg.label_path(first) == root / "SegmentationClass" / "train" / f"{_ident(TRAIN_IDS[0])}.png"
    assert seg.image_path(moved) == root / "JPEGImages" / "val" / f"COCO_val2014_{_ident(MOVED_ID)}.jpg"
    assert seg.label_path(moved) == root / "SegmentationClass" / "val" / f"{_ident(MOVED_ID)}.png"
    item = seg[len(seg) - 1]
    assert set(np.unique(item["label"].numpy())) == {0, _class_of(MOVED_ID), 255}
    assert item["cls_label"].argmax().item() == _class_of(MOVED_ID) - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_needs_no_train_masks(tmp_path, layout):
    root = make_coco(tmp_path / "coco", layout, train_masks=False)
    train, train_seg, val = build_datasets("coco", root, "train", "val_part", 32, eval_resize=24, train_masks=False)
    assert train_seg is None and isinstance(train, COCOClassification) and isinstance(val, COCOSegmentation)
    assert train[0]["image"].shape == (3, 32, 32) and val[0]["image"].shape == (3, 24, 24)
    folder = "train" if layout == PUBLIC_CODE_LAYOUT else "train2014"
    name = f"{_ident(TRAIN_IDS[0])}" if layout == PUBLIC_CODE_LAYOUT else f"COCO_train2014_{_ident(TRAIN_IDS[0])}"
    with pytest.raises(DatasetError) as e:
        build_datasets("coco", root, "train", "val_part", 32)
    assert "segmentation label" in str(e.value)
    assert str(root / "SegmentationClass" / folder / f"{name}.png") in str(e.value)


def test_build_datasets_with_train_masks(tmp_path):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT)
    train, train_seg, val = build_datasets("coco", root, "train", "val", 32)
    assert isinstance(train_seg, COCOSegmentation) and train_seg.names == train.names and len(val) == len(VAL_IDS)


def test_neither_layout(tmp_path):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT)
    for folder in ("train", "val"):
        (root / "JPEGImages" / folder).rename(root / "JPEGImages" / f"{folder}_images")
    with pytest.raises(DatasetError) as e:
        COCOSegmentation(root, "val")
    message = str(e.value)
    assert str(root) in message
    for folder in ("train", "val", "train2014", "val2014"):
        assert f"JPEGImages/{folder}" in message


def test_both_layouts(tmp_path):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT)
    (root / "JPEGImages" / "val2014").mkdir()
    with pytest.raises(DatasetError) as e:
        COCOClassification(root, "train", crop_size=32)
    message = str(e.value)
    assert str(root) in message and "JPEGImages/val2014" in message and "JPEGImages/train" in message


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefixed", "bare"])
def test_public_layout_missing_image_names_paths_tried(tmp_path, prefixed):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT, prefixed=prefixed)
    ident = _ident(TRAIN_IDS[1])
    (root / "JPEGImages" / "train" / f"COCO_train2014_{ident}.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        COCOClassification(root, "train", crop_size=32)
    message = str(e.value)
    assert str(root / "JPEGImages" / "train" / f"COCO_train2014_{ident}.jpg") in message
    in_val = f"COCO_train2014_{ident}.jpg" if prefixed else f"COCO_val2014_{ident}.jpg"
    assert str(root / "JPEGImages" / "val" / in_val) in message

    ident = _ident(VAL_IDS[0])
    (root / "JPEGImages" / "val" / f"COCO_val2014_{ident}.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        COCOSegmentation(root, "val")
    assert str(root / "JPEGImages" / "val" / f"COCO_val2014_{ident}.jpg") in str(e.value)
    assert "JPEGImages/train" not in str(e.value)


def test_readme_layout_missing_image(tmp_path):
    root = make_coco(tmp_path / "coco", README_LAYOUT)
    path = root / "JPEGImages" / "train2014" / f"COCO_train2014_{_ident(TRAIN_IDS[2])}.jpg"
    path.unlink()
    with pytest.raises(DatasetError) as e:
        COCOClassification(root, "train", crop_size=32)
    assert str(path) in str(e.value)


def test_missing_label_in_public_layout(tmp_path):
    root = make_coco(tmp_path / "coco", PUBLIC_CODE_LAYOUT)
    shutil.rmtree(root / "SegmentationClass" / "val")
    with pytest.raises(DatasetError) as e:
        COCOSegmentation(root, "val_part")
    assert str(root / "SegmentationClass" / "val" / f"{_ident(VAL_IDS[0])}.png") in str(e.value)
