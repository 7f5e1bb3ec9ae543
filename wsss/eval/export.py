"""Writes predictions and pseudo labels as palette PNGs (SPEC §4 "Test set"); the engine of
``python -m wsss.infer``.

What is written comes from one export of the method (:mod:`wsss.methods.export`: a protocol's
row, e.g. MoRe's E2 + CRF, E3, E1-LAM + PAR, AReAM's training-time pseudo labels) applied to
every image of a split (val, test, train; masks never read) or of a folder of images:

- ``<out>/<name>.png``: 8-bit palette PNG (PIL mode "P", the VOC palette), values = class
  indices 0..C, 255 where the export leaves a pixel uncertain, at the image's original size; with
  ``voc_server`` under ``<out>/results/VOC2012/Segmentation/comp6_test_cls/`` (the layout the
  PASCAL evaluation server takes);
- ``<out>/overlays/<name>.png`` (``overlays``): the image blended with the coloured mask;
- ``<out>/classes.csv``: per image, the classes of its mask (names, ";"-separated).

Every file is written to a temporary name and renamed, and a file that exists is never computed
or written again, so a run that was interrupted continues where it stopped. Under ``torchrun``
the images still missing are sharded over the ranks (``wsss.utils.distributed.shard``),
every rank writes its own, and the only collectives are two barriers and the
summary's sums.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from wsss.config import Config
from wsss.data import DatasetError
from wsss.data.folder import ImageFolder, class_names_for, split_images
from wsss.data.synthetic import voc_palette
from wsss.methods import IGNORE, get_method
from wsss.utils.device import configure_precision, resolve_device
from wsss.utils.distributed import rank_and_world, shard
from wsss.utils.logging import get_logger
from wsss.utils.preflight import PreflightError, extension_problem, missing_file, raise_if

from .engine import stream
from .report import colorize

SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"  # SPEC §4 "Test set"
OVERLAY_DIR = "overlays"
CLASSES_CSV = "classes.csv"
OVERLAY_ALPHA = 0.5  # weight of the class colour where the mask is not background
TMP_SUFFIX = ".partial"  # ".<name>.<pid>.partial" beside the final file until it is complete
LOG_EVERY = 0.1  # without a terminal, log the progress every tenth of the images


def mask_png(labels: np.ndarray) -> Image.Image:
    """(H,W) class indices (0..255) → 8-bit palette image with the VOC palette."""
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette(voc_palette())  # mode L becomes P
    return im


def overlay_png(image_uint8: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image with the coloured mask blended in where it is not background."""
    out = image_uint8.astype(np.float32)
    fg = labels != 0
    out[fg] = (1.0 - alpha) * out[fg] + alpha * colorize(labels)[fg].astype(np.float32)
    return Image.fromarray(np.round(out).clip(0, 255).astype(np.uint8))


