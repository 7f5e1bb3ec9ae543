"""Benchmark one full training step: iterations/s and peak memory, fast paths vs references.

    python benchmarks/bench_train.py                          # CUDA: each method at its VOC setting
    python benchmarks/bench_train.py --device cpu             # CPU: reduced (ViT-S/16, 224x224, batch 2)
    python benchmarks/bench_train.py --amp bf16 --compile --method more

The step is the real one: the method's VOC config (MoRe ``configs/voc.yaml``: ViT-B/16,
448x448, batch 4; AReAM ``configs/voc_aream.yaml``: DeiT-S/16, 224x224, batch 64) through
``wsss.config.load_config``, the model of ``wsss.models.build_model``, the optimizer and
schedule of ``wsss.train.optim``, the method's objective (``wsss.methods``), then
backward and the optimizer step as in ``wsss.train.loop``. It runs at the iteration where every
loss stage has started (``Schedule.all_losses_from``; AReAM: ``aream.aff_start``), before ``cam2mask``, so every loss of the method is on (MoRe:
cls, aux, tok, cle, une, ptc, seg, reg; AReAM: cls, patch, aff with the online layer entropies),
on a synthetic batch of smooth random images with 1–3 random classes each. Two rows per method:

- ``auto``: the fast paths — Triton kernels (PAR, ptc, AReAM's affinity loss from q, k) on
  CUDA, SDPA attention, the C++/CUDA lattice of the energy loss;
- ``reference``: ``impl=reference`` (the PyTorch references of those kernels) and timm's eager
  attention instead of SDPA. The energy loss stays on the lattice extension in both rows: its
  brute-force reference is O(pixels²) and does not fit at these sizes.

On a CPU ``impl=auto`` resolves to the references too, so the two rows differ only in the
attention. AReAM's layers whose q, k the loss reads (with the online entropies: all of them) run
through wsss's own block, which uses SDPA in both rows. Prints a table and writes it with the
machine, versions, command and date to ``benchmarks/results/train-<device>.md``. Never asserts.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    # as in bench_kernels.py: freed tensors must leave RSS for the CPU peak-memory measurement
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_kernels import PeakMemory, _rss_kb, _sync, provenance, write_results  # noqa: E402
from wsss.config import load_config  # noqa: E402
from wsss.models import build_model  # noqa: E402
from wsss.train.loop import NonFiniteGuard, _to_device, train_step  # noqa: E402
from wsss.train.optim import build_optimizer  # noqa: E402
from wsss.methods import Schedule, get_method  # noqa: E402
from wsss.utils.device import autocast, seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOC_CLASSES = 20
IMPLS = ("auto", "reference")
METHOD_CONFIGS = {"more": "configs/voc.yaml", "baseline": "configs/voc.yaml", "aream": "configs/voc_aream.yaml"}
# AReAM's offline layer entropies come from a trained classifier; the benchmark uses the online estimate
METHOD_OVERRIDES = {"aream": ["aream.entropy=online"]}
# CPU defaults: the VOC settings take minutes per step on a few cores
CPU_SIZE, CPU_BATCH, CPU_BACKBONE = 224, 2, "vit_small_patch16_224"


def synthetic_batch(batch: int, size: int, num_classes: int, device, seed: int = 0) -> dict:
    """The keys the objectives read (``wsss.data.voc.ClassificationDataset`` items, batched):
    normalised images (smooth blobs + noise, so PAR and the CRF see edges), 1–3 classes per image
    and the valid-pixel mask."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, size // 32), max(2, size // 32), generator=g)
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    image = image + 0.05 * torch.randn(batch, 3, size, size, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cls_label = torch.zeros(batch, num_classes)
    for b in range(batch):
        k = int(torch.randint(1, 4, (1,), generator=g))
        cls_label[b, torch.randperm(num_classes, generator=g)[:k]] = 1.0
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    return {"image": ((image - mean) / std).to(device), "cls_label": cls_label.to(device), "valid": valid.to(device),
            "name": [f"synthetic_{b}" for b in range(batch)]}


def set_eager_attention(model) -> int:
    """Switch timm's attention modules from SDPA to the explicit softmax(q·kᵀ)·v path."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            n += 1
    return n


def shape_overrides(args, method: str, cuda: bool) -> list:
    """Backbone, size and batch overrides of a row: the command line's, else none on CUDA (the
    config's VOC setting) and the reduced CPU defaults on a CPU."""
    backbone = args.backbone or (None if cuda or method == "aream" else CPU_BACKBONE)  # AReAM is DeiT-S already
    size = args.size or (None if cuda else CPU_SIZE)
    batch = args.batch or (None if cuda else CPU_BATCH)
    return [f"{k}={v}" for k, v in (("model.backbone", backbone), ("data.crop_size", size),
                                    ("train.batch_size", batch)) if v is not None]


def build_step(args, method: str, impl: str, device):
    """(step function, config, loss names) for one row, built the way ``wsss.train.loop.train`` does."""
    path = REPO / METHOD_CONFIGS.get(method, "configs/voc.yaml")
    # amp quoted: YAML 1.1 reads a bare off as false
    overrides = [f"model.method={method}", f"impl={impl}", f'amp="{args.amp}"', f"device={device}",
                 "model.pretrained=", f"compile={'true' if args.compile else 'false'}",
                 *METHOD_OVERRIDES.get(method, []), *shape_overrides(args, method, device.type == "cuda"),
                 *args.override]
    cfg = load_config(path, overrides)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, VOC_CLASSES).to(device)
    if impl == "reference":
        set_eager_attention(model)
    if cfg.compile:
        model.backbone.compile()
    model.train()
    # epoch-based schedules (AReAM's cosine_epoch) need an epoch length: any is fine for timing
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_iters, iters_per_epoch=1,
                                 global_batch=cfg.train.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    schedule = Schedule.from_config(cfg)
    loss_fn = get_method(cfg.model.method).objective(cfg, device)
    if hasattr(loss_fn, "prepare"):
        loss_fn.prepare(model, cfg)
    amp_ctx = autocast(device, cfg.amp)
    batch = synthetic_batch(cfg.train.batch_size, cfg.data.crop_size, VOC_CLASSES, "cpu", cfg.seed)
    batch = _to_device(batch, device)  # as the loop moves a loader batch (with its host class count)
    # first iteration with every loss on: MoRe's seg/energy losses, AReAM's affinity loss
    step_index = max(schedule.all_losses_from, schedule.aff_start)
    names = []
    guard = NonFiniteGuard(device)

    def step():
        # the loop's own step: objective, device-side finite flag, backward + optimizer step; the
        # flag is read once per log interval, as the loop does
        train_step(loss_fn, model, model, batch, step_index, cfg, schedule, amp_ctx, opt, scaler, sched, guard)
        names[:] = sorted(guard.pending[-1][1])
        if len(guard.pending) >= cfg.train.log_interval:
            guard.check()

    return step, cfg, names


