"""Benchmark the wsss.kernels ops: reference vs Triton, time, peak memory and bandwidth.

    python benchmarks/bench_kernels.py            # training sizes (SPEC §3.1, §5)
    python benchmarks/bench_kernels.py --quick    # reduced sizes, fewer repeats

Prints a table (op, size, impl, median ms, peak MB, GB/s, speed-up vs the reference) and writes
it with the machine, versions, command and date to ``benchmarks/results/kernels-<device>.md``.
On a machine without CUDA only the references run (the Triton interpreter is a correctness
tool, not something to time). Never asserts.

GB/s counts the bytes an op has to move at least (inputs read once, outputs written once; for
PAR the κ tensor and the masks once per iteration, as its kernels do) divided by the median
time, so the column compares implementations on the same work.
"""
import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    # glibc keeps freed heap blocks resident; mapping every block >= 64 KiB separately makes the
    # CPU peak-RSS measurement below see each tensor's allocation and release
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

import wsss.kernels as K  # noqa: E402

# HBM/GDDR peak bandwidth (GB/s) by device-name substring, from the vendors' data sheets
PEAK_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935,
            "A100": 1555, "L40S": 864, "RTX 4090": 1008, "RTX 3090": 936, "V100": 900}


# ---------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak extra memory (MB) of a block: CUDA allocator peak, or the rise of the process's peak
    RSS on CPU (VmHWM reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_kb("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.mb = float("nan") if self.base is None else max(_rss_kb("VmHWM") - self.base, 0) / 1024


def _rss_kb(field):
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) if match else 0
    except OSError:
        return 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, warmup, reps):
    """(median ms, peak MB) of fn(); the peak comes from one extra run."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    with PeakMemory(device) as mem:
        fn()
    return statistics.median(times), mem.mb


def copy_bandwidth(device):
    """Measured device-copy GB/s (read + write of 256 MB), the CPU's practical ceiling here."""
    x = torch.empty(2 ** 26, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms, _ = measure(lambda: y.copy_(x), device, 2, 5)
    return 2 * x.numel() * 4 / ms / 1e6


# ---------------------------------------------------------------------------------------------- cases
def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _backward(loss_fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        loss_fn().backward()
    return run


def cases(args, device):
    """Yield (op, size, fn_by_impl, bytes) for every benchmark case."""
    dt = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # PAR (SPEC §3.1): fp32 images in [0,1] and masks at half resolution
    B, Kc, H = args.par_batch, args.par_classes, args.par_size
    dil, iters = tuple(args.par_dilations), args.par_iters
    images = torch.rand(B, 3, H, H, generator=g).to(device)
    masks = torch.rand(B, Kc, H // 2, H // 2, generator=g).to(device).softmax(1)
    J = 8 * len(dil)
    par_bytes = _nbytes(images, masks) + B * J * H * H * 4 + iters * (B * J * H * H * 4 + 2 * B * Kc * H * H * 4)
    yield ("par_refine", f"B={B} K={Kc} {H}x{H} d={dil} it={iters}",
           lambda impl: (lambda: K.par_refine(images, masks, dil, iters, impl=impl)), par_bytes)

    # affinity losses (SPEC §3.2, §5): B images of h×h tokens, layers 8–11 of a 12-head ViT
    B, h, Hd, dh, D = args.aff_batch, args.aff_grid, args.heads, args.head_dim, args.feat_dim
    N, layers = h * h, args.aff_layers
    labels = torch.randint(0, 4, (B, h, h), generator=g).to(device)
    labels[:, :2] = 255
    feats = rand(B, D, h, h, dtype=dt).requires_grad_()
    yield ("masked_cosine_affinity_loss fwd+bwd", f"B={B} D={D} N={N}",
           lambda impl: _backward(lambda: K.masked_cosine_affinity_loss(feats, labels, impl=impl), [feats]),
           2 * _nbytes(feats) + _nbytes(labels))
    logits = [rand(B, N, N, dtype=dt, scale=2.0).requires_grad_() for _ in range(layers)]
    yield ("masked_sigmoid_affinity_loss fwd", f"{layers} layers x B={B} N={N}",
           lambda impl: (lambda: sum(K.masked_sigmoid_affinity_loss(x, labels, impl=impl) for x in logits)),
           sum(_nbytes(x) for x in logits))
    yield ("masked_sigmoid_affinity_loss fwd+bwd", f"{layers} layers x B={B} N={N}",
           lambda impl: _backward(lambda: sum(K.masked_sigmoid_affinity_loss(x, labels, impl=impl) for x in logits),
                                  logits),
           3 * sum(_nbytes(x) for x in logits))
    qs = [rand(B, Hd, N, dh, dtype=dt).requires_grad_() for _ in range(layers)]
    ks = [rand(B, Hd, N, dh, dtype=dt).requires_grad_() for _ in range(layers)]
    yield ("masked_sigmoid_affinity_loss_qk fwd+bwd", f"{layers} layers x B={B} Hd={Hd} N={N} dh={dh}",
           lambda impl: _backward(lambda: sum(K.masked_sigmoid_affinity_loss_qk(q, k, labels, impl=impl)
                                              for q, k in zip(qs, ks)), qs + ks),
           2 * sum(_nbytes(q, k) for q, k in zip(qs, ks)))

    # aggregation / propagation (SPEC §5): L layers, T = class tokens + N patches
    L, B, Cc = args.agg_layers, args.agg_batch, args.class_tokens
    T = Cc + args.agg_grid ** 2
    attn = rand(L, B, Hd, T, T, dtype=dt, scale=2.0)
    weights = torch.linspace(0.5, 1.0, L, device=device)
    yield ("aggregate_attention fwd", f"L={L} B={B} Hd={Hd} T={T}",
           lambda impl: (lambda: K.aggregate_attention(attn, weights, impl=impl)), _nbytes(attn) + B * T * T * 4)
    cam = torch.rand(B, Cc, args.agg_grid, args.agg_grid, generator=g).to(device)
    yield ("propagate_cam fwd", f"L={L} B={B} Hd={Hd} T={T} C={Cc}",
           lambda impl: (lambda: K.propagate_cam(cam, attn, Cc, weights, impl=impl)), _nbytes(attn) + 2 * _nbytes(cam))
    del attn
    q = rand(L, B, Hd, T, dh, dtype=dt)
    k = rand(L, B, Hd, T, dh, dtype=dt)
    yield ("propagate_cam_qk fwd", f"L={L} B={B} Hd={Hd} T={T} dh={dh} C={Cc}",
           lambda impl: (lambda: K.propagate_cam_qk(cam, q, k, Cc, weights, impl=impl)), _nbytes(q, k, cam) + _nbytes(cam))


# ---------------------------------------------------------------------------------------------- report
def write_results(out, name: str, title: str, device, notes: list, table: str) -> Path:
    """Writes ``# title — device``, the notes and the table to ``out`` (default
    ``benchmarks/results/<name>-<device>.md``) and says where."""
    out = Path(out) if out else Path(__file__).resolve().parent / "results" / f"{name}-{slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title} — {slug(device)}\n\n" + "\n".join(notes) + "\n\n" + table + "\n")
    print(f"\nwrote {out}")
    return out


def provenance(device, extra_versions: str = "") -> list:
    """Machine, versions, command and date lines for a benchmark results file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        f"- machine: {device_name(device)}; {platform.platform()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}"
        + extra_versions,
        f"- command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else platform.processor() or model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def slug(device):
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes and repeats (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="dtype of logits/q/k/features (default bfloat16 on CUDA, "
                                                 "float32 on CPU); PAR always runs on fp32 images")
    p.add_argument("--reps", type=int, default=None, help="timed repeats (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak bandwidth, overrides the table")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for both paths (default high: TF32, as wsss's tf32 "
                        "config sets for training; the Triton kernels follow it for fp32 products)")
    p.add_argument("--impls", default=None, help="comma list, default reference,triton (CUDA) / reference (CPU)")
    p.add_argument("--par-batch", type=int, default=4)
    p.add_argument("--par-classes", type=int, default=21)
    p.add_argument("--par-size", type=int, default=224)
    p.add_argument("--par-dilations", type=int, nargs="+", default=[1, 2, 4, 8, 12, 24])
    p.add_argument("--par-iters", type=int, default=10)
    p.add_argument("--aff-batch", type=int, default=4)
    p.add_argument("--aff-grid", type=int, default=28, help="token grid side (28 → N=784)")
    p.add_argument("--aff-layers", type=int, default=4, help="supervised layers (8–11 → 4)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--feat-dim", type=int, default=768)
    p.add_argument("--agg-layers", type=int, default=12)
    p.add_argument("--agg-batch", type=int, default=4)
    p.add_argument("--agg-grid", type=int, default=28)
    p.add_argument("--class-tokens", type=int, default=20)
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/kernels-<device>.md)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.quick:
        args.par_size, args.par_iters, args.aff_grid, args.agg_layers, args.agg_grid = 112, 10, 14, 4, 14
    reps = args.reps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.quick:
        reps, warmup = min(reps, 5 if cuda else 2), min(warmup, 1)
    impls = (args.impls or ("reference,triton" if cuda and K.HAS_TRITON else "reference")).split(",")
    if not cuda:
        impls = [i for i in impls if i == "reference"]  # interpreter timings are meaningless
    peak = args.peak_gbs or (next((v for k, v in PEAK_GBS.items() if k in torch.cuda.get_device_name(device)), None)
                             if cuda else None)
    copy_gbs = copy_bandwidth(device)

    rows = []
    for op, size, make, nbytes in cases(args, device):
        ref_ms = None
        for impl in impls:
            ms, mb = measure(make(impl), device, warmup, reps)
            ref_ms = ms if impl == "reference" else ref_ms
            gbs = nbytes / ms / 1e6
            rows.append(dict(op=op, size=size, impl=impl, ms=ms, mb=mb, gbs=gbs,
                             pct=(100 * gbs / peak) if peak else None,
                             speedup=(ref_ms / ms) if ref_ms else None))
            print(f"{op:40s} {size:42s} {impl:9s} {ms:10.2f} ms {mb:9.1f} MB {gbs:8.3g} GB/s", flush=True)

    header = "| op | size | impl | median ms | peak MB | GB/s | % of peak BW | speed-up |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        pct = f"{r['pct']:.1f}" if r["pct"] is not None else "n/a"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['ms']:.2f} | {r['mb']:.1f} | {r['gbs']:.3g} | "
                     f"{pct} | {sp} |")
    table = "\n".join(lines)
    print("\n" + table)

    notes = provenance(device) + [
        f"- dtype of logits / q / k / features: {args.dtype}; PAR on fp32 images; {warmup} warm-up and "
        f"{reps} timed runs per row, median reported; fp32 matmul precision {args.matmul_precision}",
        f"- peak bandwidth: {f'{peak:.0f} GB/s (data sheet)' if peak else 'n/a'}; measured copy bandwidth "
        f"{copy_gbs:.1f} GB/s (256 MB fp32 tensor copy)",
        "- GB/s = minimum bytes the op moves (inputs once, outputs once; PAR: κ and masks once per "
        "iteration) / median time",
        "- peak MB: CUDA allocator peak above the inputs; on CPU the rise of the process's peak RSS "
        "(VmHWM) during one run, glibc mmap threshold 64 KiB so freed tensors leave RSS",
    ]
    if not cuda:
        notes.append("- **CPU: only the PyTorch references are measured** (Triton runs here only in its "
                     "interpreter, which checks correctness and is not timed); speed-up is n/a")
    if args.quick:
        notes.append("- `--quick`: reduced sizes (PAR 112x112, token grid 14x14, 4 aggregation layers) and repeats")
    write_results(args.out, "kernels", "wsss.kernels benchmark", device, notes, table)


if __name__ == "__main__":
    main()
