"""One prepared GPU check: device facts, the CUDA tests, compute-sanitizer, the host-sync count,
ViT-B/16 MoRe training throughput and the three benchmarks, in one command that ends in time.

    make gpu-check                                           # on the lent GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu-check.md
    python benchmarks/gpu_check.py --only tests,train_bf16   # some steps (device facts always run)
    python benchmarks/gpu_check.py --dry-run                 # CPU: the same steps, shrunk

Every step runs in a forked child in its own process group under a time budget (the parent
imports torch and wsss once, touching no CUDA; ``--fresh-processes`` execs a new interpreter per
step instead); a step that overruns is killed with whatever it started and recorded as failed.
One global deadline (``--deadline-s``, default 470 s: the check has 8 minutes, the rest is for the
results file) bounds the run; steps it leaves no time for are recorded as skipped. The results
file (default ``benchmarks/results/gpu-check.md``) is rewritten after every step, so it exists
even if the run is killed: device, driver, versions, command, date, a table of the steps (status
and why, seconds, key numbers) and a section per step (failures with the end of their log, the
benchmarks' own tables). The exit status is 1 if a step failed. Steps, in order of priority:

1. ``facts``: GPU, driver, CUDA, torch / triton / timm versions, nvcc, compute-sanitizer.
2. ``build``: loads ``wsss._C`` and runs its lattice filter on the device; if that fails, builds
   the extension in place (``setup.py build_ext --inplace``, CUDA_HOME=/usr/local/cuda when it
   holds nvcc, TORCH_CUDA_ARCH_LIST = this GPU's architecture) and checks it again.
3. ``tests``: the test files that exercise CUDA paths (``test_kernels_*.py`` and those naming
   ``torch.cuda`` / ``.cuda(`` / conftest's ``DEVICE``) with real Triton: TRITON_INTERPRET is
   removed (tests/conftest.py sets it only without CUDA); sharded over up to 4 pytest processes.
4. ``train_fp32`` / 5. ``train_bf16``: MoRe at its VOC setting (configs/voc.yaml: ViT-B/16 =
   width 768, 12 blocks, 12 heads, patch 16; 448x448 crops; batch 4; model.pretrained=''), fp32
   with TF32 and amp=bf16. The step is the loop's own ``train_step`` (the method's objective, the
   finite guard, backward, AdamW) on the loop's pieces, at the first iteration with every loss on,
   over batches of the synthetic VOC-layout set (``wsss.data.synthetic``, images up to 448 px,
   through the training transform: random-resized 448 crops) loaded before the clock starts, as
   the loop's loader workers would have them ready; the guard's host read every
   ``train.log_interval`` as in the loop. 200 timed iterations after 10 warm-up (fewer if the
   step's budget runs out; the count is reported), s/it and ``torch.cuda.max_memory_allocated``.
6. ``host_syncs``: a few MoRe and AReAM steps (VOC settings) under
   ``torch.cuda.set_sync_debug_mode("warn")``, the warnings counted per step and by wsss source
   line, and one step under tests/sync_counter.py's op-level ``SyncCounter`` where present.
7. ``sanitizer``: compute-sanitizer memcheck over the extension's CUDA tests (``-k cuda`` in the
   CUDA test files that use ``wsss.crf``), skipped with a note where the tool is missing.
8. ``bench_kernels``, 9. ``bench_train``, 10. ``bench_crf``: the benchmarks on CUDA with fewer
   repeats, their results files in the work directory (the committed CPU files stay untouched).

``--dry-run`` runs the same code with ``device=cpu``, one CPU thread and small sizes: the facts
(no CUDA), the extension check, the tests collected (``pytest --collect-only``) instead of run, a
3-block width-48 ViT for 2 iterations per precision, the sync count for 1 step per method (op
level only: the warnings need CUDA), bench_kernels and bench_train at toy sizes; the sanitizer
and bench_crf (fixed sizes) are skipped. tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu-check.md"
DEADLINE_S = 470.0  # the check has 8 minutes (issue 16); the last seconds write the results file
MIN_STEP_S = 10.0  # no step starts with less time than this left before the deadline
KILL_GRACE_S = 5.0  # SIGTERM to a step's process group, SIGKILL this much later
REPORT_RESERVE_S = 8.0  # a time-boxed step stops its loop this long before its deadline
LOG_TAIL_LINES = 40
MAX_TEST_SHARDS = 4  # concurrent pytest processes on the GPU: Triton's compiles are CPU-bound
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer's exit status when it reports errors
VOC_CLASSES = 20
ENV_MARK = "WSSS_GPU_CHECK_ENV"
OWN_TEST = "test_gpu_check.py"  # runs this check's dry run; never part of the GPU test step

MORE_CFG, AREAM_CFG = "configs/voc.yaml", "configs/voc_aream.yaml"
AREAM_OVERRIDES = ["aream.entropy=online"]  # the offline entropies need a trained classifier
# tests/test_train.py's TINY shapes (a 3-block width-48 ViT, one CAM scale, a 2-step PAR), a narrow decoder
TINY = ["model.backbone=custom", "model.embed_dim=48", "model.depth=3", "model.num_heads=3", "model.patch_size=8",
        "model.img_size=64", "model.decoder_dim=32", "aream.layer_index=1", "cam.scales=[1.0]",
        "cam.par_dilations=[1,2]", "cam.par_iters=2"]
SIZES = {
    # the VOC settings: MoRe ViT-B/16 448x448 batch 4, AReAM DeiT-S/16 224x224 batch 64
    "gpu": dict(overrides=[], train_iters=200, train_warmup=10, sync_steps=3, train_batches=4, sync_batches=2,
                data={"more": (16, 448), "aream": (64, 256)}),
    # 64x64 crops, batch 2: two iterations per precision, one counted step per method
    "dry": dict(overrides=TINY + ["data.crop_size=64", "train.batch_size=2"], train_iters=1, train_warmup=1,
                sync_steps=1, train_batches=2, sync_batches=1, data={"more": (8, 64), "aream": (8, 64)}),
}
BENCH_ARGS = {
    "bench_kernels": {"gpu": ["--device", "cuda", "--reps", "10", "--warmup", "2"],
                      "dry": ["--device", "cpu", "--reps", "1", "--warmup", "0", "--par-batch", "1",
                              "--par-classes", "3", "--par-size", "32", "--par-iters", "2", "--par-dilations", "1",
                              "2", "--aff-batch", "1", "--aff-grid", "6", "--aff-layers", "1", "--heads", "2",
                              "--head-dim", "8", "--feat-dim", "16", "--agg-layers", "2", "--agg-batch", "1",
                              "--agg-grid", "6", "--class-tokens", "3"]},
    "bench_train": {"gpu": ["--device", "cuda", "--iters", "5", "--warmup", "2"],
                    "dry": ["--device", "cpu", "--impls", "auto", "--iters", "1", "--warmup", "0", "--size", "64",
                            "--batch", "2", *TINY]},
    # None: not in the dry run. Its sizes are fixed (a 500x375 CRF, and pydensecrf2 where installed):
    # 10-20 s on a busy 2-core machine; bench_kernels and bench_train run the same step code.
    "bench_crf": {"gpu": ["--device", "cuda", "--repeats", "3"], "dry": None},
}


@dataclass
class Result:
    status: str  # pass | fail | skipped
    why: str = ""  # the reason of a fail or a skip, or a note on a pass
    key: str = ""  # the key numbers, one line of the table
    details: str = ""  # markdown for the step's section of the results file
    data: dict = field(default_factory=dict)  # numbers for the caller (facts: the device facts)
    seconds: float = 0.0


@dataclass
class Context:
    dry_run: bool
    work: Path
    facts: dict = field(default_factory=dict)
    deadline: float = 0.0  # time.monotonic() by which the running step must be done
    fresh: bool = False  # each step in a fresh interpreter instead of a fork of this one

    @property
    def mode(self) -> str:
        return "dry" if self.dry_run else "gpu"

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left(self, reserve: float = 0.0) -> float:
        return self.deadline - time.monotonic() - reserve


@dataclass
class Step:
    name: str
    title: str
    budget: Dict[str, float]  # seconds, per mode
    func: Callable[[Context], Result]


# ---------------------------------------------------------------------------------------------- processes
def kill_group(pgid: int, exited: Callable[[], bool]) -> None:
    """SIGTERM to the process group ``pgid``; SIGKILL to what is left once its leader has
    ``exited()`` or after KILL_GRACE_S. A group that is gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    end = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < end and not exited():
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def step_child(step: Step, ctx: Context, result_path: Path) -> None:
    """The body of a step's process: run the step, write its Result as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    if ctx.dry_run:  # toy sizes: OpenMP threads would only contend on a busy shared CPU
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # and the commands the step runs
    try:
        result = step.func(ctx)
    except Exception as e:  # noqa: BLE001 - reported as the step's failure, traceback in its log
        traceback.print_exc()
        result = Result("fail", why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    result_path.write_text(json.dumps(asdict(result), default=str))


def run_step(step: Step, ctx: Context, timeout: float) -> Result:
    """Run ``step.func(ctx)`` in a forked child (own session, output to ``<work>/logs/<step>.log``)
    for at most ``timeout`` seconds; the child hands its Result back as JSON. With ``ctx.fresh``
    the child execs a fresh interpreter for the step (``--run-step``)."""
    log_path = ctx.work / "logs" / f"{step.name}.log"
    result_path = ctx.work / "logs" / f"{step.name}.result.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    ctx.deadline = time.monotonic() + timeout
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if ctx.fresh:
                context = result_path.with_suffix(".context.json")
                context.write_text(json.dumps(asdict(ctx), default=str))
                os.execv(sys.executable, [sys.executable, str(SCRIPT), "--run-step", step.name,
                                          "--context", str(context)])
            step_child(step, ctx, result_path)
            code = 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    timed_out, state = False, {}

    def exited() -> bool:
        if "status" not in state:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                state["status"] = status
        return "status" in state

    try:
        while not exited():
            if time.monotonic() - t0 > timeout:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        kill_group(pid, exited)  # the step if it overran, else what it left running
        if "status" not in state:
            state["status"] = os.waitpid(pid, 0)[1]
    status = state["status"]
    seconds = time.monotonic() - t0
    if timed_out:
        result = Result("fail", why=f"timed out after {timeout:.0f} s; killed")
    elif result_path.is_file():
        result = Result(**json.loads(result_path.read_text()))
    else:
        how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) else \
            f"status {os.waitstatus_to_exitcode(status)}"
        result = Result("fail", why=f"the step's process ended with {how} and no result")
    result.seconds = seconds
    if result.status == "fail":
        tail = log_tail(log_path)
        result.details += f"\n\nEnd of `{log_path}`:\n\n```\n{tail}\n```\n" if tail else ""
    return result


def run_command(argv: List[str], ctx: Context, reserve: float = 2.0, env: Optional[dict] = None,
                log: Optional[Path] = None) -> Tuple[int, bool]:
    """``argv`` in the repository root until it ends or the step's deadline (less ``reserve``);
    output to ``log`` or the step's log. Returns (exit status, timed out)."""
    print("$", shlex.join(argv), flush=True)
    out = open(log, "w") if log else None
    try:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        try:
            return proc.wait(max(1.0, ctx.left(reserve))), False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, lambda: proc.poll() is not None)
            proc.wait()
            return proc.returncode, True
    finally:
        if out:
            out.close()


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def command_output(argv: List[str], timeout: float = 20.0) -> str:
    """stdout of a probing command, or '' when it is missing or fails."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout if p.returncode == 0 else ""


def find_sanitizer() -> Optional[str]:
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    found = shutil.which("compute-sanitizer")
    return found or next((str(p) for h in homes if h for p in [Path(h) / "bin" / "compute-sanitizer"]
                          if p.is_file()), None)


# ---------------------------------------------------------------------------------------------- 1 facts
def step_facts(ctx: Context) -> Result:
    import torch

    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    nvcc_text = command_output([str(nvcc) if nvcc.is_file() else "nvcc", "--version"])
    git = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    facts = dict(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                 torch_cuda=torch.version.cuda or "none", triton=version("triton"), timm=version("timm"),
                 numpy=version("numpy"), cpus=os.cpu_count(), cuda=torch.cuda.is_available(),
                 cuda_home=os.environ.get("CUDA_HOME", "unset"),
                 nvcc=(re.findall(r"release ([\d.]+)", nvcc_text) or ["not found"])[0],
                 sanitizer=find_sanitizer() or "not found", git=git or "n/a (no git checkout)",
                 triton_interpret=os.environ.get("TRITON_INTERPRET", "unset"))
    smi = command_output(["nvidia-smi"])
    facts["driver"] = (re.findall(r"Driver Version:\s*(\S+)", smi) or ["n/a"])[0]
    facts["driver_cuda"] = (re.findall(r"CUDA Version:\s*(\S+)", smi) or ["n/a"])[0]
    if not facts["cuda"]:
        why = "no CUDA device (torch.cuda.is_available() is False)"
        return Result("pass" if ctx.dry_run else "fail", why=why, key=f"{why}; torch {torch.__version__}",
                      data=facts)
    props = torch.cuda.get_device_properties(0)
    facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                 gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count,
                 cudnn=torch.backends.cudnn.version())
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    if float(x.sum()) != 1023 * 1024 / 2:  # one kernel and one copy back: the device computes
        return Result("fail", why="a sum on the GPU gave the wrong result", data=facts)
    key = (f"{props.name} (sm_{props.major}{props.minor}, {facts['gpu_memory_gib']} GiB), driver {facts['driver']}, "
           f"CUDA {facts['torch_cuda']} (torch) / {facts['nvcc']} (nvcc)")
    return Result("pass", key=key, data=facts)


# ---------------------------------------------------------------------------------------------- 2 build
def extension_problem(device: str) -> Optional[str]:
    """None when ``wsss._C`` loads and its lattice filter runs on ``device``, else what failed."""
    import torch

    try:
        from wsss.crf import permutohedral_filter

        g = torch.Generator().manual_seed(0)
        features = (4 * torch.rand(256, 5, generator=g)).to(device)
        values = torch.rand(256, 3, generator=g).to(device)
        out = permutohedral_filter(features, values)
        if out.shape != values.shape or out.device.type != torch.device(device).type or \
                not bool(torch.isfinite(out).all()):
            return f"permutohedral_filter gave {tuple(out.shape)} on {out.device}, or non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure means: build it; the message is reported
        return f"{type(e).__name__}: {e}"
    return None


def step_build(ctx: Context) -> Result:
    problem = extension_problem(ctx.device)
    if problem is None:
        return Result("pass", why="already built; not rebuilt", key=f"wsss._C loads and filters on {ctx.device}")
    print(f"wsss._C does not run on {ctx.device}: {problem}\nbuilding it in place", flush=True)
    env = dict(os.environ)
    if ctx.facts.get("capability"):
        env.setdefault("TORCH_CUDA_ARCH_LIST", ctx.facts["capability"])  # this GPU only: half the nvcc time
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    nvcc = Path(env.get("CUDA_HOME", "/nonexistent")) / "bin" / "nvcc"
    note = "" if nvcc.is_file() or shutil.which("nvcc") else "; no nvcc (CUDA_HOME unset): a CPU-only build"
    rc, timed_out = run_command([sys.executable, "setup.py", "build_ext", "--inplace"], ctx, reserve=15, env=env)
    if timed_out or rc != 0:
        return Result("fail", why=("timed out" if timed_out else f"exit status {rc}") +
                      f" of setup.py build_ext --inplace (was: {problem}){note}"[:400])
    # a fresh process: this one has already failed to load the extension
    rc, _ = run_command([sys.executable, str(SCRIPT), "--check-extension", ctx.device], ctx)
    if rc != 0:
        return Result("fail", why=f"built, but wsss._C still does not run on {ctx.device}{note}")
    return Result("pass", why=f"built in place (was: {problem[:120]}){note}",
                  key=f"wsss._C built ({env.get('TORCH_CUDA_ARCH_LIST', 'default archs')}); filters on {ctx.device}")


# ---------------------------------------------------------------------------------------------- 3 tests
def cuda_test_files() -> List[Path]:
    """The test files that exercise CUDA paths: the kernel tests and those naming CUDA devices."""
    pattern = re.compile(r"torch\.cuda|\.cuda\(|from conftest import DEVICE|device=\"cuda\"")
    return [p for p in sorted((REPO / "tests").glob("test_*.py"))
            if p.name != OWN_TEST and (p.name.startswith("test_kernels_") or pattern.search(p.read_text()))]


def extension_test_files() -> List[Path]:
    return [p for p in cuda_test_files() if "wsss.crf" in p.read_text()]


def shard(files: List[Path], n: int) -> List[List[Path]]:
    """``files`` in at most ``n`` groups of about equal size (largest first into the smallest group)."""
    groups: List[List[Path]] = [[] for _ in range(max(1, n))]
    sizes = [0] * len(groups)
    for f in sorted(files, key=lambda p: (-p.stat().st_size, p.name)):
        i = sizes.index(min(sizes))
        groups[i].append(f)
        sizes[i] += f.stat().st_size
    return [sorted(g) for g in groups if g]


def junit_summary(paths: List[Path]) -> Tuple[collections.Counter, List[str], collections.Counter]:
    """(counts of passed/failed/error/skipped, failing test ids with their message, skip reasons)."""
    counts, failures, skips = collections.Counter(), [], collections.Counter()
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
                skips[(outcome.get("message") or "").strip()[:160]] += 1
            else:
                counts["failed" if outcome.tag == "failure" else "error"] += 1
                message = (outcome.get("message") or outcome.tag).strip().splitlines() or [outcome.tag]
                failures.append(f"{name}: {message[0][:200]}")
    return counts, failures, skips


def step_tests(ctx: Context) -> Result:
    files = cuda_test_files()
    names = ", ".join(p.name for p in files)
    groups = shard(files, 1 if ctx.dry_run else min(MAX_TEST_SHARDS, max(1, (os.cpu_count() or 4) // 4)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real Triton on the GPU; conftest sets the interpreter only without CUDA
    basetemp = Path(tempfile.mkdtemp(prefix="gpu-check-pytest-"))  # one per process; not in the work directory
    procs = []
    for i, group in enumerate(groups):
        log = ctx.work / "logs" / f"tests-{i}.log"
        xml = ctx.work / "logs" / f"tests-{i}.xml"
        xml.unlink(missing_ok=True)
        mode = ["--collect-only", "-q"] if ctx.dry_run else ["-q", "-rfEs", f"--junitxml={xml}"]
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={basetemp / str(i)}", *mode,
                *map(str, group)]
        print("$", shlex.join(argv), ">", log, flush=True)
        out = open(log, "w")
        procs.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True), out, log, xml))
    timed_out = []
    for proc, out, log, xml in procs:
        try:
            proc.wait(max(1.0, ctx.left(3.0)))
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, lambda: proc.poll() is not None)
            proc.wait()
            timed_out.append(log)
        out.close()
    shutil.rmtree(basetemp, ignore_errors=True)
    bad = [(p, log) for p, _, log, _ in procs if p.returncode != 0]
    tails = "".join(f"\n\nEnd of `{log}` (exit status {p.returncode}):\n\n```\n{log_tail(log)}\n```\n"
                    for p, log in bad)
    where = f"{len(files)} files in {len(groups)} pytest process(es): {names}"
    if ctx.dry_run:
        collected = sum(int(m) for _, _, log, _ in procs
                        for m in re.findall(r"^(\d+) tests? collected", log.read_text(), re.M))
        status = "pass" if not bad and collected else "fail"
        return Result(status, why="dry run: collected, not run" + (f"; {len(bad)} collection(s) failed" if bad else ""),
                      key=f"{collected} tests collected", details=where + tails, data={"collected": collected})
    counts, failures, skips = junit_summary([x for *_, x in procs if x.is_file()])
    key = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"
    details = where + "".join(f"\n- FAILED {f}" for f in failures)
    details += "".join(f"\n- skipped ({n}): {reason}" for reason, n in skips.items()) + tails
    why = (f"timed out: {len(timed_out)} pytest process(es) killed; " if timed_out else "") + \
        (f"{len(failures)} test(s) failed" if failures else "")
    return Result("fail" if bad or not counts["passed"] else "pass", why=why.strip("; "), key=key, details=details,
                  data=dict(counts))


# ---------------------------------------------------------------------------------------------- training
def synthetic_data(ctx: Context, method: str) -> Path:
    """The synthetic VOC-layout set of ``method``'s size (what ``python -m wsss.data.synthetic`` writes)."""
    from wsss.data.synthetic import make_synthetic_dataset

    num_train, size = SIZES[ctx.mode]["data"][method]
    return make_synthetic_dataset(ctx.work / f"synthetic-{num_train}x{size}", seed=0, num_train=num_train, num_val=1,
                                  size=size, num_classes=VOC_CLASSES)