def resident_mb(device) -> float:
    """Memory held now: CUDA allocated bytes, or the process's RSS on CPU."""
    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else _rss_kb("VmRSS") / 1024


def prepare_row(step, device, warmup: int) -> dict:
    """Warm ``step`` up, then run it once more for its memory: the peak above the state that
    stays resident between steps (weights, gradients, optimizer state)."""
    for _ in range(warmup):
        step()
    _sync(device)
    with PeakMemory(device) as mem:
        step()
    return dict(mb=mem.mb)


def time_rows(rows: list, device, iters: int) -> None:
    """Timed steps, interleaved over the rows (row 1, row 2, ..., row 1, ...) so that load from
    other processes on a shared machine falls on every row alike."""
    for _ in range(iters):
        for r in rows:
            t0 = time.perf_counter()
            r["run"]()
            _sync(device)
            r["times"].append(time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--backbone", default=None, help="named backbone (default: the config's on CUDA; "
                                                    f"{CPU_BACKBONE} for MoRe on CPU)")
    p.add_argument("--size", type=int, default=None, help=f"crop size (default: the config's; {CPU_SIZE} on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per step and process (default: the config's; "
                                                          f"{CPU_BATCH} on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CUDA, 1 CPU)")
    p.add_argument("--method", default="more,aream", help="comma list of model.method values: more, aream, "
                                                         "baseline")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of rows: auto, reference")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="compile=true: torch.compile the backbone (warm-up "
                                                          "includes compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/train-<device>.md)")
    p.add_argument("override", nargs="*", help="further dotted config overrides, e.g. model.depth=6")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    iters = max(1, args.iters or (20 if cuda else 3))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows, skipped = [], []
    for method in args.method.split(","):
        for impl in args.impls.split(","):
            gc.collect()
            before = resident_mb(device)
            try:
                step, cfg, names = build_step(args, method, impl, device)
            except (ValueError, KeyError, NotImplementedError) as e:  # e.g. a method this version lacks
                if method == "more":
                    raise
                skipped.append(f"{method} / {impl}: {type(e).__name__}: {e}")
                print(f"skipping {method} / {impl}: {e}", flush=True)
                break
            row = prepare_row(step, device, warmup)
            # weights, gradients and optimizer state of this row; the other rows' stay allocated too
            row["resident"] = resident_mb(device) - before
            m = cfg.model
            at_voc = not (shape_overrides(args, method, cuda) or args.override)
            row.update(method=method, impl=impl, run=step, times=[], step=f"{method} step ({'+'.join(names)})",
                       size=f"{m.backbone if not (m.embed_dim or m.depth) else 'custom ViT'} "
                            f"{cfg.data.crop_size}x{cfg.data.crop_size} B={cfg.train.batch_size}"
                            + ("" if at_voc else " (reduced)"),
                       at_voc=at_voc, max_iters=cfg.train.max_iters)
            rows.append(row)
            print(f"{method:8s} {impl:9s} built and warmed up: {row['resident']:.0f} MB resident, step peak "
                  f"{row['mb']:.0f} MB above it", flush=True)
    time_rows(rows, device, iters)
    for r in rows:
        r["sec"] = statistics.median(r["times"])
        r["total"] = r["resident"] + r["mb"]
        del r["run"]
        print(f"{r['method']:8s} {r['size']:34s} {r['impl']:9s} {r['sec']:8.3f} s/it {1 / r['sec']:7.3f} it/s "
              f"{r['mb']:9.1f} MB {r['total']:9.1f} MB total", flush=True)
    for r in rows:
        ref = next((q for q in rows if q["method"] == r["method"] and q["impl"] == "reference"), None)
        r["speedup"] = ref["sec"] / r["sec"] if ref else None

    header = ("| step | size | impl | median s/it | min s/it | it/s | peak MB (step) | peak MB (total) | speed-up | "
              "projected run (max_iters x s/it) |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "n/a"
        if not cuda:
            proj = "n/a (CPU, reduced size)"
        else:
            proj = (f"{r['max_iters']} it: {r['max_iters'] * r['sec'] / 3600:.1f} h"
                    + ("" if r["at_voc"] else " (reduced size)"))
        lines.append(f"| {r['step']} | {r['size']} | {r['impl']} | {r['sec']:.3f} | {min(r['times']):.3f} | "
                     f"{1 / r['sec']:.3f} | "
                     f"{r['mb']:.0f} | {r['total']:.0f} | {sp} | {proj} |")
    table = "\n".join(lines)
    print("\n" + table)

    import timm

    notes = provenance(device, f", timm {timm.__version__}")
    if load:
        notes.append("- load average at start (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in load))
    notes += [
        "- step: the method's VOC config (MoRe configs/voc.yaml, AReAM configs/voc_aream.yaml with "
        "aream.entropy=online) once every loss stage has started (AReAM: aff_start), all losses on; loss + backward + "
        "AdamW step; "
        f"amp={args.amp}, compile={'true' if args.compile else 'false'}; per row {warmup} warm-up step(s) and "
        f"one memory step, then {iters} timed steps interleaved over the rows, median and min reported; "
        "synthetic batch (smooth random images, 1–3 of 20 classes each)",
        "- impl: `auto` = Triton kernels on CUDA (PAR, ptc, AReAM's affinity loss from q, k) + SDPA attention; "
        "`reference` = impl=reference + eager attention; the energy loss uses the C++/CUDA lattice in both; "
        "speed-up = reference s/it / row s/it; one process, no DDP",
        "- peak MB (step): CUDA allocator peak during one step above what stays allocated between steps; on "
        "CPU the rise of the process's peak RSS (VmHWM) in it, glibc mmap threshold 64 KiB. peak MB (total): "
        "that plus the row's resident state (weights, gradients, optimizer state: allocated memory, on CPU RSS, "
        "after the warm-up minus before the row was built; on CPU the first row also carries one-off library "
        "start-up); CUDA context and allocator cache not included",
        "- projected run: the config's max_iters x median s/it, CUDA only; an upper "
        "bound (before the later loss stages / aff_start a step skips the pseudo labels and the losses on them), without "
        "data loading and periodic evaluation; per process, so for one GPU at the config's per-process batch",
    ]
    if any(not r["at_voc"] for r in rows):
        notes.append("- **(reduced): not the VOC setting** (MoRe: ViT-B/16, 448x448, batch 4; AReAM: DeiT-S/16, "
                     "224x224, batch 64)" + (f"; overrides {' '.join(args.override)}" if args.override else ""))
    if not cuda:
        notes.append("- **CPU**: `impl=auto` resolves to the PyTorch references here, so `auto` and `reference` "
                     "differ only in SDPA vs eager attention")
    if any(r["method"] == "aream" for r in rows):
        notes.append("- AReAM: the layers whose q, k the loss reads (with the online entropies all of them) run "
                     "through wsss's own block with SDPA in both rows; on a CPU its two rows run the same code")
    for line in skipped:
        notes.append(f"- skipped {line}")
    write_results(args.out, "train", "Training-step benchmark", device, notes, table)


if __name__ == "__main__":
    main()