def write_atomic(path: Path, image: Image.Image) -> int:
    """Saves ``image`` as PNG at ``path`` through a temporary file and a rename (a killed run never
    leaves a truncated PNG under the final name); returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        image.save(tmp, format="PNG")
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _present_classes(labels: np.ndarray) -> List[int]:
    return [int(v) for v in np.unique(labels) if v != 0 and v != IGNORE]


class _Plan:
    """Everything checked before the model is loaded: the export, its row, the images, the paths."""

    def __init__(self, cfg: Config, ckpt, out, split, images, recursive, protocol, row, voc_server, overlays,
                 limit):
        self.out = Path(out)
        problems = missing_file("--ckpt", ckpt)
        if (split is None) == (images is None):
            problems.append("give exactly one of --split (a split of data.root) and --images (a folder)")
        if voc_server and images is not None:
            problems.append("--voc-server writes a split in the PASCAL server's layout; it does not apply to --images")
        if limit < 0:
            problems.append(f"--limit={limit}: must be >= 0 (0 = every image)")
        self.export, self.row = None, None
        try:
            method = get_method(cfg.model.method)
        except ValueError as e:
            raise_if("export", problems + [str(e)])
        exports = method.exports(cfg)
        known = "; ".join(f"{n} (rows {', '.join(e.rows)})" for n, e in exports.items())
        name = protocol or method.default_export(cfg)
        if name is None:
            problems.append(f"model.method={method.name} has no segmentation head, so it cannot segment images "
                            f"without image-level labels (a val/test split, a folder of images); it exports the "
                            f"pseudo labels of a split with image-level labels: --split {cfg.data.train_split} "
                            f"--protocol {' or '.join(exports) or '?'}")
        elif name not in exports:
            problems.append(f"--protocol {name}: unknown for model.method={method.name}; known: {known}")
        else:
            self.export = exports[name]
            self.row = row or self.export.default_row(cfg)
            if self.row not in self.export.rows:
                problems.append(f"--row {self.row}: protocol {name} has rows {', '.join(self.export.rows)}")
            elif self.row == "crf":
                problems += extension_problem("--row crf (dense CRF)")
        self.dataset = None
        try:
            if images is not None:
                self.dataset = ImageFolder(images, recursive=recursive, exclude=self.out)
            elif split is not None:
                self.dataset = split_images(cfg.data.dataset, cfg.data.root, split, cfg.data.cls_labels)
        except DatasetError as e:
            key = f"--images={images}" if images is not None else f"--split={split} (data.root={cfg.data.root})"
            problems.append(f"{key}: {e}")
        n = 0
        if self.dataset is not None:
            n = len(self.dataset) if not limit else min(limit, len(self.dataset))
        self.indices = list(range(n))
        if self.export is not None and self.dataset is not None and self.export.needs_image_labels:
            no_head = "" if method.default_export(cfg) else f" (model.method={method.name} has no segmentation head)"
            if images is not None:
                problems.append(f"--protocol {self.export.name} uses ground-truth image-level labels, which a folder "
                                f"of images does not have{no_head}")
            else:
                ds = self.dataset
                missing = [ds.names[i] for i in self.indices if not ds.has_image_label(ds.names[i])]
                if missing:
                    where = ds.cls_labels_path or f"{ds.root} (no cls_labels.npy)"
                    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                    problems.append(f"--protocol {self.export.name} uses ground-truth image-level labels: {where} "
                                    f"has none for {missing[0]!r}{more} of split {split!r}{no_head}")
        raise_if("export", problems)
        self.mask_dir = self.out / SERVER_DIR if voc_server else self.out
        self.overlays = (images is not None) if overlays is None else bool(overlays)

    def outputs(self, name: str) -> Dict[str, Path]:
        paths = {"mask": self.mask_dir / f"{name}.png"}
        if self.overlays:
            paths["overlay"] = self.out / OVERLAY_DIR / f"{name}.png"
        return paths


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _check_labels(labels: np.ndarray, item: dict, num_classes: int, what: str) -> None:
    size = tuple(item["image_uint8"].shape[:2])
    if labels.shape != size:
        raise RuntimeError(f"{what} returned labels of shape {labels.shape} for {item['name']!r}, not its image "
                           f"size {size}")
    bad = np.unique(labels[(labels > num_classes) & (labels != IGNORE)])
    if bad.size:
        raise RuntimeError(f"{what} returned values {bad.tolist()[:5]} outside 0..{num_classes}, {IGNORE}")


def _write_classes_csv(out: Path, rank: int, world: int, classes: Dict[str, List[int]], names: List[str],
                       order: List[str]) -> None:
    """Each rank's part, then (rank 0, after the barrier) one ``classes.csv`` in image order."""
    part = out / f".{CLASSES_CSV}.{rank}{TMP_SUFFIX}"
    part.write_text("".join(f"{n}\t{' '.join(map(str, c))}\n" for n, c in classes.items()))
    _barrier()
    if rank != 0:
        return
    merged: Dict[str, List[int]] = {}
    for r in range(world):
        path = out / f".{CLASSES_CSV}.{r}{TMP_SUFFIX}"
        for line in path.read_text().splitlines():
            n, _, c = line.partition("\t")
            merged[n] = [int(v) for v in c.split()]
        path.unlink()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "classes"])
    for n in order:
        if n in merged:
            w.writerow([n, ";".join(names[c] for c in merged[n])])
    tmp = out / f".{CLASSES_CSV}.{os.getpid()}{TMP_SUFFIX}"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / CLASSES_CSV)


