"""Benchmark of the dense CRF and the regularized loss (SPEC §6).

- ``wsss.crf.dense_crf`` against pydensecrf2 on a 500×375 photograph, 21 labels, 10 mean-field
  iterations, at the official evaluation parameters (SPEC §4: Gaussian sxy 1 w 3, bilateral
  sxy 67 srgb 3 w 4) and at utils/dcrf.py's (3/3, 80/13/10); ours with 1 and 2 threads
  (``torch.set_num_threads``), with label agreement and mean |ΔQ| against pydensecrf2;
- ``DenseEnergyLoss`` forward+backward at B=4, K=21, 224×224 (CPU; CUDA when available).

Every implementation runs once to warm up, then ``--repeats`` rounds interleave all of them, so a
change of machine load hits each alike; speed-ups are ratios of the minima (the least disturbed
runs), the 1 → 2 thread scaling likewise. Prints a table and writes
``benchmarks/results/crf-<device>.md``. Run from the repository root:
``python benchmarks/bench_crf.py [--device cpu|cuda] [--repeats 7] [--threads 1,2]``. Never asserts.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.crf import dense_crf, dense_crf_batch
from wsss.crf.energy import IMAGENET_MEAN, IMAGENET_STD, DenseEnergyLoss

# SPEC §4: what every official MoRe/ToCo evaluation script passes; and utils/dcrf.py's defaults.
CRF_PARAM_SETS = {
    "official 1/3, 67/3/4": dict(num_iter=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4),
    "dcrf.py 3/3, 80/13/10": dict(num_iter=10, pos_xy_std=3, pos_w=3, bi_xy_std=80, bi_rgb_std=13, bi_w=10),
}


def natural_image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A photograph (matplotlib's sample image) resized to (h, w), or a synthetic scene."""
    try:
        import matplotlib.cbook
        from PIL import Image

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        image = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
        return np.array(image), "grace_hopper.jpg (matplotlib sample data)"
    except Exception:  # noqa: BLE001 - any failure falls back to the synthetic scene
        rng = np.random.default_rng(seed)
        low = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 8)).astype(np.float32))
        image = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        image = image + rng.normal(0, 8, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), "synthetic smooth scene + noise"


def network_like_probs(k: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Softmax of smooth random logit fields plus pixel noise: blobby, uncertain predictions."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.normal(0, 2.0, (1, k, 12, 16)).astype(np.float32))
    logits = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    logits = logits + rng.normal(0, 1.0, logits.shape)
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0)).astype(np.float32)


def pydensecrf_inference(image, probs, params):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params["pos_xy_std"], compat=params["pos_w"])
    crf.addPairwiseBilateral(sxy=params["bi_xy_std"], srgb=params["bi_rgb_std"], rgbim=image,
                             compat=params["bi_w"])
    return np.array(crf.inference(params["num_iter"])).reshape(k, h, w)


def timed(fn, sync=None):
    start = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - start, out


def with_threads(threads: int, fn):
    """fn() with torch's intra-op thread count (what dense_crf uses) set to `threads`."""
    def run():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)
    return run


def bench_dense_crf(repeats: int, device: str, thread_counts: list[int]) -> list[dict]:
    h, w, k = 375, 500, 21
    image, source = natural_image(h, w)
    probs = network_like_probs(k, h, w)
    try:
        import pydensecrf.densecrf  # noqa: F401
        have_baseline = True
    except ImportError:
        print("pydensecrf2 is not installed: no baseline (pip install pydensecrf2)")
        have_baseline = False
    rows = []
    for label, params in CRF_PARAM_SETS.items():
        impls = {}
        if have_baseline:
            impls["pydensecrf2"] = (1, lambda p=params: pydensecrf_inference(image, probs, p))
        for t in thread_counts:
            impls[f"wsss dense_crf ({t} thread{'s' if t > 1 else ''})"] = (
                t, with_threads(t, lambda p=params: dense_crf(image, probs, **p)))
        sync = None
        if device == "cuda":
            img_t = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous().cuda()
            prob_t = torch.from_numpy(probs)[None].cuda()
            impls["wsss dense_crf_batch (CUDA)"] = (
                0, lambda p=params: dense_crf_batch(img_t, prob_t, **p)[0].cpu().numpy())
            sync = torch.cuda.synchronize
        for _, fn in impls.values():  # warm-up (lazy extension load, first-touch allocations)
            fn()
        times = {name: [] for name in impls}
        outputs = {}
        for _ in range(repeats):  # interleaved, so a change of machine load hits every impl alike
            for name, (_, fn) in impls.items():
                dt, outputs[name] = timed(fn, sync)
                times[name].append(dt)
        one_thread = next((n for n, (t, _) in impls.items() if t == 1 and n != "pydensecrf2"), None)
        for name, ts in times.items():
            threads = impls[name][0]
            row = dict(op="dense_crf", params=label, size=f"{w}x{h}, K={k}, {params['num_iter']} it", impl=name,
                       threads=str(threads) if threads else "-", median_ms=1e3 * statistics.median(ts),
                       min_ms=1e3 * min(ts), agree="", dq="", speedup="", scaling="")
            if have_baseline and name != "pydensecrf2":
                ref = outputs["pydensecrf2"]
                row["agree"] = f"{100 * (outputs[name].argmax(0) == ref.argmax(0)).mean():.3f} %"
                row["dq"] = f"{np.abs(outputs[name] - ref).mean():.2e}"
                row["speedup"] = f"{min(times['pydensecrf2']) / min(ts):.2f}x"
            if one_thread and name.startswith("wsss dense_crf (") and name != one_thread:
                row["scaling"] = f"{min(times[one_thread]) / min(ts):.2f}x"
            rows.append(row)
    rows[0]["note"] = source
    return rows