class TrainingRun:
    """What ``wsss.train.loop.train`` builds (data set and sampler, model, AdamW and schedule,
    GradScaler, the method's objective, loss schedule, autocast, NonFiniteGuard) and its
    ``train_step``, on one device, at the first iteration with every loss on (MoRe: the seg and
    energy losses; AReAM: the affinity loss). ``num_batches`` batches come through the loop's
    loader and ``_to_device`` once and are cycled, so the timed steps do no data loading."""

    def __init__(self, cfg_file: str, overrides: List[str], device: str, data_root: Path, num_batches: int):
        import torch
        from torch.utils.data import DataLoader

        from wsss.config import load_config
        from wsss.data import build_datasets
        from wsss.methods import Schedule, get_method
        from wsss.train.loop import NonFiniteGuard, ResumableSampler, _batches, _to_device
        from wsss.train.optim import build_optimizer
        from wsss.utils.device import autocast, configure_precision, seed_everything

        self.device = torch.device(device)
        self.cfg = cfg = load_config(REPO / cfg_file, [*overrides, f"data.root={data_root}", "model.pretrained=",
                                                       f"device={self.device.type}", "data.num_workers=0",
                                                       "compile=false"])
        configure_precision(self.device, cfg.tf32)
        seed_everything(cfg.seed)
        train_ds, _, _ = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.val_split,
                                        cfg.data.crop_size, cls_labels=cfg.data.cls_labels or None, aug=cfg.data.aug,
                                        seed=cfg.seed, eval_resize=cfg.data.crop_size, train_masks=False)
        method = get_method(cfg.model.method)
        self.model = method.build_model(cfg.model, train_ds.num_classes).to(self.device).train()
        bs = cfg.train.batch_size
        self.opt, self.sched = build_optimizer(self.model, cfg.optim, cfg.train.max_iters,
                                               iters_per_epoch=len(train_ds) // bs, global_batch=bs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.loss_fn = method.objective(cfg, self.device)
        if hasattr(self.loss_fn, "prepare"):
            self.loss_fn.prepare(self.model, cfg)
        self.schedule = Schedule.from_config(cfg)
        self.amp_ctx = autocast(self.device, cfg.amp)
        self.guard = NonFiniteGuard(self.device)
        sampler = ResumableSampler(len(train_ds), cfg.seed)
        loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=0,
                            pin_memory=self.device.type == "cuda")
        batches = _batches(loader, sampler, train_ds, 0, bs, 1)
        self.batches = [_to_device(next(batches), self.device) for _ in range(num_batches)]
        self.first = self.it = max(self.schedule.all_losses_from, self.schedule.aff_start)

    def step(self) -> None:
        from wsss.train.loop import train_step

        batch = self.batches[(self.it - self.first) % len(self.batches)]
        train_step(self.loss_fn, self.model, self.model, batch, self.it, self.cfg, self.schedule, self.amp_ctx,
                   self.opt, self.scaler, self.sched, self.guard)
        self.it += 1

    def shape(self) -> str:
        from wsss.models.vit import backbone_shape

        m = self.cfg.model
        d, depth, heads, patch, _ = backbone_shape(m.backbone, m.embed_dim, m.depth, m.num_heads, m.patch_size,
                                                   m.img_size)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (f"{m.method} {m.backbone} (width {d}, {depth} blocks, {heads} heads, patch {patch}; {params:.1f} M "
                f"parameters), {self.cfg.data.crop_size}x{self.cfg.data.crop_size} crops, batch "
                f"{self.cfg.train.batch_size}, amp={self.cfg.amp}, tf32={self.cfg.tf32}, impl={self.cfg.impl}")


