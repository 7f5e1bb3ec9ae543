"""``wsss.eval``: runs a method's evaluation protocols (SPEC §4, §5) on a trained checkpoint.

The method (``wsss.methods``) says which protocols exist and predicts labels per image; this
module loads the model and data, runs every protocol over its split (sharded over the ranks of
``torchrun``, confusion matrices summed, so N processes give one process's result exactly),
picks the best threshold of swept rows, and writes ``results.md``, ``results.csv``,
``results.json`` and PNG panels. Every row names its protocol; the header lists each
protocol's images and seconds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict

import torch

from wsss.config import Config, save_config
from wsss.data import DatasetError, build_segmentation_set
from wsss.methods import get_method
from wsss.utils.device import configure_precision, resolve_device
from wsss.utils.distributed import all_reduce_confusion, rank_and_world, shard
from wsss.utils.logging import get_logger
from wsss.utils.preflight import extension_problem, missing_file, raise_if

from .engine import stream
from .metrics import ConfusionMatrix
from .report import colorize, format_markdown, heatmap, plot_series, results_table, save_panel, write_csv


def load_model(cfg: Config, ckpt_path, device):
    """``(model in eval mode on device, num_classes)`` from a wsss checkpoint or one saved by the
    official MoRe or AReAM / MCTformer-V2 code, recognised by its keys
    (``wsss.models.checkpoints.load_trained_model``)."""
    from wsss.models.checkpoints import FORMATS, load_trained_model

    model, num_classes, fmt = load_trained_model(ckpt_path, cfg.model, device)
    get_logger().info("loaded %s from %s", FORMATS[fmt], ckpt_path)
    return model.eval(), num_classes


def _load_data(cfg: Config, protocols) -> Dict:
    """The segmentation sets the protocols read, by split name (images at their original size),
    and ``problems``; the train split only when a protocol scores it."""
    d = cfg.data
    cls_labels = d.cls_labels or None
    try:
        splits = {"val": build_segmentation_set(d.dataset, d.root, d.val_split, cls_labels)}
    except ValueError as e:  # DatasetError and bad arguments
        return {}, [f"data ({d.dataset} at data.root={d.root}): {e}"]
    problems = []
    if any(p.split == "train" for p in protocols):
        try:
            splits["train"] = build_segmentation_set(d.dataset, d.root, d.train_split, cls_labels)
        except DatasetError as e:
            if cfg.eval.protocols:  # asked for by name: an error
                problems.append(f"eval.protocols {[p.name for p in protocols if p.split == 'train']} score the "
                                f"train split ({d.train_split}) against its masks: {e}")
            else:  # the default set: score what can be scored, and say so
                get_logger().warning("skipping the pseudo-label protocols: the train split has no masks (%s)", e)
    return splits, problems


def evaluate(cfg: Config, ckpt_path, out_dir=None) -> Dict:
    log = get_logger()
    device = resolve_device(cfg.device)
    configure_precision(device, cfg.tf32)
    rank, world = rank_and_world()
    method = get_method(cfg.model.method)
    # checked before the model is built or any image is read: every problem in one message
    problems = missing_file("--ckpt", ckpt_path)
    if cfg.eval.crf:
        problems += extension_problem("eval.crf=true (dense CRF)")
    try:
        protocols = method.protocols(cfg)
    except ValueError as e:
        protocols, problems = [], problems + [str(e)]
    splits, data_problems = _load_data(cfg, protocols)
    raise_if("evaluation", problems + data_problems)
    protocols = [p for p in protocols if p.split in splits]
    out_dir = Path(out_dir or Path(cfg.run_dir) / "eval")
    if rank == 0:
        (out_dir / "panels").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    model, C = load_model(cfg, ckpt_path, device)
    for split, ds in splits.items():
        if ds.num_classes != C:
            raise ValueError(f"--ckpt={ckpt_path} has {C} classes but data.root={cfg.data.root} ({split} split) "
                             f"has {ds.num_classes}")
    K = C + 1
    limits = {"train": cfg.eval.train_images, "val": cfg.eval.val_images}

    mats: Dict[str, object] = {}  # row -> matrix, or {threshold: matrix} for swept rows
    rows = {r.name: (p, r) for p in protocols for r in p.rows}
    for name, (_, r) in rows.items():
        mats[name] = {t: ConfusionMatrix(K) for t in r.sweep} if r.sweep else ConfusionMatrix(K)
    background = {s: ConfusionMatrix(K) for s in splits}
    seconds = {p.name: 0.0 for p in protocols}  # the network part of each protocol
    wall, counts = {}, {}
    panels = [0]
    with torch.no_grad():
        for split, ds in splits.items():
            on_split = [p for p in protocols if p.split == split]
            if not on_split:
                continue
            n = len(ds) if not limits[split] else min(limits[split], len(ds))
            counts[split] = n

            def predict(batch, on_split=on_split):
                outs = [{} for _ in batch]
                for p in on_split:
                    t0 = time.time()
                    for out, pred in zip(outs, p.predict(model, batch, device)):
                        out[p.name] = pred
                    seconds[p.name] += time.time() - t0
                return outs

            def consume(item, preds, split=split, on_split=on_split):
                gt = item["label"]
                background[split].update(torch.zeros_like(gt), gt)
                for p in on_split:
                    for name, pred in preds[p.name].items():
                        if isinstance(pred, dict):
                            for t, lab in pred.items():
                                mats[name][t].update(lab, gt)
                        else:
                            mats[name].update(pred, gt)
                if rank == 0 and panels[0] < cfg.eval.panels:
                    panels[0] += 1
                    first = on_split[0]
                    _write_panel(method, model, item, cfg, device, out_dir / "panels", first.rows[0].name,
                                 preds[first.name][first.rows[0].name])

            t0 = time.time()
            stream(ds, shard(n), predict, consume, cfg, device, crf=cfg.eval.crf)
            wall[split] = time.time() - t0
    flat = [m for v in mats.values() for m in (v.values() if isinstance(v, dict) else [v])]
    all_reduce_confusion(flat + list(background.values()))
    if world > 1:  # the slowest rank's time is the wall time
        t = torch.tensor(list(seconds.values()) + list(wall.values()), dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        seconds = dict(zip(seconds, t.tolist()[:len(seconds)]))
        wall = dict(zip(wall, t.tolist()[len(seconds):]))

    scored, baselines, notes, over = {}, {}, {}, {}
    for name, (p, r) in rows.items():
        m = mats[name]
        note = f"{p.name}: {r.note}"
        if isinstance(m, dict):
            t = max(m, key=lambda t: m[t].miou(r.over))
            m, note = m[t], f"{note}; best bkg {t:g}"
        scored[name], baselines[name], notes[name], over[name] = m, background[p.split], note, r.over
    table = results_table(scored, baselines, notes, over)
    for row in table:
        row["protocol"] = rows[row["result"]][0].name
    header = (f"Evaluation of `{ckpt_path}` ({cfg.model.method}) on `{cfg.data.root}`, {world} process(es)\n\n"
              + "\n".join(f"- {p.name} ({p.description}): {counts[p.split]} {p.split} images, network {seconds[p.name]:.1f} s"
                          for p in protocols)
              + "\n" + "\n".join(f"- {split} split: {counts[split]} images in {wall[split]:.1f} s wall time "
                                  f"({counts[split] / max(wall[split], 1e-9):.2f} images/s, batches of "
                                  f"{cfg.eval.batch_size}{', CRFs beside the network' if cfg.eval.crf else ''})"
                                  for split in wall))
    series: Dict[str, list] = {}
    for row in table:
        r = rows[row["result"]][1]
        if r.series:
            series.setdefault(r.series[0], []).append((r.series[1], row["miou"]))
    result = {"table": table, "out_dir": str(out_dir), "seconds": seconds, "wall_seconds": wall, "series": series}
    if rank == 0:
        class_names = list(next(iter(splits.values())).class_names)
        markdown = format_markdown(table, scored, class_names, header)
        for name, points in series.items():
            plot_series({"this model": points}, out_dir / f"{name}.png", xlabel=name)
            markdown += (f"\n{name} (`{name}.png`)\n\n| point | mIoU |\n|---|---|\n"
                         + "".join(f"| {p} | {100 * v:.1f} |\n" for p, v in points))
        (out_dir / "results.md").write_text(markdown)
        write_csv(table, scored, class_names, out_dir / "results.csv")
        (out_dir / "results.json").write_text(json.dumps({"table": table, "seconds": seconds, "wall_seconds": wall},
                                                         indent=2))
        result["markdown"] = markdown
        log.info("evaluation written to %s", out_dir)
    return result


def _write_panel(method, model, item, cfg, device, panel_dir: Path, row: str, pred) -> None:
    """image | ground truth | the method's maps | ``pred``, the prediction of ``row``."""
    maps, titles = method.panel(model, item, cfg, device)
    if isinstance(pred, dict):
        pred = pred[sorted(pred)[len(pred) // 2]]  # the middle of a swept row's thresholds
    tiles = [item["image_uint8"].numpy(), colorize(item["label"].numpy())] + [heatmap(m) for m in maps]
    tiles.append(colorize(pred.cpu().numpy()))
    save_panel(panel_dir / f"{item['name']}.png", tiles, ["image", "ground truth", *titles, row[:24]])


__all__ = ["evaluate", "load_model"]
