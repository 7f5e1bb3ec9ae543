"""A synthetic data set in the VOC layout, for demos and tests that must run without downloads.

``python -m wsss.data.synthetic --out DIR [--seed 0 --num-train 400 --num-val 100 --size 160
--classes 6]`` writes::

    JPEGImages/<name>.jpg                  RGB, JPEG quality 95, H and W uniform in [0.75·size, size]
    SegmentationClass/<name>.png           palette PNG (VOC colours) of class indices, 255 on a
    SegmentationClassAug/<name>.png        thin band along every object boundary (as VOC); identical
    ImageSets/Segmentation/{train,train_aug,val}.txt   (train_aug = train)
    cls_labels.npy                         pickled dict {name: float32 one-hot (C,)}, train and val
    classes.txt                            background + C class names
    synthetic.json                         the generation parameters; written last

so :class:`~wsss.data.voc.VOCClassification` / :class:`~wsss.data.voc.VOCSegmentation` read it
as they read VOC. Each image shows 1–3 objects (typically 20–45 % of the image side) at random
position, scale and rotation over a cluttered low-saturation background with distractor lines
and blobs (label 0). Later objects occlude earlier ones and the labels follow what is visible.
Class k has its own shape family, its own texture and its own hue range (ranges do not
overlap; objects are saturated, background and distractors are not), so a small ViT trained
from scratch can learn the classes in minutes. Half of the images also hold a decoy: a bar
painted in some class's colours and texture, labelled background, so that colour alone does
not localise a class and CAMs face the false positives real data gives them.

Everything is a function of the seed: image i of a split is drawn from
``np.random.default_rng([seed, split_id, i])`` and a re-run writes the same bytes. A directory
that already holds a complete set generated with the same parameters is left as it is.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump whenever the drawing changes, so stale sets are regenerated
MARKER = "synthetic.json"
IGNORE_INDEX = 255
MAX_CLASSES = 20
MIN_SIZE = 32
JPEG_QUALITY = 95
SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "ellipse", "hexagon", "crescent", "diamond")
TEXTURES = ("stripes", "dots", "checker", "noise", "gradient", "concentric")
SPLIT_IDS = {"train": 0, "val": 1}

# Drawing parameters (fractions of min(H, W) unless noted).
OBJECT_DIAMETER = (0.22, 0.48)
OBJECTS_PER_IMAGE = (1, 3)
MIN_VISIBLE_FRACTION = 0.5  # an occluded object keeps at least this share of its pixels
PLACEMENT_TRIES = 12
DECOY_PROBABILITY = 0.5  # chance of one decoy: a bar painted like a random class, labelled background
DECOY_DIAMETER = (0.25, 0.45)
HUE_WIDTH_MAX = 0.08  # per-class hue range (fraction of the circle), at most 0.45/C
OBJECT_SATURATION = (0.6, 1.0)
BACKGROUND_SATURATION_MAX = 0.18
DISTRACTOR_SATURATION_MAX = 0.2
PIXEL_NOISE_STD = 3.0  # in 0..255 units
BOUNDARY_BAND = 1  # ignore pixels within this many pixels of a label change (both sides)


def voc_palette(n: int = 256) -> List[int]:
    """The PASCAL VOC colour map: the bits of the class index spread over R, G and B, most
    significant first (flat list of 3n values for ``Image.putpalette``)."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def class_table(num_classes: int) -> List[Dict]:
    """Per class: name, shape family, texture and hue range (centre, half-width)."""
    half_width = min(HUE_WIDTH_MAX, 0.45 / num_classes) / 2
    table = []
    for k in range(num_classes):
        shape = SHAPES[k % len(SHAPES)]
        round_ = k // len(SHAPES)
        name = shape if round_ == 0 else f"{shape}_{round_ + 1}"
        texture = TEXTURES[(k + 3 * round_) % len(TEXTURES)]
        table.append({"name": name, "shape": shape, "texture": texture,
                      "hue": (k / num_classes, half_width)})
    return table


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV (all in [0,1], hue wraps) → RGB float (…,3) in [0,1]."""
    h = np.mod(h, 1.0) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = np.mod(n + h, 6.0)
        out.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(out, axis=-1)


def _smooth_field(rng, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in [0,1]: a coarse uniform grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _background(rng, H: int, W: int) -> np.ndarray:
    value = _smooth_field(rng, (H, W), int(rng.integers(3, 7)))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy) / max(H, W)
    value = 0.6 * value + 0.4 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    lo = rng.uniform(0.2, 0.5)
    hi = min(0.92, lo + rng.uniform(0.2, 0.45))
    value = lo + (hi - lo) * value
    hue = rng.random() + 0.15 * _smooth_field(rng, (H, W), 3)
    sat = BACKGROUND_SATURATION_MAX * _smooth_field(rng, (H, W), int(rng.integers(2, 5)))
    return hsv_to_rgb(hue, sat, value).astype(np.float32)


def _muted_colour(rng) -> Tuple[float, float, float]:
    rgb = hsv_to_rgb(np.array(rng.random()), np.array(rng.uniform(0, DISTRACTOR_SATURATION_MAX)),
                     np.array(rng.uniform(0.15, 0.95)))
    return tuple(float(c) for c in rgb)


def _draw_distractors(rng, img: np.ndarray) -> None:
    """Thin lines and small blobs in muted colours; they are background (label 0)."""
    H, W = img.shape[:2]
    m = min(H, W)
    for _ in range(int(rng.integers(1, 5))):
        p0 = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        p1 = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        cv2.line(img, p0, p1, _muted_colour(rng), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 5))):
        centre = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        axes = (max(1, int(m * rng.uniform(0.03, 0.08))), max(1, int(m * rng.uniform(0.03, 0.08))))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, _muted_colour(rng), -1, cv2.LINE_AA)


def _regular_polygon(u, v, n: int, circumradius: float = 1.0) -> np.ndarray:
    """Inside test of a regular n-gon with a vertex on the +u axis."""
    inside = np.ones(u.shape, dtype=bool)
    apothem = circumradius * math.cos(math.pi / n)
    for k in range(n):
        a = 2 * math.pi * k / n + math.pi / n
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng) -> np.ndarray:
    """Shape family in normalised object coordinates (radius ≈ 1)."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1.0
    if shape == "square":
        aspect = rng.uniform(0.6, 1.0)  # squares and rectangles
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85 * aspect)
    if shape == "triangle":
        return _regular_polygon(u, v, 3, 1.15)
    if shape == "star":
        f = np.mod(5 * np.arctan2(v, u) / (2 * math.pi), 1.0)
        return r <= 0.45 + 0.6 * np.abs(2 * f - 1)
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if shape == "ellipse":
        return u ** 2 + (v / 0.55) ** 2 <= 1.0
    if shape == "hexagon":
        return _regular_polygon(u, v, 6, 1.0)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.5, v) > 0.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) / 0.65 <= 1.0
    if shape == "bar":  # decoys only: no class has this family
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng) -> np.ndarray:
    """Texture intensity in [0,1] over object pixel coordinates (u, v in pixels)."""
    if texture == "stripes":
        period = rng.uniform(5, 9)
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    if texture == "dots":
        spacing = rng.uniform(7, 10)
        du = np.mod(u, spacing) - spacing / 2
        dv = np.mod(v, spacing) - spacing / 2
        return (np.hypot(du, dv) <= 0.3 * spacing).astype(np.float32)
    if texture == "checker":
        cell = rng.uniform(5, 9)
        return np.mod(np.floor(u / cell) + np.floor(v / cell), 2).astype(np.float32)
    if texture == "noise":
        coarse = rng.random((max(2, u.shape[0] // 4), max(2, u.shape[1] // 4))).astype(np.float32)
        return cv2.resize(coarse, (u.shape[1], u.shape[0]), interpolation=cv2.INTER_LINEAR)
    if texture == "gradient":
        span = max(float(np.ptp(u)), 1.0)
        return (u - u.min()) / span
    if texture == "concentric":
        period = rng.uniform(6, 10)
        return 0.5 + 0.5 * np.sin(2 * math.pi * np.hypot(u, v) / period)
    raise ValueError(f"unknown texture {texture!r}")


def _object(rng, cls: Dict, H: int, W: int, shape=None, diameter=OBJECT_DIAMETER):
    """One object: (mask (H,W) bool, colour layer (H,W,3) float) — the layer is only valid
    under the mask. ``shape`` overrides the class's shape family (decoys)."""
    m = min(H, W)
    R = 0.5 * m * rng.uniform(*diameter)
    cx = rng.uniform(0.7 * R, W - 0.7 * R) if W > 1.4 * R else W / 2
    cy = rng.uniform(0.7 * R, H - 0.7 * R) if H > 1.4 * R else H / 2
    angle = rng.uniform(0, 2 * math.pi)
    reach = 1.2 * R + 1
    y0, y1 = max(0, int(cy - reach)), min(H, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(W, int(cx + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    local = _shape_mask(shape or cls["shape"], u / R, v / R, rng)
    t = _texture(cls["texture"], u, v, rng)
    centre, half = cls["hue"]
    hue = centre + rng.uniform(-0.5, 0.5) * half + 0.5 * half * (t - 0.5)
    sat = rng.uniform(*OBJECT_SATURATION) * (0.9 + 0.1 * t)
    v_hi, v_lo_frac = rng.uniform(0.75, 1.0), rng.uniform(0.45, 0.65)
    value = v_hi * (v_lo_frac + (1 - v_lo_frac) * t)
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = local
    layer = np.zeros((H, W, 3), dtype=np.float32)
    layer[y0:y1, x0:x1] = hsv_to_rgb(hue, sat, value)
    return mask, layer


def _boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a pixel with a different label (8-neighbourhood)."""
    H, W = label.shape
    band = np.zeros((H, W), dtype=bool)
    padded = np.pad(label, width, mode="edge")
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy or dx:
                band |= padded[width + dy:width + dy + H, width + dx:width + dx + W] != label
    return band


def render_image(rng: np.random.Generator, size: int, classes: List[Dict]) -> Tuple[np.ndarray, np.ndarray]:
    """One image (H,W,3) uint8 and its label (H,W) uint8 (0 background, k+1 class k, 255 band)."""
    H = int(rng.integers(math.ceil(0.75 * size), size + 1))
    W = int(rng.integers(math.ceil(0.75 * size), size + 1))
    img = _background(rng, H, W)
    _draw_distractors(rng, img)
    if rng.random() < DECOY_PROBABILITY:
        # Colour and texture alone must not give the class away: a bar in a class's colours
        # is background, so the network has to look at shape too.
        mask, layer = _object(rng, classes[int(rng.integers(0, len(classes)))], H, W, shape="bar",
                              diameter=DECOY_DIAMETER)
        img[mask] = layer[mask]
    owner = np.full((H, W), -1, dtype=np.int64)
    areas, object_classes = [], []
    for _ in range(int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))):
        k = int(rng.integers(0, len(classes)))
        for _ in range(PLACEMENT_TRIES):
            mask, layer = _object(rng, classes[k], H, W)
            area = int(mask.sum())
            if area == 0:
                continue
            trial = np.where(mask, len(areas), owner)
            visible = np.bincount(trial[trial >= 0], minlength=len(areas) + 1)
            if all(visible[i] >= MIN_VISIBLE_FRACTION * areas[i] for i in range(len(areas))):
                owner = trial
                img[mask] = layer[mask]
                areas.append(area)
                object_classes.append(k + 1)
                break
    class_of = np.array([0] + object_classes, dtype=np.uint8)
    label = class_of[owner + 1]
    label[_boundary_band(label, BOUNDARY_BAND)] = IGNORE_INDEX
    img = img * 255.0 + rng.normal(0.0, PIXEL_NOISE_STD, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label


def _check_args(seed, num_train, num_val, size, num_classes) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be an int in 1..{MAX_CLASSES}, got {num_classes!r}")
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not is_int(size) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _split_names(split: str, n: int) -> List[str]:
    return [f"{split}_{i:05d}" for i in range(n)]


def _is_complete(out: Path, params: Dict) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    fixed = [out / "cls_labels.npy", out / "classes.txt"] + [
        out / "ImageSets" / "Segmentation" / f"{s}.txt" for s in ("train", "train_aug", "val")]
    names = _split_names("train", params["num_train"]) + _split_names("val", params["num_val"])
    files = fixed + [p for n in names for p in (out / "JPEGImages" / f"{n}.jpg",
                                                out / "SegmentationClass" / f"{n}.png",
                                                out / "SegmentationClassAug" / f"{n}.png")]
    return all(p.is_file() for p in files)


def make_synthetic_dataset(out, seed: int = 0, num_train: int = 400, num_val: int = 100, size: int = 160,
                           num_classes: int = 6) -> Path:
    """Write the synthetic VOC-layout data set to ``out`` (see the module docstring); returns
    ``out`` as a Path. Skips the work when ``out`` already holds the same complete set."""
    _check_args(seed, num_train, num_val, size, num_classes)
    out = Path(out)
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "num_train": int(num_train),
              "num_val": int(num_val), "size": int(size), "num_classes": int(num_classes)}
    if _is_complete(out, params):
        log.info("synthetic data set in %s is complete for %s; not regenerating", out, params)
        return out
    t0 = time.time()
    dirs = [out / "JPEGImages", out / "SegmentationClass", out / "SegmentationClassAug",
            out / "ImageSets" / "Segmentation"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # an interrupted run must not look complete
    classes = class_table(num_classes)
    palette = voc_palette()
    cls_labels = {}
    for split, n in (("train", num_train), ("val", num_val)):
        names = _split_names(split, n)
        for i, name in enumerate(names):
            rng = np.random.default_rng([int(seed), SPLIT_IDS[split], i])
            image, label = render_image(rng, size, classes)
            Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
            png = Image.fromarray(label, mode="P")
            png.putpalette(palette)
            buf = io.BytesIO()
            png.save(buf, format="PNG")
            for d in ("SegmentationClass", "SegmentationClassAug"):
                (out / d / f"{name}.png").write_bytes(buf.getvalue())
            present = np.unique(label)
            present = present[(present != 0) & (present != IGNORE_INDEX)].astype(np.int64)
            onehot = np.zeros(num_classes, dtype=np.float32)
            onehot[present - 1] = 1.0
            cls_labels[name] = onehot
        text = "".join(f"{name}\n" for name in names)
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text)
        if split == "train":
            (out / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(text)
    with open(out / "cls_labels.npy", "wb") as f:
        np.save(f, cls_labels, allow_pickle=True)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in ["background"] + [c["name"] for c in classes]))
    (out / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    log.info("wrote %d train + %d val synthetic images (%d classes, size %d) to %s in %.1fs",
             num_train, num_val, num_classes, size, out, time.time() - t0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wsss.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (VOC layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=160, help="largest image side; sides vary in [0.75·size, size]")
    parser.add_argument("--classes", type=int, default=6, help=f"number of object classes, 1..{MAX_CLASSES}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        out = make_synthetic_dataset(args.out, args.seed, args.num_train, args.num_val, args.size, args.classes)
    except ValueError as e:
        parser.error(str(e))
    print(f"synthetic data set ready: {out} ({args.num_train} train, {args.num_val} val, {args.classes} classes)")


if __name__ == "__main__":
    main()
