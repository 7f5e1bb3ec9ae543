"""Every Triton kernel compiles for sm_80 and sm_90 at the launch configurations its launcher picks
on CUDA for the shapes and dtypes training and evaluation use, without register spills or local
memory (wsss.kernels.aot). No GPU needed: Triton's own compiler with an explicit target.

The compile runs in a subprocess without TRITON_INTERPRET (the test session interprets the
kernels); Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) makes reruns fast.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsss.kernels import aot, affinity, attention, par

pytestmark = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-m", "wsss.kernels.aot", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"wsss.kernels.aot printed no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return rows


def test_no_compile_errors(compiled):
    errors = [f"{r['kernel']} {r['arch']} for {r['op']} [{r['shape']}, {r['dtype']}]: {r['error']}"
              for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)


def test_training_and_evaluation_variants_do_not_spill(compiled):
    problems = aot.problems([r for r in compiled if r["use"] in ("train", "eval") and "error" not in r])
    assert not problems, "\n".join(problems)


def test_every_kernel_is_compiled_for_both_targets(compiled):
    kernels = {name for module in (affinity, attention, par) for name in vars(module)
               if name.startswith("_") and name.endswith("_kernel")}
    seen = {(r["kernel"], r["arch"]) for r in compiled}
    missing = sorted((k, f"sm_{a}") for k in kernels for a in aot.ARCHS if (k, f"sm_{a}") not in seen)
    assert not missing, f"kernels never compiled: {missing}"


def test_resources_are_within_the_sm_limits(compiled):
    for r in compiled:
        if "error" in r:
            continue
        limit = aot.SM_LIMITS[int(r["arch"][3:])]
        assert r["regs"] <= 255 and r["shared"] + limit["smem_reserved"] <= limit["smem"], r
        assert r["warps_per_sm"] >= r["num_warps"], f"cannot be resident: {r}"


def test_occupancy_model():
    # 255 registers × 4 warps: 64 warps' worth of registers hold 2 blocks; 96 KB of shared memory
    # fits once on sm_80 (164 KB) and twice on sm_90 (228 KB)
    assert aot.occupancy(80, 255, 0, 4)["warps"] == 8
    assert aot.occupancy(80, 64, 96 * 1024, 4) == dict(warps=4, occupancy=4 / 64, limiter="smem")
    assert aot.occupancy(90, 64, 96 * 1024, 4)["warps"] == 8
    assert aot.occupancy(90, 32, 0, 8) == dict(warps=64, occupancy=1.0, limiter="warps")
