"""Regenerate benchmarks/results/triton-kernels.md: what the Triton kernels compile to, and the
work each op does against its PyTorch reference. Needs no GPU and times nothing.

    python benchmarks/triton_report.py            # every variant, sm_80 and sm_90
    python benchmarks/triton_report.py --jobs 2 --out /tmp/triton-kernels.md

Part 1 compiles every launch the ops issue at the shapes training and evaluation use
(``wsss.kernels.aot``: the launchers' own configurations, Triton's compiler with an explicit
target) and lists registers, shared memory, local memory (register spills) and the theoretical
occupancy. Part 2 counts FLOPs, bytes moved and peak extra memory of one call of each op on both
paths (``wsss.kernels.costs``), from which ``impl="auto"``'s choice follows.
"""
import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the report compiles the kernels
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, as the compile test states it

import torch  # noqa: E402

import wsss.kernels as K  # noqa: E402
from wsss.kernels import aot, costs  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "triton-kernels.md"


# ---------------------------------------------------------------------------------------------- part 2 cases
def cost_cases():
    """(op, shape, dtype name, inputs(device), call(impl) -> fn, backward) at the shapes of SPEC §3/§5."""
    def rand(dev, *shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_(grad)

    for dt in (torch.float32, torch.bfloat16):
        yield ("masked_cosine_affinity_loss fwd+bwd", "MoRe B=4 D=768 28x28", dt,
               lambda dev, dt=dt: (rand(dev, 4, 768, 28, 28, dtype=dt, grad=True),
                                   torch.randint(0, 4, (4, 28, 28), device=dev)),
               lambda impl: (lambda f, lab: K.masked_cosine_affinity_loss(f, lab, impl=impl)), True)
    for dt in (torch.float32, torch.bfloat16):
        yield ("masked_sigmoid_affinity_loss_qk fwd+bwd", "AReAM B=64 Hd=6 N=196 dh=64, one layer", dt,
               lambda dev, dt=dt: (rand(dev, 64, 6, 196, 64, dtype=dt, grad=True),
                                   rand(dev, 64, 6, 196, 64, dtype=dt, grad=True),
                                   torch.randint(0, 4, (64, 14, 14), device=dev)),
               lambda impl: (lambda q, k, lab: K.masked_sigmoid_affinity_loss_qk(q, k, lab, impl=impl)), True)
    yield ("masked_sigmoid_affinity_loss fwd+bwd", "B=64 N=196, materialised logits", torch.float32,
           lambda dev: (rand(dev, 64, 196, 196, grad=True), torch.randint(0, 4, (64, 14, 14), device=dev)),
           lambda impl: (lambda x, lab: K.masked_sigmoid_affinity_loss(x, lab, impl=impl)), True)
    for L, B, C, N, what in ((7, 64, 20, 196, "AReAM pseudo labels"), (12, 2, 20, aot.EVAL_TOKENS, "AReAM eval"),
                             (12, 2, 80, aot.EVAL_TOKENS, "AReAM eval COCO")):
        for dt in (torch.float32, torch.bfloat16):
            yield ("propagate_cam_qk", f"{what} L={L} B={B} Hd=6 C={C} N={N}", dt,
                   lambda dev, L=L, B=B, C=C, N=N, dt=dt: (torch.rand(B, C, N, 1, device=dev),
                                                          rand(dev, L, B, 6, C + N, 64, dtype=dt),
                                                          rand(dev, L, B, 6, C + N, 64, dtype=dt)),
                   lambda impl, C=C: (lambda cam, q, k: K.propagate_cam_qk(cam, q, k, C, impl=impl)), False)
    yield ("propagate_cam", "L=12 B=4 Hd=6 C=20 N=784, materialised logits", torch.float32,
           lambda dev: (torch.rand(4, 20, 28, 28, device=dev), rand(dev, 12, 4, 6, 804, 804)),
           lambda impl: (lambda cam, x: K.propagate_cam(cam, x, 20, impl=impl)), False)
    yield ("aggregate_attention fwd+bwd", "L=12 B=4 Hd=6 T=804", torch.float32,
           lambda dev: (rand(dev, 12, 4, 6, 804, 804, grad=True),),
           lambda impl: (lambda x: K.aggregate_attention(x, impl=impl)), True)
    for K_, what in ((42, "MoRe VOC"), (162, "MoRe COCO")):
        yield ("par_refine", f"{what} B=4 K={K_} 224x224, 10 iterations", torch.float32,
               lambda dev, K_=K_: (torch.rand(4, 3, 224, 224, device=dev), torch.rand(4, K_, 112, 112, device=dev)),
               lambda impl: (lambda img, m: K.par_refine(img, m, impl=impl)), False)


# ---------------------------------------------------------------------------------------------- tables
def _dtype(dt) -> str:
    return str(dt).replace("torch.", "")


def _dots(dots: dict) -> str:
    """"fp32 tf32", "bf16" (half operands have one precision), "q·k bf16, p·v fp32 tf32"."""
    def one(prefix):
        ty, prec = dots.get(f"{prefix}_TY"), dots.get(f"{prefix}_PREC")
        return ty if ty in ("bf16", "fp16") else f"{ty} {prec}"
    if "PV_TY" in dots:
        return f"q·k {one('DOT')}, p·v {one('PV')}"
    return one("DOT") if "DOT_TY" in dots else "—"


def compile_table(rows) -> str:
    lines = ["| op | use | shape | dtype | kernel | arch | BLOCKs | dot operands | warps | stages | regs | "
             "smem KB | local B | warps/SM | occupancy |",
             "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['use']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['arch']} | "
                         f"**compile error**: {r['error'][:120]} |" + " |" * 9)
            continue
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["blocks"].items())
        dots = _dots(r["dots"])
        lines.append(f"| {r['op']} | {r['use']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['arch']} | "
                     f"{blocks} | {dots} | {r['num_warps']} | {r['num_stages']} | {r['regs']} | "
                     f"{r['shared'] / 1024:.1f} | {r['stack'] + r['local']} | {r['warps_per_sm']} | "
                     f"{100 * r['occupancy']:.1f} % ({r['limiter']}) |")
    return "\n".join(lines)


