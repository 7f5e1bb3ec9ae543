"""The synthetic VOC-layout data set: layout, label conventions, learnability cues, determinism."""
import json
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from wsss.data import VOCClassification, VOCSegmentation, load_cls_labels
from wsss.data.synthetic import class_table, main, make_synthetic_dataset, voc_palette

C = 5
PARAMS = dict(seed=11, num_train=8, num_val=5, size=72, num_classes=C)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "set", **PARAMS)


def _names(root, split):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(synth):
    seg = synth / "ImageSets" / "Segmentation"
    assert len(_names(synth, "train")) == 8 and len(_names(synth, "val")) == 5
    assert (seg / "train_aug.txt").read_text() == (seg / "train.txt").read_text()
    assert (synth / "classes.txt").read_text().split() == ["background"] + [c["name"] for c in class_table(C)]
    assert json.loads((synth / "synthetic.json").read_text())["num_classes"] == C
    labels = load_cls_labels(synth / "cls_labels.npy")
    assert set(labels) == set(_names(synth, "train")) | set(_names(synth, "val"))
    sizes = set()
    for name in _names(synth, "train") + _names(synth, "val"):
        im = Image.open(synth / "JPEGImages" / f"{name}.jpg")
        assert im.format == "JPEG" and im.mode == "RGB"
        png = Image.open(synth / "SegmentationClass" / f"{name}.png")
        assert png.mode == "P" and png.getpalette()[:3 * (C + 1)] == voc_palette()[:3 * (C + 1)]
        assert (synth / "SegmentationClass" / f"{name}.png").read_bytes() == \
            (synth / "SegmentationClassAug" / f"{name}.png").read_bytes()
        label = np.array(png)
        assert label.shape == (im.height, im.width)
        assert 54 <= im.height <= 72 and 54 <= im.width <= 72  # [0.75·size, size]
        sizes.add(im.size)
        values = set(np.unique(label).tolist())
        assert values <= set(range(C + 1)) | {255} and 0 in values
        expected = np.zeros(C, np.float32)
        expected[[v - 1 for v in values if 0 < v < 255]] = 1
        assert np.array_equal(labels[name], expected) and expected.sum() >= 1
    assert len(sizes) > 3  # the loaders see non-square images of varying size


def test_boundary_band_separates_regions(synth):
    for name in _names(synth, "train"):
        label = np.array(Image.open(synth / "SegmentationClass" / f"{name}.png")).astype(np.int64)
        band = label == 255
        assert band.any()
        # no two different non-ignore labels touch (8-neighbourhood) ...
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            a = label[max(dy, 0):, max(dx, 0):label.shape[1] + min(dx, 0)]
            b = label[:label.shape[0] - dy, max(-dx, 0):label.shape[1] - max(dx, 0)]
            differ = (a != b) & (a != 255) & (b != 255)
            assert not differ.any()
        # ... and the band is thin: 2 pixels across a boundary, wider only where two boundaries
        # meet (star tips, slivers of occluded objects); a small share of the image
        near = cv2.dilate((~band).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert near[band].mean() > 0.8 and band.mean() < 0.2
        assert cv2.erode(band.astype(np.uint8), np.ones((5, 5), np.uint8)).mean() < 0.005


def test_classes_are_distinguishable_by_colour(synth):
    """Objects are saturated with the class's hue; background and distractors are not."""
    table = class_table(C)
    for i, (ca, cb) in enumerate(zip(table, table[1:] + table[:1])):
        gap = (cb["hue"][0] - ca["hue"][0]) % 1.0
        assert gap > ca["hue"][1] + cb["hue"][1]  # hue ranges do not overlap
    obj_sat, bg_sat, hue_err = [], [], []
    for name in _names(synth, "train") + _names(synth, "val"):
        rgb = np.array(Image.open(synth / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        label = np.array(Image.open(synth / "SegmentationClass" / f"{name}.png"))
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float64)
        sat = hsv[..., 1] / 255
        bg_sat.append(sat[label == 0])
        for k in range(1, C + 1):
            m = label == k
            if m.any():
                obj_sat.append(sat[m])
                hue = hsv[..., 0][m] / 180
                centre = table[k - 1]["hue"][0]
                hue_err.append(np.abs((hue - centre + 0.5) % 1.0 - 0.5))
    assert np.median(np.concatenate(obj_sat)) > 0.5 and np.median(np.concatenate(bg_sat)) < 0.2
    # nearly every object pixel is closer to its class's hue centre than to any other (1/(2C))
    assert (np.concatenate(hue_err) < 0.5 / C).mean() > 0.97


def test_loaders_read_it(synth):
    train = VOCClassification(synth, "train_aug", crop_size=48)
    val = VOCSegmentation(synth, "val", resize=48)
    assert train.num_classes == C and train.class_names == (synth / "classes.txt").read_text().split()
    assert train[0]["image"].shape == (3, 48, 48) and val[0]["label"].ndim == 2


def test_deterministic_bytes(synth, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", **PARAMS)
    assert _files(again) == _files(synth)
    other = make_synthetic_dataset(tmp_path / "other", **{**PARAMS, "seed": 12})
    a, b = _files(other), _files(synth)
    assert a.keys() == b.keys()
    assert a[next(k for k in a if k.suffix == ".jpg")] != b[next(k for k in b if k.suffix == ".jpg")]


def test_skips_complete_set_and_regenerates_on_change(tmp_path, caplog):
    params = dict(seed=0, num_train=3, num_val=2, size=40, num_classes=2)
    out = make_synthetic_dataset(tmp_path / "s", **params)
    jpg = out / "JPEGImages" / "train_00000.jpg"
    stamp = jpg.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="wsss.data.synthetic"):
        make_synthetic_dataset(out, **params)
    assert jpg.stat().st_mtime_ns == stamp and "not regenerating" in caplog.text
    make_synthetic_dataset(out, **{**params, "num_train": 4})
    assert len(_names(out, "train")) == 4
    (out / "JPEGImages" / "val_00001.jpg").unlink()  # incomplete → regenerate
    make_synthetic_dataset(out, **{**params, "num_train": 4})
    assert (out / "JPEGImages" / "val_00001.jpg").is_file()


@pytest.mark.parametrize("num_classes", [1, 20])
def test_class_count_extremes(tmp_path, num_classes):
    out = make_synthetic_dataset(tmp_path / "s", seed=0, num_train=4, num_val=1, size=48, num_classes=num_classes)
    names = (out / "classes.txt").read_text().split()
    assert len(names) == num_classes + 1 and len(set(names)) == num_classes + 1
    ds = VOCSegmentation(out, "train")
    assert ds.num_classes == num_classes
    for i in range(len(ds)):
        assert int(ds[i]["label"].max()) <= 255


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=21), "num_classes"), (dict(num_train=0), "num_train"),
    (dict(num_val=0), "num_val"), (dict(size=31), "size"), (dict(seed=-1), "seed"), (dict(size=64.0), "size"),
])
def test_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--size", "40", "--classes", "3"])
    assert "synthetic data set ready" in capsys.readouterr().out
    assert len(_names(tmp_path / "cli", "train")) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--classes", "0"])
