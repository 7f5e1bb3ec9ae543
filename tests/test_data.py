"""Loaders, augmentation and bad-data errors of wsss.data (VOC and COCO layouts)."""
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data import (COCO_CLASSES, IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, COCOClassification,
                       COCOSegmentation, DatasetError, TrainTransform, VOCClassification, VOCSegmentation,
                       build_datasets, denormalize, load_cls_labels, normalize)
from wsss.data.synthetic import make_synthetic_dataset

C = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "voc", seed=3, num_train=6, num_val=4,
                                  size=64, num_classes=C)


@pytest.fixture
def copy(synth, tmp_path):
    """A private copy of the synthetic set that a test may damage."""
    dst = tmp_path / "voc"
    shutil.copytree(synth, dst)
    return dst


def _names(root, split):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _classes_of(label):
    present = np.unique(label)
    present = present[(present != 0) & (present != 255)]
    y = np.zeros(C, dtype=np.float32)
    y[present - 1] = 1
    return y


# -- normalisation ----------------------------------------------------------------------------

def test_normalize_denormalize_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    expected = (img.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert np.allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # x was computed in float32 (~1e-7 relative); fp16 has an 11-bit mantissa
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-6), (torch.float16, 2e-3)):
        batch = x.to(dtype)[None].repeat(2, 1, 1, 1)
        back = denormalize(batch)
        assert back.dtype == dtype and back.device == batch.device and back.shape == batch.shape
        assert torch.allclose(back.double(), torch.from_numpy(img).permute(2, 0, 1).double()[None] / 255, atol=tol)
    with pytest.raises(ValueError, match="uint8"):
        normalize(img.astype(np.float32))
    with pytest.raises(ValueError, match="3, H, W"):
        denormalize(torch.zeros(2, 4, 5, 5))


# -- augmentation -----------------------------------------------------------------------------

PALETTE = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)],
                   dtype=np.uint8)  # mid-range colours: the photometric steps cannot clip two into one


def _block_image(rng, h=72, w=96, block=12):
    """Random blocks whose colour encodes their label (asymmetric, so a flip mismatch shows)."""
    grid = rng.integers(0, len(PALETTE), (h // block, w // block))
    label = np.kron(grid, np.ones((block, block), dtype=np.int64))
    return PALETTE[label], label


def _interior(label, r):
    """Pixels whose (2r+1)^2 neighbourhood has a single non-ignore label."""
    H, W = label.shape
    pad = np.pad(label, r, mode="constant", constant_values=255)
    ok = label != 255
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ok &= pad[r + dy:r + dy + H, r + dx:r + dx + W] == label
    return ok


@pytest.mark.parametrize("mode", ["more", "toco"])
@pytest.mark.parametrize("crop", [48, 61])
def test_train_transform_keeps_image_and_label_aligned(mode, crop):
    src_rng = np.random.default_rng(123)
    for seed in range(15):
        img, label = _block_image(src_rng)
        t = TrainTransform(crop, mode=mode)
        x, valid, lab = t(img, np.random.default_rng(seed), label=label)
        assert x.shape == (3, crop, crop) and x.dtype == torch.float32
        assert valid.shape == (crop, crop) and valid.dtype == torch.bool
        assert lab.shape == (crop, crop) and lab.dtype == torch.int64
        lab = lab.numpy()
        assert set(np.unique(lab[valid.numpy()])) <= set(range(len(PALETTE)))
        # Class colours from deep inside the blocks (bicubic reach ≤ 4 output pixels here).
        deep = _interior(lab, 4) & valid.numpy()
        if deep.sum() < 50:
            continue
        pix = denormalize(x).permute(1, 2, 0).numpy()
        means = {k: pix[deep & (lab == k)].mean(0) for k in np.unique(lab[deep])}
        spread = max(np.abs(pix[deep & (lab == k)] - m).max() for k, m in means.items())
        assert spread < 0.05, (mode, seed, spread)  # one colour per label, whatever the jitter did
        # Every pixel whose 3x3 neighbourhood has one label must have that label's colour: a
        # 2-pixel shift between image and label already drops this to ≤ 0.99.
        keys = np.array(sorted(means))
        near = _interior(lab, 1) & valid.numpy() & np.isin(lab, keys)
        dist = np.stack([np.abs(pix[near] - means[k]).sum(1) for k in keys], 1)
        agreement = (keys[dist.argmin(1)] == lab[near]).mean()
        assert agreement > 0.995, (mode, seed, agreement)


def test_more_mode_without_jitter_keeps_exact_colours():
    # Seeds whose jitter draw is skipped: interior colours equal the palette (bicubic interpolation
    # of a constant region is exact up to uint8 rounding).
    checked = 0
    for seed in range(30):
        img, label = _block_image(np.random.default_rng(seed + 100))
        rng = np.random.default_rng(seed)
        x, valid, lab = TrainTransform(56)(img, rng, label=label)
        pix = np.round(denormalize(x).permute(1, 2, 0).numpy() * 255)
        inner = _interior(lab.numpy(), 4)
        diff = np.abs(pix[inner] - PALETTE[lab.numpy()[inner]]).max() if inner.any() else 0
        if diff <= 1:
            checked += 1
    assert checked >= 8  # about half of the seeds skip the jitter (p = 0.5)


def test_toco_pads_with_mean_colour_and_ignore():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (30, 41))
    for seed in range(10):
        x, valid, lab = TrainTransform(64, mode="toco", scale_range=(1.0, 1.0))(img, np.random.default_rng(seed),
                                                                                label=label)
        assert int(valid.sum()) == 30 * 41  # the whole image lies inside the crop
        assert torch.all(lab[~valid] == 255) and torch.all(lab[valid] != 255)
        assert torch.all(x[:, ~valid].abs() < 1e-6)  # mean colour → 0 after normalisation
        rows, cols = valid.any(1).nonzero(), valid.any(0).nonzero()
        assert rows.numel() == 30 and cols.numel() == 41  # one contiguous box
    # larger images: random crop, some seeds partly padded at scale 0.5 on a 100x150 image for crop 64
    big = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    x, valid, lab = TrainTransform(64, mode="toco", scale_range=(0.5, 0.5))(big, np.random.default_rng(1))
    assert lab is None and int(valid.sum()) == 50 * 64 and torch.all(x[:, ~valid] == 0)


@pytest.mark.parametrize("mode", ["more", "toco"])
def test_transform_is_deterministic_and_uses_only_the_given_rng(mode):
    img, label = _block_image(np.random.default_rng(5))
    t = TrainTransform(40, mode=mode)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = t(img, np.random.default_rng(7), label=label)
    b = t(img, np.random.default_rng(7), label=label)
    c = t(img, np.random.default_rng(8), label=label)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        TrainTransform(32, mode="bogus")
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(32, scale_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="label"):
        TrainTransform(32)(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), label=np.zeros((8, 9)))


