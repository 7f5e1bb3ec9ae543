"""Benchmark of the dense CRF and the regularized loss (SPEC §6).

- ``wsss.crf.dense_crf`` against pydensecrf2 on a 500×375 image, 21 labels, 10 mean-field
  iterations (MoRe's evaluation CRF, SPEC §4), with label agreement and mean |ΔQ|;
- ``DenseEnergyLoss`` forward+backward at B=4, K=21, 224×224 (CPU; CUDA when available).

Prints a table and writes ``benchmarks/results/crf-<device>.md``. Run from the repository root:
``python benchmarks/bench_crf.py [--device cpu|cuda] [--repeats 5]``. Never asserts.
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

CRF_PARAMS = dict(num_iter=10, pos_xy_std=3, pos_w=3, bi_xy_std=80, bi_rgb_std=13, bi_w=10)


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


def pydensecrf_inference(image, probs):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=CRF_PARAMS["pos_xy_std"], compat=CRF_PARAMS["pos_w"])
    crf.addPairwiseBilateral(sxy=CRF_PARAMS["bi_xy_std"], srgb=CRF_PARAMS["bi_rgb_std"], rgbim=image,
                             compat=CRF_PARAMS["bi_w"])
    return np.array(crf.inference(CRF_PARAMS["num_iter"])).reshape(k, h, w)


def timed(fn, sync=None):
    start = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - start, out


def bench_dense_crf(repeats: int, device: str) -> list[dict]:
    h, w, k = 375, 500, 21
    image, source = natural_image(h, w)
    probs = network_like_probs(k, h, w)
    threads = torch.get_num_threads()
    impls = {f"wsss dense_crf ({threads} threads)": lambda: dense_crf(image, probs, **CRF_PARAMS)}
    if threads > 1:
        impls["wsss dense_crf (1 thread)"] = lambda: dense_crf_batch(
            torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(), torch.from_numpy(probs)[None],
            num_threads=1, **CRF_PARAMS)[0].numpy()
    sync = None
    if device == "cuda":
        img_t = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous().cuda()
        prob_t = torch.from_numpy(probs)[None].cuda()
        impls["wsss dense_crf_batch (CUDA)"] = lambda: dense_crf_batch(img_t, prob_t, **CRF_PARAMS)[0].cpu().numpy()
        sync = torch.cuda.synchronize
    try:
        import pydensecrf.densecrf  # noqa: F401

        impls["pydensecrf2"] = lambda: pydensecrf_inference(image, probs)
    except ImportError:
        print("pydensecrf2 is not installed: no baseline (pip install pydensecrf2)")
    for fn in impls.values():  # warm-up (lazy extension load, first-touch allocations)
        fn()
    times = {name: [] for name in impls}
    outputs = {}
    for _ in range(repeats):  # interleaved, so a change of machine load hits every impl alike
        for name, fn in impls.items():
            dt, outputs[name] = timed(fn, sync)
            times[name].append(dt)
    base = "pydensecrf2" if "pydensecrf2" in impls else None
    rows = []
    for name, ts in times.items():
        row = dict(op="dense_crf", size=f"{w}x{h}, K={k}, 10 it", impl=name, median_ms=1e3 * statistics.median(ts),
                   min_ms=1e3 * min(ts), agree="", dq="", speedup="")
        if base and name != base:
            ref = outputs[base]
            row["agree"] = f"{100 * (outputs[name].argmax(0) == ref.argmax(0)).mean():.3f} %"
            row["dq"] = f"{np.abs(outputs[name] - ref).mean():.2e}"
            row["speedup"] = f"{statistics.median(times[base]) / statistics.median(ts):.2f}x"
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
        rows.append(dict(op="DenseEnergyLoss fwd+bwd", size=f"B={B}, K={K}, {H}x{W}", impl=f"wsss ({device})",
                         median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), agree="", dq="", speedup="",
                         peak=peak))
    return rows


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
    if hasattr(os, "getloadavg"):
        lines.append("- load average at start (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
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
    except OSError:
        rev = "unknown"
    return (f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"pydensecrf2 {version('pydensecrf2')}, wsss git {rev}")


def format_table(rows: list[dict]) -> str:
    header = "| op | size | impl | median ms | min ms | peak MB | speed-up vs pydensecrf2 | label agreement | mean abs dQ |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r.get('peak', '') or 'n/a'} | {r['speedup'] or '-'} | {r['agree'] or '-'} | {r['dq'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/crf-<device>.md)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    machine = machine_description(args.device)
    rows = bench_dense_crf(args.repeats, args.device)
    rows += bench_energy_loss(args.repeats, ["cpu"] + (["cuda"] if args.device == "cuda" else []))
    table = format_table(rows)
    print(table)
    name = "cpu" if args.device == "cpu" else "cuda-" + torch.cuda.get_device_name().lower().replace(" ", "-")
    out = args.out or Path(__file__).parent / "results" / f"crf-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    text = "\n".join([
        f"# Dense CRF and DenseEnergyLoss benchmark ({args.device})",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        *machine,
        f"- load average at end: {load_end}",
        versions(),
        f"- dense_crf input: {rows[0].get('note', '')}, 500x375, 21-class smooth random score fields + noise; "
        "parameters of SPEC §4 (10 iterations, Gaussian sxy 3 w 3, bilateral sxy 80 srgb 13 w 10)",
        f"- timings: wall clock, {args.repeats} interleaved repeats after one warm-up; label agreement and mean "
        "|dQ| against pydensecrf2's output; peak MB only measured on CUDA",
        "",
        table,
        "",
    ])
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