# ---------------------------------------------------------------------------------------------- 4/5 throughput
def train_throughput(ctx: Context, amp: str) -> Result:
    import torch

    size = SIZES[ctx.mode]
    run = TrainingRun(MORE_CFG, size["overrides"] + [f'amp="{amp}"', "tf32=true"], ctx.device,
                      synthetic_data(ctx, "more"), size["train_batches"])
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    for _ in range(size["train_warmup"]):
        run.step()
    losses = run.guard.check()  # the host read waits for the device
    per_it = (time.monotonic() - t0) / size["train_warmup"]
    print(f"warm-up: {size['train_warmup']} iterations, {per_it:.3f} s/it; {run.shape()}", flush=True)
    stop_at = ctx.deadline - REPORT_RESERVE_S
    done, t1 = 0, time.monotonic()
    while done < size["train_iters"] and time.monotonic() + 2 * per_it < stop_at:
        run.step()
        done += 1
        if done % run.cfg.train.log_interval == 0:  # the loop's one host read per log interval
            losses = run.guard.check()
            per_it = (time.monotonic() - t1) / done
            print(f"{done} iterations, {per_it:.3f} s/it", flush=True)
    losses = run.guard.check() or losses
    seconds = time.monotonic() - t1
    if done == 0:
        return Result("fail", why=f"no time for a timed iteration (warm-up {per_it:.2f} s/it)")
    sec = seconds / done
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None
    mem = f"peak {peak:.2f} GiB allocated ({reserved:.2f} GiB reserved)" if cuda else "peak memory n/a (CPU)"
    cut = done < size["train_iters"]
    key = f"{sec:.3f} s/it ({1 / sec:.2f} it/s), {mem}; {done} it after {size['train_warmup']} warm-up"
    terms = ", ".join(sorted(set(losses or {}) - {"total"}))
    images, side = size["data"]["more"]
    details = (f"- {run.shape()}\n- iterations {run.first}..{run.first + size['train_warmup'] + done - 1} of "
               f"max_iters {run.cfg.train.max_iters} (every loss on: {terms})\n"
               f"- data: the synthetic set ({images} train images up to {side} px) through the training transform, "
               f"{len(run.batches)} batches loaded before timing and cycled (the loop's loader workers overlap "
               f"loading with the step)\n"
               f"- timing: {done} iteration(s) after {size['train_warmup']} warm-up, wall clock between two host "
               f"reads; projected {run.cfg.train.max_iters} iterations: {run.cfg.train.max_iters * sec / 3600:.2f} h\n"
               f"- last losses: " + ", ".join(f"{k} {v:.4g}" for k, v in (losses or {}).items()))
    data = dict(sec_per_it=sec, iterations=done, peak_gib=peak, reserved_gib=reserved, losses=losses)
    return Result("pass", why=f"cut at {done} of {size['train_iters']} iterations by the step budget" if cut else "",
                  key=key, details=details, data=data)


