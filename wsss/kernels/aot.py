"""Ahead-of-time compile check of the Triton kernels for sm_80 and sm_90, without a GPU.

Every launcher of ``wsss.kernels`` launches through ``_common.launch``; inside
``_common.recording()`` the launchers run on meta tensors, choose their configurations as on
CUDA and hand back the launches instead of running them. Each recorded launch is then
specialised and compiled by Triton's own JIT (``kernel.warmup``) with a stand-in driver that
reports the target architecture, so the compiled variant is exactly the one a launch of those
shapes and dtypes would build; ptxas's resource usage is read back from the cubin with the
``cuobjdump`` shipped in the triton wheel.

    python -m wsss.kernels.aot                 # table for every variant, sm_80 and sm_90
    python -m wsss.kernels.aot --json --use train eval

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels by Python
functions); tests/test_triton_compile.py runs it in a subprocess. ``TRITON_CACHE_DIR`` caches
the cubins between runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import _common
from ._common import HAS_TRITON, interpreting

ARCHS = (80, 90)
# per-SM limits (CUDA occupancy calculator): registers, resident warps and blocks, shared memory
# per SM and the 1 KB the driver reserves per block (sm_80 A100: 164 KB; sm_90 H100/H200: 228 KB)
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=167936, smem_reserved=1024),
             90: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_reserved=1024)}
USES = ("train", "eval", "api")  # what launches a variant: training, evaluation, or only the public API


# ----------------------------------------------------------------------------------------------
# the shapes that matter (SPEC §3 MoRe, §5 AReAM)
# ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One call of an op's launchers: ``run`` calls them on meta tensors."""

    op: str
    use: str
    shape: str
    dtype: torch.dtype
    run: Callable[[], None]

    @property
    def name(self) -> str:
        return f"{self.op} [{self.shape}, {str(self.dtype).replace('torch.', '')}]"


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _dot_loss(B: int, N: int, D: int, mode: int, dtype: torch.dtype) -> Callable[[], None]:
    """Forward and backward of the fused affinity loss as the public functions call them."""
    from . import affinity as A

    def run():
        cosine = mode == A.MODE_COSINE
        x = _meta(B, N, D, dtype=torch.float32 if cosine else dtype)  # ptc: fp32 normalised features
        y = x if cosine else _meta(B, N, D, dtype=dtype)
        labels = _meta(B, N, 1, dtype=torch.long)
        loss, counts, scores = A._dot_loss_forward(x, y, labels, mode, 255, cosine, 0.125, True, dtype)
        A._dot_loss_backward(torch.ones((), device="meta"), counts, scores, x, y, labels, mode, 255, cosine, 0.125,
                             dtype)
    return run