def cost_rows():
    rows = []
    for op, shape, dt, inputs, call, backward in cost_cases():
        c = costs.compare(inputs, call, backward)
        rows.append((op, shape, _dtype(dt), c["triton"], c["reference"]))
    return rows


def _ratio(a: int, b: int) -> str:
    return "—" if b == 0 and a == 0 else ("∞" if b == 0 else f"{a / b:.2f}")


def cost_table(rows) -> str:
    lines = ["| op | shape | dtype | triton GFLOP | reference GFLOP | FLOP ratio | triton MB moved | "
             "reference MB moved | bytes ratio | triton peak MB | reference peak MB | auto |",
             "|" + "---|" * 12]
    for op, shape, dt, tri, ref in rows:
        auto = "reference" if (ref.flops <= tri.flops and ref.bytes <= tri.bytes and ref.peak <= tri.peak) else "triton"
        lines.append(f"| {op} | {shape} | {dt} | {tri.flops / 1e9:.2f} | {ref.flops / 1e9:.2f} | "
                     f"{_ratio(tri.flops, ref.flops)} | {tri.bytes / 1e6:.1f} | {ref.bytes / 1e6:.1f} | "
                     f"{_ratio(tri.bytes, ref.bytes)} | {tri.peak / 1e6:.1f} | {ref.peak / 1e6:.1f} | {auto} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    import triton

    rows = aot.run(aot.USES, aot.ARCHS, args.jobs)
    problems = aot.problems(rows)
    crows = cost_rows()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""# Triton kernels of wsss.kernels: compiled resources and work per call

- date: {now}
- versions: triton {triton.__version__}, torch {torch.__version__}, python {platform.python_version()}
- command: `{' '.join([Path(sys.executable).name] + sys.argv)}`
- generated by `benchmarks/triton_report.py`; nothing here is timed and no GPU was used

## 1. Compiled variants (sm_80, sm_90)

Every launch the ops issue at the shapes training (`train`) and evaluation (`eval`) use, plus the
public-API-only ops (`api`), compiled by Triton's own compiler for an explicit target with the
launch configuration the launcher picks on CUDA (`wsss.kernels.aot`; the same check runs in
`tests/test_triton_compile.py`). *regs*, *local B* (bytes of local memory a thread: register
spills and stack) from the cubin (`cuobjdump --dump-resource-usage`), *smem* from Triton's
metadata; *warps/SM* and *occupancy* are theoretical (64 warps, 64 K registers, 32 blocks and
164 KB (sm_80) / 228 KB (sm_90) shared memory per SM, 1 KB reserved per block) with the resource
that limits them. Dot operands: the operand type and `input_precision` of each `tl.dot`
(half inputs as half with fp32 accumulation; fp32 as TF32, the kernels following torch's fp32
matmul precision, which the train and eval entry points set to "high" with wsss's `tf32` config).

{"**Problems:** " + "; ".join(problems) if problems else "No compile errors; no variant uses local memory (no spills)."}

{compile_table(rows)}

## 2. Work per call against the reference

Counted on fake tensors (`wsss.kernels.costs`): *GFLOP* are the matrix products (2·M·N·K; for
the fused kernels the products they execute at their launch configuration, class-tile padding and
recomputed logits included; elementwise work not counted); *MB moved* assumes every op (aten op
or fused custom op) reads its inputs and writes its outputs once; *peak MB* is the most memory
the call holds at once beyond its inputs. fwd+bwd rows include autograd's backward.

{cost_table(crows)}

`impl="auto"` runs the Triton path on CUDA. The *auto* column applies the rule "the reference
where it is cheaper on every count (FLOPs, bytes and peak memory), Triton otherwise" to each
row: at none of these shapes is the reference cheaper. Where a fused path multiplies more than
its reference — `propagate_cam_qk`, which applies each head's softmax to the CAM (p·cam per
head, padded to 32-class tiles; with C=80 the logits are recomputed for each of the three class
tiles) where the reference first averages the heads — it is because the reference materialises
every layer's (B,Hd,T,T) logits and probabilities: the bytes and peak columns above are the
memory it saves.
"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