# -- VOC loaders ------------------------------------------------------------------------------

def test_voc_classification_items(synth):
    ds = VOCClassification(synth, "train_aug", crop_size=48, seed=1)
    labels = load_cls_labels(synth / "cls_labels.npy")
    assert len(ds) == 6 and ds.num_classes == C and ds.class_names[0] == "background" and len(ds.class_names) == C + 1
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"name", "image", "cls_label", "valid"}
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        per_channel = item["image"].permute(1, 2, 0).reshape(-1, 3).numpy()
        assert np.all(per_channel >= lo - 1e-5) and np.all(per_channel <= hi + 1e-5)
        assert item["cls_label"].dtype == torch.float32 and item["cls_label"].shape == (C,)
        assert np.array_equal(item["cls_label"].numpy(), labels[item["name"]])
        assert item["valid"].dtype == torch.bool and bool(item["valid"].all())


def test_voc_classification_is_deterministic_per_seed_epoch_index(synth):
    a = VOCClassification(synth, "train", crop_size=32, seed=4)
    b = VOCClassification(synth, "train", crop_size=32, seed=4)
    assert torch.equal(a[2]["image"], b[2]["image"])  # another instance (worker) → same item
    first = a[2]["image"]
    a.set_epoch(1)
    assert not torch.equal(first, a[2]["image"])
    a.set_epoch(0)
    assert torch.equal(first, a[2]["image"])
    assert not torch.equal(first, VOCClassification(synth, "train", crop_size=32, seed=5)[2]["image"])