def _propagate_qk(L: int, B: int, Hd: int, C: int, N: int, dh: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import attention as A

    def run():
        q = _meta(L, B, Hd, C + N, dh, dtype=dtype)
        A._launch_propagate(_meta(B, C, N, 1), None, q, q, _meta(L), C, dh ** -0.5)
    return run


def _propagate_logits(L: int, B: int, Hd: int, C: int, N: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import attention as A

    def run():
        A._launch_propagate(_meta(B, C, N, 1), _meta(L, B, Hd, C + N, C + N, dtype=dtype), None, None, _meta(L), C,
                            1.0)
    return run


def _aggregate(L: int, B: int, Hd: int, T: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import attention as A

    def run():
        x = _meta(L, B, Hd, T, T, dtype=dtype)
        A._aggregate_forward(x, _meta(L))
        A._aggregate_backward_launch(_meta(B, T, T), x, _meta(L))
    return run


def _sigmoid_logits(B: int, N: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import affinity as A

    def run():
        logits, labels = _meta(B, N, N, dtype=dtype), _meta(B, N, 1, dtype=torch.long)
        loss, counts = A._sigmoid_loss_forward(logits, labels, 255, False)
        A._sigmoid_loss_backward(torch.ones((), device="meta"), counts, logits, labels, 255, False)
    return run


def _par(B: int, K: int, H: int, W: int) -> Callable[[], None]:
    from . import par as P

    def run():
        P._par_refine_triton(_meta(B, 3, H, W), _meta(B, K, H // 2, W // 2), [1, 2, 4, 8, 12, 24], 1, 0.3, 0.01)
    return run


HALF = (torch.bfloat16, torch.float16)
ALL = (torch.float32,) + HALF
# MoRe (SPEC §3): B=4, 448 crop, patch 16 → 28×28 = 784 tokens of ViT-B (D=768); PAR at 224
# (down_scale 2) on up to 2·(1+C) channels. AReAM (SPEC §5): DeiT-S (D=384 = 6 heads × 64), 12
# layers, batch 64 of 224 crops (196 tokens; 384 crops: 576), C class tokens, refinement over
# layer_index 7 layers; evaluation up to 500×375 at scale 1.5 → 752×576 padded → 47×36 = 1692.
EVAL_TOKENS = 47 * 36


def variants() -> List[Variant]:
    from .affinity import MODE_COSINE, MODE_SIGMOID

    out = []
    for dt in ALL:
        out.append(Variant("masked_cosine_affinity_loss fwd+bwd", "train", "MoRe B=4 N=784 D=768", dt,
                           _dot_loss(4, 784, 768, MODE_COSINE, dt)))
    for N, crop in ((196, 224), (576, 384)):
        for dt in ALL:
            out.append(Variant("masked_sigmoid_affinity_loss_qk fwd+bwd", "train",
                               f"AReAM {crop} crop B=64 N={N} D=6x64", dt, _dot_loss(64, N, 384, MODE_SIGMOID, dt)))
    for dt in ALL:
        out.append(Variant("propagate_cam_qk", "train", "AReAM pseudo labels L=7 B=64 C=20 N=196", dt,
                           _propagate_qk(7, 64, 6, 20, 196, 64, dt)))
    for C in (20, 80):
        for dt in ALL:
            out.append(Variant("propagate_cam_qk", "eval", f"AReAM eval L=12 B=2 C={C} N={EVAL_TOKENS}", dt,
                               _propagate_qk(12, 2, 6, C, EVAL_TOKENS, 64, dt)))
    out.append(Variant("propagate_cam_qk", "eval", "AReAM layer entropy L=1 B=1 C=20 N=196", torch.float32,
                       _propagate_qk(1, 1, 6, 20, 196, 64, torch.float32)))
    for K in (42, 162):
        out.append(Variant("par_refine", "train", f"MoRe pseudo labels B=4 K={K} 224x224", torch.float32,
                           _par(4, K, 224, 224)))
    for K in (4, 6, 12):
        out.append(Variant("par_refine", "eval", f"PAR labels B=1 K={K} 250x188", torch.float32, _par(1, K, 250, 188)))
    out.append(Variant("propagate_cam", "api", "L=12 B=4 C=20 N=784", torch.float32,
                       _propagate_logits(12, 4, 6, 20, 784, torch.float32)))
    out.append(Variant("propagate_cam", "api", "L=12 B=4 C=20 N=784", torch.bfloat16,
                       _propagate_logits(12, 4, 6, 20, 784, torch.bfloat16)))
    out.append(Variant("aggregate_attention fwd+bwd", "api", "L=12 B=4 Hd=6 T=804", torch.float32,
                       _aggregate(12, 4, 6, 804, torch.float32)))
    out.append(Variant("masked_sigmoid_affinity_loss fwd+bwd", "api", "B=4 N=576", torch.float32,
                       _sigmoid_logits(4, 576, torch.float32)))
    return out


# ----------------------------------------------------------------------------------------------
# compiling without a GPU
# ----------------------------------------------------------------------------------------------
class _TargetDriver:
    """The part of Triton's driver a JIT warm-up asks: device (the arch, one JIT cache per target),
    stream and target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def _target(arch: int):
    from triton.runtime import driver

    previous = driver._active  # restoring through reset_active would look for a GPU
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


# fp32 products as the train and eval entry points set them up (wsss's tf32 config, default on)
MATMUL_PRECISION = "high"


def record(variant: Variant) -> List[_common.Launch]:
    """The launches the variant's launchers issue, configurations chosen as on CUDA."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(MATMUL_PRECISION)
    try:
        with _common.recording() as launches:
            variant.run()
    finally:
        torch.set_float32_matmul_precision(before)
    return launches


def _unique(launches: Sequence[_common.Launch]) -> List[_common.Launch]:
    """Drop repeated launches of one kernel with the same meta-parameters (PAR's iterations)."""
    seen, out = set(), []
    for item in launches:
        key = (item.kernel, tuple(sorted((k, str(v)) for k, v in item.meta.items())),
               tuple(str(a.dtype) if torch.is_tensor(a) else a for a in item.args))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG, STACK (bytes of local memory a thread: spills and stack), SHARED, LOCAL from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{text}")
    return dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> Dict[str, float]:
    """Resident warps per SM and what limits them (registers, shared memory, warps, blocks)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) // 8) * 8 * 32  # allocated in units of 256 registers a warp
    by = {"regs": (lim["regs"] // regs_per_warp) // num_warps,
          "smem": lim["smem"] // (shared + lim["smem_reserved"]) if shared else lim["blocks"],
          "warps": lim["warps"] // num_warps,
          "blocks": lim["blocks"]}
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    return dict(warps=blocks * num_warps, occupancy=blocks * num_warps / lim["warps"], limiter=limiter)


def compile_launch(item: _common.Launch, arch: int) -> dict:
    """Compile one recorded launch for ``arch``; its configuration and resource usage."""
    meta = dict(item.meta)
    t0 = time.perf_counter()
    with _target(arch):
        compiled = item.kernel.warmup(*item.args, grid=item.grid, **meta)
    res = resource_usage(compiled.asm["cubin"])
    md = compiled.metadata
    blocks = {k: v for k, v in meta.items() if k.startswith("BLOCK")}
    dots = {k: str(v).replace("tl.", "") for k, v in meta.items() if k.endswith(("_TY", "_PREC"))}
    occ = occupancy(arch, res["regs"], md.shared, md.num_warps)
    return dict(kernel=item.kernel.fn.__name__, arch=f"sm_{arch}", blocks=blocks, dots=dots, num_warps=md.num_warps,
                num_stages=md.num_stages, regs=res["regs"], shared=md.shared, stack=res["stack"], local=res["local"],
                warps_per_sm=occ["warps"], occupancy=occ["occupancy"], limiter=occ["limiter"],
                compile_s=round(time.perf_counter() - t0, 2))


def _check_compilable() -> None:
    if not HAS_TRITON:
        raise RuntimeError("wsss.kernels.aot needs the triton package")
    if interpreting():
        raise RuntimeError("wsss.kernels.aot compiles the kernels: run it without TRITON_INTERPRET=1")


def _compile_variant(index: int, archs: Sequence[int]) -> List[dict]:
    _check_compilable()
    variant = variants()[index]
    rows = []
    for item in _unique(record(variant)):
        for arch in archs:
            row = dict(op=variant.op, use=variant.use, shape=variant.shape,
                       dtype=str(variant.dtype).replace("torch.", ""))
            try:
                row.update(compile_launch(item, arch))
            except Exception as exc:  # reported per variant; the caller decides what fails
                row.update(kernel=getattr(getattr(item.kernel, "fn", None), "__name__", str(item.kernel)),
                           arch=f"sm_{arch}", error=f"{type(exc).__name__}: {exc}"[:2000])
            rows.append(row)
    return rows


def run(uses: Sequence[str] = USES, archs: Sequence[int] = ARCHS, jobs: Optional[int] = None) -> List[dict]:
    """Compile every variant of the given uses for ``archs``; one row per (launch, arch)."""
    _check_compilable()
    indices = [i for i, v in enumerate(variants()) if v.use in uses]
    jobs = jobs or min(len(indices), os.cpu_count() or 1)
    if jobs <= 1:
        return [row for i in indices for row in _compile_variant(i, archs)]
    with ProcessPoolExecutor(jobs) as pool:  # compiling is CPU-bound (MLIR passes, ptxas)
        return [row for rows in pool.map(_compile_variant, indices, [archs] * len(indices)) for row in rows]


def problems(rows: Sequence[dict]) -> List[str]:
    """Compile errors, and local memory (spills / stack) in any compiled variant."""
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']} for {r['op']} [{r['shape']}, {r['dtype']}]"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif r["stack"] or r["local"]:
            out.append(f"{where}: {r['stack']} B stack / {r['local']} B local memory a thread "
                       f"(register spills) at {r['regs']} registers, config {r['blocks']} warps={r['num_warps']}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--use", nargs="+", default=list(USES), choices=USES)
    p.add_argument("--arch", nargs="+", type=int, default=list(ARCHS), choices=sorted(SM_LIMITS))
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = p.parse_args(argv)
    rows = run(args.use, args.arch, args.jobs)
    for r in rows:
        if args.json:
            print(json.dumps(r), flush=True)
        elif "error" in r:
            print(f"{r['op']:40s} {r['kernel']:28s} {r['arch']} ERROR {r['error'][:200]}")
        else:
            print(f"{r['op'][:40]:40s} {r['dtype']:8s} {r['kernel']:28s} {r['arch']} regs {r['regs']:3d} "
                  f"stack {r['stack']:5d} smem {r['shared']:6d} warps {r['num_warps']} stages {r['num_stages']} "
                  f"occ {r['occupancy']:.3f} ({r['limiter']}) {r['blocks']} {r['compile_s']}s")
    return 1 if problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
