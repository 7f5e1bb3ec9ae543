"""Result tables (Markdown, CSV, terminal) and PNG panels."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from wsss.data.synthetic import voc_palette

from .metrics import ConfusionMatrix


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def results_table(rows: Dict[str, ConfusionMatrix], baselines: Dict[str, ConfusionMatrix],
                  notes: Dict[str, str], over: Dict[str, str] = None) -> List[dict]:
    """One row per evaluated output: mIoU (averaged ``over`` the ground-truth classes or all,
    per row), pixel accuracy and the all-background baseline."""
    over = over or {}
    table = []
    for name, mat in rows.items():
        base = baselines.get(name)
        how = over.get(name, "gt")
        table.append({"result": name, "miou": mat.miou(how), "pixel_acc": mat.pixel_accuracy(),
                      "all_background_miou": base.miou(how) if base is not None else None,
                      "note": notes.get(name, "")})
    return table


def format_markdown(table: List[dict], per_class: Dict[str, ConfusionMatrix], class_names: Sequence[str],
                    header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += ["| result | mIoU | pixel acc | all-background mIoU | note |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['result']} | {_fmt(r['miou'])} | {_fmt(r['pixel_acc'])} | "
                     f"{_fmt(r['all_background_miou'])} | {r['note']} |")
    if per_class:
        names = list(per_class)
        lines += ["", "Per-class IoU", "", "| class | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        ious = {n: m.iou() for n, m in per_class.items()}
        for k, cname in enumerate(class_names):
            lines.append(f"| {cname} | " + " | ".join(_fmt(ious[n][k]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: List[dict], per_class: Dict[str, ConfusionMatrix], class_names: Sequence[str],
              path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["result", "metric", "value"])
        for r in table:
            for key in ("miou", "pixel_acc", "all_background_miou"):
                if r[key] is not None:
                    w.writerow([r["result"], key, f"{r[key]:.6f}"])
        for name, mat in per_class.items():
            for cname, v in zip(class_names, mat.iou()):
                w.writerow([name, f"iou/{cname}", "" if np.isnan(v) else f"{v:.6f}"])


def colorize(label: np.ndarray) -> np.ndarray:
    """Class indices → RGB with the VOC colour map (255 = ignore shows as the VOC boundary colour)."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    return palette[label.astype(np.int64).clip(0, 255)]


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(H,W) in [0,1] → RGB with matplotlib's jet colour map."""
    import matplotlib

    return (matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)


def save_panel(path: Path, tiles: Sequence[np.ndarray], titles: Sequence[str]) -> None:
    """Tiles of equal height side by side with a caption strip, as one PNG."""
    from PIL import Image, ImageDraw

    h = max(t.shape[0] for t in tiles)
    gap, strip = 4, 14
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, h + strip), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for tile, title in zip(tiles, titles):
        canvas.paste(Image.fromarray(tile), (x, strip))
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        x += tile.shape[1] + gap
    canvas.save(path)


def plot_series(curves: Dict[str, List], path: Path, xlabel: str, ylabel: str = "pseudo-label mIoU (%)") -> None:
    """Line plot of ``{label: [(point name, value), ...]}``: points named ``"<word> <int>"`` are
    the x axis, a point named ``"aggregated"`` a dashed level (AReAM's layer-wise analysis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, points) in enumerate(curves.items()):
        xs = [(int(n.split()[1]), v) for n, v in points if n != "aggregated"]
        color = f"C{i}"
        ax.plot([x for x, _ in xs], [100 * v for _, v in xs], marker="o", color=color, label=label)
        agg = [v for n, v in points if n == "aggregated"]
        if agg:
            ax.axhline(100 * agg[0], color=color, linestyle="--", linewidth=1, label=f"{label}: aggregated")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