def step_train_fp32(ctx: Context) -> Result:
    return train_throughput(ctx, "off")


def step_train_bf16(ctx: Context) -> Result:
    return train_throughput(ctx, "bf16")


# ---------------------------------------------------------------------------------------------- 6 host syncs
def wsss_frame() -> str:
    """file:line function of the innermost frame inside the wsss package."""
    package = REPO / "wsss"
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_absolute() and path.is_relative_to(package):
            return f"{path.relative_to(package)}:{frame.lineno} {frame.name}"
    return "outside wsss"


def count_cuda_syncs(run: TrainingRun, steps: int) -> Tuple[List[int], int, collections.Counter]:
    """(sync warnings of each of ``steps`` steps, of the guard's check, per wsss source line)
    under ``torch.cuda.set_sync_debug_mode("warn")``."""
    import torch

    where, current = collections.Counter(), [0]

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            current[0] += 1
            where[wsss_frame()] += 1
        else:
            print(f"{filename}:{lineno}: {category.__name__}: {message}", flush=True)

    per_step = []
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                current[0] = 0
                run.step()
                per_step.append(current[0])
            current[0] = 0
            run.guard.check()
            check = current[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return per_step, check, where


def load_sync_counter():
    """tests/sync_counter.py's SyncCounter (op-level count of blocking reads), or None."""
    path = REPO / "tests" / "sync_counter.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("sync_counter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SyncCounter


def step_host_syncs(ctx: Context) -> Result:
    import torch

    size = SIZES[ctx.mode]
    counter_cls = load_sync_counter()
    keys, details, data = [], [], {}
    for method, cfg_file, extra in (("more", MORE_CFG, []), ("aream", AREAM_CFG, AREAM_OVERRIDES)):
        run = TrainingRun(cfg_file, size["overrides"] + extra, ctx.device, synthetic_data(ctx, method),
                          size["sync_batches"])
        run.step()  # warm-up: the optimizer creates its state, Triton compiles
        run.guard.check()
        parts, row = [], {}
        details.append(f"- {run.shape()}, iteration {run.it}:")
        if run.device.type == "cuda":
            per_step, check, where = count_cuda_syncs(run, size["sync_steps"])
            row.update(cuda_per_step=per_step, cuda_check=check, cuda_where=dict(where))
            parts.append(f"{per_step} CUDA sync warnings per step, {check} in the check")
            details.append(f"  - set_sync_debug_mode('warn'): per step {per_step}, in the guard's check {check}; by "
                           "source: " + (", ".join(f"{k} x{n}" for k, n in where.most_common()) or "none"))
        if counter_cls is not None:
            with counter_cls() as counter:
                run.step()
            row.update(op_syncs=counter.num_syncs, op_launches=counter.launches, op_where=dict(counter.syncs))
            parts.append(f"{counter.num_syncs} op-level")
            details.append(f"  - tests/sync_counter.py over 1 step: {counter.num_syncs} blocking reads, "
                           f"{counter.launches} ATen ops; " +
                           (", ".join(f"{k} x{n}" for k, n in counter.syncs.most_common()) or "none"))
        keys.append(f"{method}: " + (", ".join(parts) or "nothing counted"))
        data[method] = row
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    why = "" if ctx.device == "cuda" else "CPU: the CUDA sync warnings need CUDA; op-level count only"
    if counter_cls is None:
        why = (why + "; " if why else "") + "tests/sync_counter.py not found: no op-level count"
    return Result("pass", why=why, key="; ".join(keys), details="\n".join(details), data=data)


# ---------------------------------------------------------------------------------------------- 7 sanitizer
def step_sanitizer(ctx: Context) -> Result:
    tool = find_sanitizer()
    if not ctx.facts.get("cuda"):
        return Result("skipped", why="no CUDA device" + ("" if tool else "; compute-sanitizer not found either"))
    if tool is None:
        return Result("skipped", why="compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    files = extension_test_files()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: overruns hit no neighbour
    log = ctx.work / "logs" / "sanitizer-run.log"
    argv = [tool, "--tool", "memcheck", "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--report-api-errors", "no",
            "--print-limit", "20", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
            "-k", "cuda", *map(str, files)]
    rc, timed_out = run_command(argv, ctx, env=env, log=log)
    text = log.read_text(errors="replace") if log.is_file() else ""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    summaries = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+|no tests ran) in [\d.]+s", text, re.M)
    outcome = summaries[-1] if summaries else "no pytest summary"
    key = f"{sum(errors) if errors else 'n/a'} memcheck errors; pytest: {outcome}"
    details = f"memcheck over `-k cuda` in {', '.join(p.name for p in files)}\n\nEnd of `{log}`:\n\n```\n" \
              f"{log_tail(log, 25)}\n```\n"
    if timed_out:
        why = "timed out under memcheck"
    elif rc == SANITIZER_ERROR_EXIT or sum(errors):
        why = "memcheck reported errors"
    elif rc != 0:
        why = f"exit status {rc}"
    elif not errors:
        why = "no memcheck summary"
    elif " passed" not in f" {outcome}":
        why = "no test passed under memcheck"
    else:
        return Result("pass", key=key, details=details)
    return Result("fail", why=why, key=key, details=details)


# ---------------------------------------------------------------------------------------------- 8-10 benchmarks
def markdown_rows(text: str) -> List[dict]:
    """The rows of the first markdown table in ``text`` as {column: cell}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header = cells(lines[0])
    return [dict(zip(header, cells(line))) for line in lines[2:]]


def kernels_key(rows: List[dict]) -> str:
    triton = [r for r in rows if r.get("impl") == "triton"]
    if not triton:
        return f"{len(rows)} reference rows (no Triton rows off CUDA)"
    return "Triton vs reference: " + ", ".join(f"{r.get('op')} {r.get('speed-up')}" for r in triton)


def train_key(rows: List[dict]) -> str:
    return ", ".join(f"{r.get('step', '?').split(' ')[0]}/{r.get('impl')} {r.get('median s/it')} s/it "
                     f"({r.get('peak MB (total)')} MB)" for r in rows)


def crf_key(rows: List[dict]) -> str:
    return ", ".join(f"{r.get('op')} {r.get('impl')} {r.get('median ms')} ms" for r in rows)


BENCH_KEYS = {"bench_kernels": kernels_key, "bench_train": train_key, "bench_crf": crf_key}


def run_benchmark(ctx: Context, name: str) -> Result:
    """``benchmarks/<name>.py``'s main() in this (forked) process, as its command line would run it,
    results to the work directory."""
    if BENCH_ARGS[name][ctx.mode] is None:
        return Result("skipped", why=f"not in the {ctx.mode} run (BENCH_ARGS)")
    out = ctx.work / f"{name}-{ctx.device}.md"
    out.unlink(missing_ok=True)
    sys.argv = [f"benchmarks/{name}.py", *BENCH_ARGS[name][ctx.mode], "--out", str(out)]
    print("$ python", shlex.join(sys.argv), flush=True)
    sys.path.insert(0, str(REPO / "benchmarks"))  # as running the script does: bench_train imports bench_kernels
    importlib.import_module(name).main()
    if not out.is_file():
        return Result("fail", why=f"{name} wrote no results file")
    text = out.read_text()
    demoted = re.sub(r"^#", "###", text, flags=re.M)  # its title below this step's heading
    return Result("pass", key=BENCH_KEYS[name](markdown_rows(text)), details=f"`{out}`:\n\n" + demoted)


def step_bench_kernels(ctx: Context) -> Result:
    return run_benchmark(ctx, "bench_kernels")


def step_bench_train(ctx: Context) -> Result:
    return run_benchmark(ctx, "bench_train")


def step_bench_crf(ctx: Context) -> Result:
    return run_benchmark(ctx, "bench_crf")


STEPS = [
    Step("facts", "device facts", {"gpu": 30, "dry": 30}, step_facts),
    Step("build", "extension wsss._C", {"gpu": 240, "dry": 120}, step_build),
    Step("tests", "CUDA tests (real Triton)", {"gpu": 120, "dry": 60}, step_tests),
    Step("train_fp32", "MoRe training throughput, fp32 + TF32", {"gpu": 110, "dry": 60}, step_train_fp32),
    Step("train_bf16", "MoRe training throughput, amp=bf16", {"gpu": 90, "dry": 60}, step_train_bf16),
    Step("host_syncs", "host syncs per training step", {"gpu": 50, "dry": 60}, step_host_syncs),
    Step("sanitizer", "compute-sanitizer memcheck (extension)", {"gpu": 75, "dry": 30}, step_sanitizer),
    Step("bench_kernels", "benchmarks/bench_kernels.py", {"gpu": 40, "dry": 60}, step_bench_kernels),
    Step("bench_train", "benchmarks/bench_train.py", {"gpu": 60, "dry": 60}, step_bench_train),
    Step("bench_crf", "benchmarks/bench_crf.py", {"gpu": 30, "dry": 60}, step_bench_crf),
]


# ---------------------------------------------------------------------------------------------- report
def cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def write_report(out: Path, ctx: Context, command: str, started: str, results: Dict[str, Result], elapsed: float,
                 deadline_s: float, final: bool) -> None:
    f = ctx.facts
    device = f.get("gpu") or "no CUDA device"
    lines = [f"# GPU check — {device}" + (" (dry run on the CPU)" if ctx.dry_run else ""), ""]
    if f.get("cuda"):
        lines.append(f"- device: {device} (sm_{f.get('capability', '?').replace('.', '')}, {f.get('gpu_memory_gib')} "
                     f"GiB, {f.get('sms')} SMs, {f.get('gpus')} visible); driver {f.get('driver')} (CUDA "
                     f"{f.get('driver_cuda')}); {f.get('cpus')} CPU cores")
    else:
        lines.append(f"- device: {device}; driver {f.get('driver', 'n/a')}; {f.get('cpus', '?')} CPU cores")
    lines += [
        f"- CUDA: torch built with {f.get('torch_cuda', '?')}, cuDNN {f.get('cudnn', 'n/a')}; "
        f"nvcc {f.get('nvcc', '?')} (CUDA_HOME {f.get('cuda_home', '?')}); compute-sanitizer {f.get('sanitizer', '?')}",
        f"- versions: python {f.get('python', platform.python_version())}, torch {f.get('torch', '?')}, "
        f"triton {f.get('triton', '?')}, timm {f.get('timm', '?')}, numpy {f.get('numpy', '?')}; wsss git "
        f"{f.get('git', '?')}; {f.get('platform', platform.platform())}",
        f"- command: `{command}`",
        f"- date: {started}; {elapsed:.0f} s of the {deadline_s:.0f} s deadline"
        + ("" if final else f" (still running: {len(results)} steps done)"),
        "- mode: " + ("dry run: device=cpu, small sizes, tests collected not run" if ctx.dry_run
                      else "GPU run, real Triton (TRITON_INTERPRET unset)"),
        "", "| # | step | status | seconds | budget s | key numbers |", "|---|---|---|---|---|---|"]
    for i, step in enumerate(STEPS, 1):
        r = results.get(step.name)
        if r is None:
            continue
        status = r.status + (f": {r.why}" if r.why else "")
        lines.append(f"| {i} | {step.name}: {step.title} | {cell(status)} | {r.seconds:.1f} | "
                     f"{step.budget[ctx.mode]:.0f} | {cell(r.key)} |")
    for i, step in enumerate(STEPS, 1):
        r = results.get(step.name)
        if r is not None and r.details.strip():
            lines += ["", f"## {i}. {step.name}: {step.title}", "", r.details.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


# ---------------------------------------------------------------------------------------------- main
class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def preimport() -> None:
    """Import the heavy modules once, so that every forked step starts with them. Nothing here
    may touch CUDA: a forked child cannot use a CUDA context its parent created."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401

        import wsss.config  # noqa: F401
        import wsss.data  # noqa: F401
        import wsss.data.synthetic  # noqa: F401
        import wsss.methods  # noqa: F401
        import wsss.train.loop  # noqa: F401
        import wsss.train.optim  # noqa: F401
    except Exception:  # noqa: BLE001 - the steps import again and report the failure as theirs
        traceback.print_exc()
        print("gpu_check: importing wsss failed here; the steps will report it", file=sys.stderr, flush=True)


def cuda_in_this_process() -> str:
    """Why this process may hold CUDA driver state a fork cannot use, or ''."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "torch has initialised CUDA"
    try:
        if "libcuda.so" in Path("/proc/self/maps").read_text():
            return "libcuda is loaded"
    except OSError:
        pass
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="device=cpu, small sizes, tests collected (CI)")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; "
                                                          "dry run: a temporary file)")
    p.add_argument("--work", type=Path, default=None, help="logs, data and benchmark outputs (default: temporary)")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="global deadline in seconds")
    p.add_argument("--only", default="", help=f"comma list of steps ({', '.join(s.name for s in STEPS)}); facts "
                                              "always run")
    p.add_argument("--fresh-processes", action="store_true", help="run each step in a fresh interpreter instead of a "
                                                                  "fork of this one (slower start per step)")
    p.add_argument("--check-extension", metavar="DEVICE", help=argparse.SUPPRESS)
    p.add_argument("--run-step", metavar="STEP", help=argparse.SUPPRESS)
    p.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check_extension:
        problem = extension_problem(args.check_extension)
        print(problem or f"wsss._C runs on {args.check_extension}")
        return 1 if problem else 0
    if args.run_step:  # the fresh interpreter of one step (run_step with ctx.fresh)
        saved = json.loads(args.context.read_text())
        ctx = Context(**{**saved, "work": Path(saved["work"])})
        step_child(next(s for s in STEPS if s.name == args.run_step), ctx,
                   ctx.work / "logs" / f"{args.run_step}.result.json")
        return 0

    names = [s.name for s in STEPS]
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in names]
    if unknown:
        p.error(f"--only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    command = shlex.join([Path(sys.executable).name, os.path.relpath(os.path.abspath(sys.argv[0]), REPO),
                          *sys.argv[1:]]) if argv is None else shlex.join(["gpu_check.main", *argv])
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (args.out or (work / "gpu-check.md" if args.dry_run else DEFAULT_OUT)).resolve()
    cwd = os.getcwd()
    os.chdir(REPO)  # the steps name configs, tests and benchmarks from the repository root
    ctx = Context(dry_run=args.dry_run, work=work, fresh=args.fresh_processes)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.monotonic()
    deadline = t_start + args.deadline_s
    results: Dict[str, Result] = {}
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"gpu check ({'dry run' if args.dry_run else 'GPU'}): work directory {work}, results {out}", flush=True)
    try:
        if not ctx.fresh:
            preimport()
            touched = cuda_in_this_process()
            if touched:
                print(f"gpu_check: {touched}; forked steps could not use CUDA: fresh processes instead",
                      file=sys.stderr, flush=True)
                ctx.fresh = True
        for step in STEPS:
            if only and step.name not in only and step.name != "facts":
                continue
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                results[step.name] = Result("skipped", why=f"global deadline: {max(left, 0):.0f} s left")
            elif step.name != "facts" and not args.dry_run and not ctx.facts.get("cuda"):
                results[step.name] = Result("fail", why="no CUDA device (see facts); --dry-run is the CPU check")
            else:
                print(f"[{time.monotonic() - t_start:5.0f} s] {step.name}: {step.title} ...", flush=True)
                try:
                    results[step.name] = run_step(step, ctx, min(step.budget[ctx.mode], left))
                except Interrupted as e:
                    results[step.name] = Result("fail", why=f"interrupted ({e})")
                    raise
                if step.name == "facts":
                    ctx.facts = results[step.name].data
            r = results[step.name]
            print(f"[{time.monotonic() - t_start:5.0f} s] {step.name}: {r.status.upper()} {r.why} | {r.key}",
                  flush=True)
            write_report(out, ctx, command, started, results, time.monotonic() - t_start, args.deadline_s, False)
    except Interrupted:
        print("gpu check interrupted; writing what ran", file=sys.stderr, flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        write_report(out, ctx, command, started, results, time.monotonic() - t_start, args.deadline_s, True)
        os.chdir(cwd)
    failed = [f"{n}: {r.why}" for n, r in results.items() if r.status == "fail"]
    skipped = [f"{n}: {r.why}" for n, r in results.items() if r.status == "skipped"]
    missing = [s.name for s in STEPS if s.name not in results and (not only or s.name in only or s.name == "facts")]
    print(f"\nwrote {out} ({time.monotonic() - t_start:.0f} s); logs in {work / 'logs'}")
    for line in skipped:
        print(f"skipped  {line}")
    for line in failed + [f"{n}: not run (interrupted)" for n in missing]:
        print(f"FAILED   {line}")
    if not failed and not missing:
        print("no step failed")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    if os.environ.get(ENV_MARK) != "1":
        # one environment for this process and every step: the repository importable without an
        # install, real Triton (TRITON_INTERPRET is the test suite's CPU switch), the CUDA toolkit
        # where the Makefile would find it, unbuffered output so that a killed step's log is whole
        os.environ[ENV_MARK] = "1"
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        os.environ["PYTHONUNBUFFERED"] = "1"
        if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").is_file():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skips torch's interpreter teardown (seconds on a busy machine); all files are closed