def bench_energy_loss(repeats: int, devices: list[str]) -> list[dict]:
    B, K, H, W = 4, 21, 224, 224
    image, _ = natural_image(448, 448)
    crops = [image[:224, :224], image[224:, :224], image[:224, 224:], image[224:, 224:]]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, H, W, generator=g)
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[:, :20] = 255
    loss_fn = DenseEnergyLoss()
    rows = []
    for device in devices:
        xd, ld = x.to(device), label.to(device)
        sync = torch.cuda.synchronize if device == "cuda" else None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            logits_d = logits.to(device).requires_grad_(True)
            loss = loss_fn(xd, logits_d, ld)
            loss.backward()
            return loss

        step()
        ts = [timed(step, sync)[0] for _ in range(repeats)]
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else ""
        rows.append(dict(op="DenseEnergyLoss fwd+bwd", params="σ_rgb 15, σ_xy 100, scale 0.5",
                         size=f"B={B}, K={K}, {H}x{W}", impl=f"wsss ({device})",
                         threads=str(torch.get_num_threads()) if device == "cpu" else "-",
                         median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), agree="", dq="", speedup="",
                         scaling="", peak=peak))
    return rows


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine_description(device: str) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    lines.append(f"- load average at start (1/5/15 min): {load_average()}")
    return lines


def versions() -> str:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip() or "no commit"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
        rev += " + uncommitted changes" if dirty else ""
    except OSError:
        rev = "unknown"
    return (f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"pydensecrf2 {version('pydensecrf2')}, wsss git {rev}")


def format_table(rows: list[dict]) -> str:
    header = ("| op | parameters | size | impl | threads | median ms | min ms | peak MB | speed-up vs pydensecrf2 "
              "(min) | 1 → n threads (min) | label agreement | mean abs dQ |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['op']} | {r['params']} | {r['size']} | {r['impl']} | {r['threads']} | "
                     f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r.get('peak', '') or 'n/a'} | "
                     f"{r['speedup'] or '-'} | {r['scaling'] or '-'} | {r['agree'] or '-'} | {r['dq'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts for wsss dense_crf")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/crf-<device>.md)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    machine = machine_description(args.device)
    rows = bench_dense_crf(args.repeats, args.device, thread_counts)
    rows += bench_energy_loss(args.repeats, ["cpu"] + (["cuda"] if args.device == "cuda" else []))
    table = format_table(rows)
    print(table)
    name = "cpu" if args.device == "cpu" else "cuda-" + torch.cuda.get_device_name().lower().replace(" ", "-")
    out = args.out or Path(__file__).parent / "results" / f"crf-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        f"# Dense CRF and DenseEnergyLoss benchmark ({args.device})",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        *machine,
        f"- load average at end: {load_average()} (a load above the core count means other processes "
        "shared the CPUs: the timings, and the thread scaling most, are then disturbed)",
        versions(),
        f"- dense_crf input: {rows[0].get('note', '')}, 500x375, 21-class smooth random score fields + noise; "
        "parameters t / Gaussian sxy, w / bilateral sxy, srgb, w as in the table (official = SPEC §4)",
        f"- timings: wall clock, {args.repeats} interleaved rounds after one warm-up; speed-up and thread "
        "scaling are ratios of the minima; label agreement and mean |dQ| against pydensecrf2's output; "
        "peak MB only measured on CUDA",
        "",
        table,
        "",
    ])
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