@pytest.mark.parametrize("resize", [None, 40])
def test_voc_segmentation_items(synth, resize):
    ds = VOCSegmentation(synth, "val", resize=resize)
    assert len(ds) == 4 and ds.num_classes == C
    for i in range(len(ds)):
        item = ds[i]
        name = item["name"]
        png = np.array(Image.open(synth / "SegmentationClassAug" / f"{name}.png"))
        rgb = np.array(Image.open(synth / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        assert item["label"].dtype == torch.int64 and np.array_equal(item["label"].numpy(), png)
        assert item["image_uint8"].dtype == torch.uint8 and np.array_equal(item["image_uint8"].numpy(), rgb)
        assert set(np.unique(png)) <= set(range(C + 1)) | {255}
        assert np.array_equal(item["cls_label"].numpy(), _classes_of(png))
        H, W = png.shape
        assert item["image"].shape == ((3, resize, resize) if resize else (3, H, W))
        if not resize:
            back = denormalize(item["image"]).permute(1, 2, 0).numpy() * 255
            assert np.abs(back - rgb).max() < 1e-3


def test_segmentation_derives_missing_image_labels(copy):
    labels = load_cls_labels(copy / "cls_labels.npy")
    only_train = {k: v for k, v in labels.items() if k.startswith("train")}
    np.save(copy / "cls_labels.npy", only_train, allow_pickle=True)
    ds = VOCSegmentation(copy, "val")
    for i in range(len(ds)):
        item = ds[i]
        assert np.array_equal(item["cls_label"].numpy(), labels[item["name"]])


def test_class_names(copy):
    assert VOCSegmentation(copy, "val").class_names == (copy / "classes.txt").read_text().split()
    (copy / "classes.txt").unlink()
    assert VOCSegmentation(copy, "val").class_names == ["background"] + [f"class_{i}" for i in range(1, C + 1)]
    labels = {k: np.zeros(20, np.float32) for k in _names(copy, "train")}
    np.save(copy / "cls_labels.npy", labels, allow_pickle=True)
    assert VOCClassification(copy, "train", crop_size=32).class_names == list(VOC_CLASSES)
    (copy / "classes.txt").write_text("background\na\nb\n")
    with pytest.raises(DatasetError, match="classes.txt"):
        VOCClassification(copy, "train", crop_size=32)


# -- bad data ---------------------------------------------------------------------------------

def test_missing_root_and_split(copy, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        VOCClassification(missing, "train")
    with pytest.raises(DatasetError, match=re.escape(str(copy / "ImageSets" / "Segmentation" / "test.txt"))):
        VOCSegmentation(copy, "test")


def test_empty_split(copy):
    path = copy / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match="empty") as e:
        VOCSegmentation(copy, "val")
    assert str(path) in str(e.value)


def test_listed_image_or_label_missing(copy):
    name = _names(copy, "train")[2]
    (copy / "JPEGImages" / f"{name}.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        VOCClassification(copy, "train", crop_size=32)
    assert str(copy / "JPEGImages" / f"{name}.jpg") in str(e.value)
    name = _names(copy, "val")[1]
    (copy / "SegmentationClassAug" / f"{name}.png").unlink()
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(copy, "val")
    assert str(copy / "SegmentationClassAug" / f"{name}.png") in str(e.value)


def test_name_without_image_label(copy):
    labels = load_cls_labels(copy / "cls_labels.npy")
    name = _names(copy, "train")[0]
    del labels[name]
    np.save(copy / "cls_labels.npy", labels, allow_pickle=True)
    with pytest.raises(DatasetError) as e:
        VOCClassification(copy, "train", crop_size=32)
    assert str(copy / "cls_labels.npy") in str(e.value) and name in str(e.value)


def test_missing_image_label_file(copy):
    (copy / "cls_labels.npy").unlink()
    with pytest.raises(DatasetError, match="cls_labels") as e:
        VOCClassification(copy, "train", crop_size=32)
    assert str(copy) in str(e.value)
    with pytest.raises(DatasetError) as e:
        VOCClassification(copy, "train", crop_size=32, cls_labels=copy / "other.npy")
    assert str(copy / "other.npy") in str(e.value)


def test_bad_image_label_files(tmp_path):
    path = tmp_path / "labels.npy"
    np.save(path, np.zeros((3, 4)))
    with pytest.raises(DatasetError, match="dict") as e:
        load_cls_labels(path)
    assert str(path) in str(e.value)
    np.save(path, {"a": np.zeros(4), "b": np.zeros(5)}, allow_pickle=True)
    with pytest.raises(DatasetError, match="length") as e:
        load_cls_labels(path)
    assert str(path) in str(e.value)
    path.write_bytes(b"not numpy")
    with pytest.raises(DatasetError) as e:
        load_cls_labels(path)
    assert str(path) in str(e.value)


def test_corrupt_image(copy):
    name = _names(copy, "train")[1]
    path = copy / "JPEGImages" / f"{name}.jpg"
    path.write_bytes(b"\xff\xd8 garbage")
    ds = VOCClassification(copy, "train", crop_size=32)
    with pytest.raises(DatasetError) as e:
        ds[1]
    assert str(path) in str(e.value)
    seg = VOCSegmentation(copy, "train")
    with pytest.raises(DatasetError) as e:
        seg[1]
    assert str(path) in str(e.value)


def test_label_values_out_of_range(copy):
    name = _names(copy, "val")[0]
    path = copy / "SegmentationClassAug" / f"{name}.png"
    label = np.array(Image.open(path))
    label[0, :3] = [C + 1, 77, 255]
    Image.fromarray(label, mode="L").save(path)
    ds = VOCSegmentation(copy, "val")
    with pytest.raises(DatasetError, match=r"\[5, 77\]") as e:
        ds[0]
    assert str(path) in str(e.value)


def test_label_image_size_mismatch(copy):
    name = _names(copy, "val")[0]
    path = copy / "SegmentationClassAug" / f"{name}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(path)
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(copy, "val")[0]
    assert str(path) in str(e.value)


# -- COCO layout ------------------------------------------------------------------------------

def _coco_from(voc, root, prefix=True):
    """The synthetic set rearranged into the COCO 2014 layout."""
    split_dir = root / "ImageSets" / "Segmentation"
    split_dir.mkdir(parents=True)
    labels = load_cls_labels(voc / "cls_labels.npy")
    coco_labels = {}
    for split, sub in (("train", "train2014"), ("val", "val2014")):
        (root / "JPEGImages" / sub).mkdir(parents=True)
        (root / "SegmentationClass" / sub).mkdir(parents=True)
        names = []
        for i, name in enumerate(_names(voc, split)):
            new = f"COCO_{sub}_{i:012d}" if prefix else f"{i:012d}"
            shutil.copy(voc / "JPEGImages" / f"{name}.jpg", root / "JPEGImages" / sub / f"{new}.jpg")
            shutil.copy(voc / "SegmentationClass" / f"{name}.png", root / "SegmentationClass" / sub / f"{new}.png")
            coco_labels[new] = labels[name]
            names.append(new)
        (split_dir / f"{split}.txt").write_text("\n".join(names) + "\n")
        if split == "val":
            (split_dir / "val_part.txt").write_text("\n".join(names[:2]) + "\n")
    np.save(root / "cls_labels_onehot.npy", coco_labels, allow_pickle=True)
    return root


@pytest.mark.parametrize("prefix", [True, False])
def test_coco_layout_loads(synth, tmp_path, prefix):
    root = _coco_from(synth, tmp_path / "coco", prefix=prefix)
    train = COCOClassification(root, "train", crop_size=32)
    assert len(train) == 6 and train.num_classes == C
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["cls_label"].shape == (C,)
    val = COCOSegmentation(root, "val_part", resize=24)
    assert len(val) == 2
    item = val[1]
    assert item["image"].shape == (3, 24, 24) and item["label"].shape == item["image_uint8"].shape[:2]
    assert np.array_equal(item["cls_label"].numpy(), _classes_of(item["label"].numpy()))
    assert "val2014" in str(val.image_path(val.names[0]))


def test_coco_defaults_and_missing_file(synth, tmp_path):
    root = _coco_from(synth, tmp_path / "coco")
    labels = {k: np.zeros(80, np.float32) for k in _names(root, "train")}
    np.save(root / "cls_labels_onehot.npy", labels, allow_pickle=True)
    assert COCOClassification(root, "train", crop_size=32).class_names == list(COCO_CLASSES)
    assert len(COCO_CLASSES) == 81
    name = _names(root, "val")[0]
    (root / "SegmentationClass" / "val2014" / f"{name}.png").unlink()
    with pytest.raises(DatasetError) as e:
        COCOSegmentation(root, "val")
    assert str(root / "SegmentationClass" / "val2014" / f"{name}.png") in str(e.value)


# -- build_datasets ---------------------------------------------------------------------------

def test_build_datasets(synth):
    train, train_seg, val = build_datasets("voc", synth, "train_aug", "val", 40, aug="toco", seed=2, eval_resize=32)
    assert isinstance(train, VOCClassification) and train.transform.mode == "toco" and train.seed == 2
    assert isinstance(train_seg, VOCSegmentation) and train_seg.names == train.names
    assert isinstance(val, VOCSegmentation) and val[0]["image"].shape == (3, 32, 32)
    assert train[0]["image"].shape == (3, 40, 40)


def test_build_datasets_errors(synth, tmp_path):
    with pytest.raises(ValueError, match="coco.*voc"):
        build_datasets("imagenet", synth, "train", "val", 32)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "none"))):
        build_datasets("voc", tmp_path / "none", "train", "val", 32)
    with pytest.raises(ValueError, match="mode"):
        build_datasets("voc", synth, "train", "val", 32, aug="bogus")