@torch.no_grad()
def export_predictions(cfg: Config, ckpt, out, *, split: Optional[str] = None, images=None, recursive: bool = False,
                       protocol: Optional[str] = None, row: Optional[str] = None, voc_server: bool = False,
                       overlays: Optional[bool] = None, limit: int = 0) -> Dict:
    """Writes the masks of ``protocol``'s ``row`` (defaults: the method's segmentation export,
    ``crf`` when ``eval.crf`` else its first row) for every image of ``split`` (of
    ``cfg.data.root``) or of the folder ``images``; see the module docstring for the files.
    Checks everything first (:class:`~wsss.utils.preflight.PreflightError` naming each problem).
    Every rank of a process group calls it. Returns the summary (all ranks): ``images`` (masks
    computed now), ``skipped`` (already there), ``seconds``, ``images_per_s``, ``bytes``, ``out``."""
    from .evaluate import load_model

    log = get_logger()
    rank, world = rank_and_world()
    plan = _Plan(cfg, ckpt, out, split, images, recursive, protocol, row, voc_server, overlays, limit)
    ds, export, row = plan.dataset, plan.export, plan.row
    device = resolve_device(cfg.device)
    configure_precision(device, cfg.tf32)
    model, C = load_model(cfg, ckpt, device)
    if split is not None and ds.num_classes != C:
        raise PreflightError("export", [f"--ckpt={ckpt} has {C} classes but split {split!r} of data.root="
                                        f"{cfg.data.root} has {ds.num_classes}"])
    class_names = ds.class_names if split is not None else class_names_for(C, cfg.data.root)
    log.info("export %s, row %s (%s) of %d images to %s, %d process(es)", export.name, row, export.rows[row],
             len(plan.indices), plan.mask_dir, world)

    if rank == 0:  # temporary files of an interrupted run; nobody writes before the barrier below
        plan.out.mkdir(parents=True, exist_ok=True)
        for stale in plan.out.rglob(f".*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    todo = [i for i in plan.indices if not all(p.is_file() for p in plan.outputs(ds.names[i]).values())]
    _barrier()
    done = sorted(set(plan.indices) - set(todo))
    mine, mine_done = [todo[k] for k in shard(len(todo))], [done[k] for k in shard(len(done))]
    classes: Dict[str, List[int]] = {}
    for i in mine_done:  # the CSV lists every image: read back what an earlier run wrote
        with Image.open(plan.outputs(ds.names[i])["mask"]) as im:
            classes[ds.names[i]] = _present_classes(np.array(im))

    t0, written, done_now = time.time(), 0, 0
    show = rank == 0 and sys.stderr.isatty()
    every = max(1, math.ceil(LOG_EVERY * len(mine)))
    what = f"{export.name} row {row}"
    with tqdm(total=len(mine), unit="img", desc=what, disable=not show, dynamic_ncols=True) as bar:

        def consume(item, labels):
            nonlocal written, done_now
            name = item["name"]
            labels = labels.cpu().numpy()
            _check_labels(labels, item, C, what)
            for kind, path in plan.outputs(name).items():
                if path.is_file():
                    continue
                rgb = item["image_uint8"].numpy()
                written += write_atomic(path, mask_png(labels) if kind == "mask" else overlay_png(rgb, labels))
            classes[name] = _present_classes(labels)
            bar.update()
            done_now += 1
            if not show and rank == 0 and (done_now % every == 0 or done_now == len(mine)):
                rate = done_now / max(time.time() - t0, 1e-9)
                log.info("%d/%d images, %.2f images/s, ETA %.0f s", done_now, len(mine), rate,
                         (len(mine) - done_now) / rate)

        stream(ds, mine, lambda batch: export.predict(model, batch, device, row), consume, cfg, device)
    seconds = time.time() - t0

    _write_classes_csv(plan.out, rank, world, classes, class_names, [ds.names[i] for i in plan.indices])
    totals = torch.tensor([len(mine), len(mine_done), written], dtype=torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    n_new, n_skipped, n_bytes = (int(v) for v in totals.tolist())
    seconds = float(slowest.item())
    summary = {"images": n_new, "skipped": n_skipped, "seconds": seconds,
               "images_per_s": n_new / seconds if seconds > 0 else 0.0, "bytes": n_bytes, "out": str(plan.mask_dir),
               "protocol": export.name, "row": row, "processes": world}
    log.info("export done: %d images written, %d already there (skipped), %.1f s, %.2f images/s, %.2f MB written, "
             "%d process(es); masks in %s", n_new, n_skipped, seconds, summary["images_per_s"], n_bytes / 1e6, world,
             plan.mask_dir)
    return summary


__all__ = ["SERVER_DIR", "export_predictions", "mask_png", "overlay_png", "write_atomic"]
