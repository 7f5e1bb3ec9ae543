"""Mutation testing of wsss's core modules with cosmic-ray (project issue 18, item 4).

A seeded sample of cosmic-ray mutants of each core module is run against the fast test files
that cover that module; the survivors are then run against ``tests/test_mutants.py`` (the
tests written to kill earlier survivors), and every mutant that survives both is either listed
in ``EQUIVALENT`` below with a one-line reason or reported as an open survivor. Writes
``benchmarks/results/mutation.md``. Not part of CI: run it by hand from the repository root,

    python benchmarks/mutation.py [--seed 0] [--jobs 2] [--scale 1.0] [--workdir /tmp/wsss-mutation]

It never touches the checkout it runs from: the tree is copied to one folder per job under
``--workdir`` and the mutants are written there (cosmic-ray's mutation operators applied to the
copy's file on disk, restored after each run). Each job keeps one server process that has
imported torch, triton, timm and pytest once and forks a fresh child per mutant (the child puts
the copy first on ``sys.path``, so ``import wsss`` reads the mutated tree); this saves the 5-6 s
interpreter start of ``python -m pytest`` per mutant. Sample sizes below are set so that the
whole run takes about 20 minutes with 2 jobs on the project's 2-core machine when nothing else
runs on it (the results file records the wall time and the load average of the committed run).

The issue's hand-written one-line changes (``ONE_LINE_CHANGES``) are applied the same way after
the sample and reported with the tests that catch them.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import difflib
import importlib.metadata
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
NEW_TESTS = ("tests/test_mutants.py",)  # stage 2: the tests that kill earlier survivors


@dataclasses.dataclass
class Module:
    """A module under test: the fast test files that cover it, its sample size, and (for the
    method files) the top-level definitions that make up the method's objective."""

    path: str
    tests: Tuple[str, ...]  # test files, optionally with ``--deselect=<node id>`` entries
    sample: int
    scope: Tuple[str, ...] = ()  # top-level names; empty = the whole file


KERNEL_TESTS = ("tests/test_kernels_par.py", "tests/test_kernels_affinity.py", "tests/test_kernels_attention.py")
# the two end-to-end AReAM trainings (about a minute each) are not fast tests
AREAM_FAST = ("tests/test_aream.py", "--deselect=tests/test_aream.py::test_ablation_three_rows_and_reuse",
              "--deselect=tests/test_aream.py::test_training_offline_entropy_and_evaluation")
MORE_TESTS = ("tests/test_wiring.py", "tests/test_more.py")
MODULES = (
    Module("wsss/kernels/_common.py", KERNEL_TESTS, 6),
    Module("wsss/kernels/affinity.py", ("tests/test_kernels_affinity.py",), 16),
    Module("wsss/kernels/attention.py", ("tests/test_kernels_attention.py",), 16),
    Module("wsss/kernels/par.py", ("tests/test_kernels_par.py",), 14),
    Module("wsss/losses.py", ("tests/test_losses.py", "tests/test_more.py"), 22),
    Module("wsss/cam.py", ("tests/test_cam.py", "tests/test_wiring.py") + AREAM_FAST, 20),
    Module("wsss/eval/metrics.py", ("tests/test_metrics.py",), 12),
    Module("wsss/crf/__init__.py", ("tests/test_crf.py", "tests/test_lattice.py"), 12),
    Module("wsss/crf/_ext.py", ("tests/test_crf.py", "tests/test_lattice.py"), 3),
    Module("wsss/crf/energy.py", ("tests/test_energy_loss.py",), 12),
    Module("wsss/crf/lattice_reference.py", ("tests/test_lattice.py", "tests/test_crf.py"), 12),
    Module("wsss/config.py", ("tests/test_config.py",), 16),
    Module("wsss/methods/more.py", MORE_TESTS, 12, ("_token_labels", "active_weights", "MoReLosses")),
    Module("wsss/methods/aream.py", AREAM_FAST, 8, ("AReAMLosses", "aream_par_labels")),
    Module("wsss/methods/baseline.py", MORE_TESTS, 6,
           ("idle_decoder_term", "training_cams", "refined_pseudo_labels", "baseline_losses", "par_pseudo_labels")),
    Module("wsss/methods/base.py", MORE_TESTS, 4, ("stage_first_iteration", "Schedule", "make_par")),
)

# cosmic-ray's operators that model a plausible one-token slip, as mutmut's operator table
# does: + <-> -, * <-> /, / <-> //, % -> /, ** -> *, & <-> |, << <-> >>, comparison
# boundaries (< <-> <=, > <-> >=) and negations (== <-> !=, is <-> is not), a removed unary
# minus / not / ~, a negated condition, swapped booleans and and/or, numbers +-1, loops that
# never run, removed decorators and replaced exception types. Cosmic-ray's other binary and
# comparison replacements (+ -> ^, == -> is, ...) mostly raise a TypeError on tensors at once.
OPERATORS = (
    "ReplaceBinaryOperator_Add_Sub", "ReplaceBinaryOperator_Sub_Add", "ReplaceBinaryOperator_Mul_Div",
    "ReplaceBinaryOperator_Div_Mul", "ReplaceBinaryOperator_Div_FloorDiv", "ReplaceBinaryOperator_FloorDiv_Div",
    "ReplaceBinaryOperator_Mod_Div", "ReplaceBinaryOperator_Pow_Mul", "ReplaceBinaryOperator_BitAnd_BitOr",
    "ReplaceBinaryOperator_BitOr_BitAnd", "ReplaceBinaryOperator_LShift_RShift", "ReplaceBinaryOperator_RShift_LShift",
    "ReplaceComparisonOperator_Lt_LtE", "ReplaceComparisonOperator_LtE_Lt", "ReplaceComparisonOperator_Gt_GtE",
    "ReplaceComparisonOperator_GtE_Gt", "ReplaceComparisonOperator_Eq_NotEq", "ReplaceComparisonOperator_NotEq_Eq",
    "ReplaceComparisonOperator_Is_IsNot", "ReplaceComparisonOperator_IsNot_Is",
    "ReplaceUnaryOperator_USub_UAdd", "ReplaceUnaryOperator_Delete_Not", "ReplaceUnaryOperator_Delete_Invert",
    "AddNot", "ReplaceTrueWithFalse", "ReplaceFalseWithTrue", "ReplaceAndWithOr", "ReplaceOrWithAnd",
    "ReplaceBreakWithContinue", "ReplaceContinueWithBreak", "NumberReplacer", "ZeroIterationForLoop",
    "RemoveDecorator", "ExceptionReplacer",
)

# Survivors judged equivalent: (module path, original line, mutated line) -> one-line reason.
# Lines are compared with surrounding whitespace stripped, so the entries survive line shifts.
SHAPE_4D = "images are (B,C,H,W), so shape[2:] is shape[-2:]"
EQUIVALENT: Dict[Tuple[str, str, str], str] = {
    ("wsss/kernels/affinity.py", "mask=(cols[:, None] < N) & (dout[None, :] < D), other=0.0).to(ACC)",
     "mask=(cols[:, None] < N) & (dout[None, :] < D), other= -1.0).to(ACC)"):
        "the fill value is never used: rows past N meet gradient entries that are 0 (their pairs are neither "
        "pos nor neg) and columns past D are never stored",
    ("wsss/kernels/attention.py", "mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)",
     "mask=row_ok[:, None] | col_ok[None, :], other=0.0).to(ACC)"):
        "equal values: the extra cells loaded are columns past T, set to -inf on the next line, or rows past N, "
        "never stored (an out-of-range read in memory the tensors' storage covers in these tests)",
    ("wsss/cam.py", "H, W = images.shape[-2:]", "H, W = images.shape[+2:]"): SHAPE_4D,
    ("wsss/eval/metrics.py", "return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)",
     "return np.where(denom > 0, tp / np.maximum(denom, 0), np.nan)"):
        "np.maximum only guards the 0/0 of classes with denom 0, whose result np.where replaces by NaN anyway "
        "(np.errstate silences the warning)",
    ("wsss/crf/__init__.py", "return out[0].numpy()", "return out[ -1].numpy()"):
        "dense_crf runs a batch of exactly one image, so out[-1] is out[0]",
    ("wsss/crf/lattice_reference.py", "rgb = image_hw3.reshape(-1, 3).astype(np.float64)",
     "rgb = image_hw3.reshape(- 2, 3).astype(np.float64)"):
        "NumPy's reshape reads any negative size as the one inferred dimension, so -2 acts as -1",
    ("wsss/config.py",
     "eval_start: float = 0.0  # periodic validation only from this fraction of max_iters on (COCO: 60 000)",
     "eval_start: float = -1.0  # periodic validation only from this fraction of max_iters on (COCO: 60 000)"):
        "the loop validates when step >= round(eval_start * max_iters); steps are >= 0, so -1 and 0 both "
        "validate from the first interval",
    ("wsss/methods/more.py", "out = model(images, with_score_maps=False)", "out = model(images, with_score_maps=True)"):
        "the score maps are an extra, detached output of the forward (SPEC §2) that no loss reads; only the run "
        "time grows",
    ("wsss/methods/baseline.py", "@torch.no_grad()", "(removed)"):
        "training_cams calls multi_scale_cam, whose multi_scale_maps is itself under torch.no_grad, so no graph "
        "is built either way",
    ("wsss/methods/baseline.py",
     'seg = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)',
     'seg = F.interpolate(out.seg_logits.float(), size=images.shape[+2:], mode="bilinear", align_corners=False)'):
        SHAPE_4D,
}


# Issue 18's four reported one-line changes, applied as written here (old text -> new text in the
# module) and run against the module's tests plus the new tests; each must be caught.
ONE_LINE_CHANGES = (
    ("ptc loss fed the CLE labels instead of the aux-CAM labels", "wsss/methods/more.py",
     "masked_cosine_affinity_loss(feats, l_aux,", "masked_cosine_affinity_loss(feats, l_cle,"),
    ("a class absent from prediction and ground truth counted as IoU 0", "wsss/eval/metrics.py",
     "return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)", "return tp / np.maximum(denom, 1)"),
    ("mIoU over every class, absent ones counted as 0", "wsss/eval/metrics.py",
     "present = self.matrix.sum(1) > 0", "present = self.matrix.sum(1) >= 0"),
    ("energy loss without the xy-sigma scaling", "wsss/crf/energy.py",
     "sxy = sigma_xy * scale_factor", "sxy = sigma_xy"),
    ("config accepts cam.scales=[1.0, abc] (list items unchecked)", "wsss/config.py",
     'return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]', "return list(value)"),
)


# ---- enumeration and sampling --------------------------------------------------------------

@dataclasses.dataclass
class Mutant:
    module: str
    operator: str
    occurrence: int
    line: int
    before: str = ""  # the original source line (stripped)
    after: str = ""  # the mutated source line (stripped)
    outcome: str = ""  # killed | timeout | killed-new | equivalent | survived | no-mutation | error
    killer: str = ""  # first failing test
    reason: str = ""  # equivalent: why
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.module}:{self.operator}:{self.occurrence}"


def _excluded_lines(source: str, scope: Sequence[str]) -> Tuple[set, Optional[set]]:
    """(lines never mutated, lines in scope or None for the whole file).

    Never mutated: the exception argument of ``raise`` statements (only the error text) and
    blocks whose header carries ``pragma: no cover`` (the no-triton fallback)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            skip.update(range(node.exc.lineno, node.exc.end_lineno + 1))
        if hasattr(node, "body") and hasattr(node, "lineno") and "pragma: no cover" in lines[node.lineno - 1]:
            skip.update(range(node.lineno, node.end_lineno + 1))
    if not scope:
        return skip, None
    keep = set()
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in scope:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            keep.update(range(start, node.end_lineno + 1))
            found.add(node.name)
    missing = set(scope) - found
    if missing:
        raise SystemExit(f"scope names {sorted(missing)} not found at the top level of the module")
    return skip, keep


def enumerate_mutants(root: Path, module: Module) -> List[Mutant]:
    """All mutants of ``module`` with the chosen operators, outside the excluded lines."""
    import cosmic_ray.plugins
    from cosmic_ray.ast import ast_nodes, get_ast

    source = (root / module.path).read_text()
    skip, keep = _excluded_lines(source, module.scope)
    tree = get_ast(source)
    out = []
    for name in OPERATORS:
        operator = cosmic_ray.plugins.get_operator(f"core/{name}")()
        occurrence = 0
        for node in ast_nodes(tree):
            for start, _end in operator.mutation_positions(node):
                line = start[0]
                if line not in skip and (keep is None or line in keep):
                    out.append(Mutant(module.path, f"core/{name}", occurrence, line))
                occurrence += 1
    return out


def sample_mutants(root: Path, modules: Sequence[Module], seed: int, scale: float) -> Tuple[List[Mutant], Dict]:
    """A seeded uniform sample per module (size ``round(sample * scale)``)."""
    picked, population = [], {}
    for module in modules:
        every = enumerate_mutants(root, module)
        population[module.path] = len(every)
        k = min(len(every), max(1, round(module.sample * scale)))
        rng = random.Random(f"{seed}:{module.path}")
        picked.extend(sorted(rng.sample(every, k), key=lambda m: (m.line, m.operator, m.occurrence)))
    return picked, population


def mutated_source(root: Path, mutant: Mutant) -> Tuple[str, Optional[str]]:
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    original = (root / mutant.module).read_text()
    operator = cosmic_ray.plugins.get_operator(mutant.operator)()
    return original, mutate_code(original, operator, mutant.occurrence)


def describe(original: str, mutated: str) -> Tuple[int, str, str]:
    """(first changed line, its original text, its mutated text), stripped."""
    a, b = original.splitlines(), mutated.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            before = " / ".join(x.strip() for x in a[i1:i2] if x.strip()) or "(nothing)"
            after = " / ".join(x.strip() for x in b[j1:j2] if x.strip()) or "(removed)"
            return i1 + 1, before, after
    return 0, "", ""


# ---- the fork server -----------------------------------------------------------------------

PRELOAD = ("torch", "torch.nn.functional", "numpy", "scipy", "scipy.ndimage", "yaml", "pytest", "triton",
           "triton.language", "timm", "PIL.Image", "cv2", "tqdm")


def serve() -> None:
    """Reads JSON requests on stdin, one per line: ``{"tree", "args", "log", "timeout"}``; forks
    a child that runs ``pytest.main(args)`` in ``tree``; answers ``{"rc", "timeout", "seconds"}``."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "wsss" or m.startswith("wsss.") for m in sys.modules), "the server must not import wsss"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            code = 3
            try:
                os.setsid()
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(req["tree"])
                sys.path.insert(0, req["tree"])
                sys.dont_write_bytecode = True
                import importlib.util

                origin = importlib.util.find_spec("wsss").origin
                if not origin.startswith(req["tree"]):
                    print(f"wsss resolves to {origin}, not to the mutated tree {req['tree']}", flush=True)
                    os._exit(4)
                import pytest

                code = int(pytest.main(req["args"]))
            except BaseException as exc:  # noqa: BLE001 - any crash of the child is a failed run
                print(f"mutation child crashed: {exc!r}", flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        timed_out, status = False, 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > req["timeout"]:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        rc = -1 if timed_out else (os.waitstatus_to_exitcode(status))
        print(json.dumps({"rc": rc, "timeout": timed_out, "seconds": time.monotonic() - start}), flush=True)


class Worker:
    """One job: a private copy of the tree and a fork server."""

    def __init__(self, index: int, workdir: Path, source: Path):
        self.tree = workdir / f"w{index}"
        if self.tree.exists():
            shutil.rmtree(self.tree)
        ignore = shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", "*.egg-info",
                                        "build", "mutants")
        shutil.copytree(source, self.tree, ignore=ignore, symlinks=True)
        self.logs = workdir / f"logs{index}"
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if not _cuda_available():
            env.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before triton is imported
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(self.tree))
        ready = json.loads(self.proc.stdout.readline())
        assert ready.get("ready"), ready

    def pytest(self, files: Sequence[str], log: Path, timeout: float, stop_first: bool = True) -> dict:
        args = ["-q", "-p", "no:cacheprovider", "-rfE", "--tb=line", "-W", "ignore::DeprecationWarning"]
        args += (["-x"] if stop_first else []) + list(files)
        self.proc.stdin.write(json.dumps({"tree": str(self.tree), "args": args, "log": str(log),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _cuda_available() -> bool:
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() == "True"
    except (OSError, subprocess.SubprocessError):
        return False


FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")  # "FAILED <node id> - <message>"; ids may hold spaces


def first_failures(log: Path) -> List[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [m.group(1) for m in map(FAILED.match, text.splitlines()) if m]


# ---- running -------------------------------------------------------------------------------

def run_mutant(worker: Worker, mutant: Mutant, module: Module, timeout: float, new_tests: Sequence[str]) -> None:
    target = worker.tree / mutant.module
    original, mutated = mutated_source(worker.tree, mutant)
    if mutated is None:
        mutant.outcome = "no-mutation"
        return
    mutant.line, mutant.before, mutant.after = describe(original, mutated)
    log = worker.logs / f"{mutant.key.replace('/', '_').replace(':', '_')}.log"
    start = time.monotonic()
    try:
        target.write_text(mutated)
        res = worker.pytest(module.tests, log, timeout)
        if res["timeout"]:
            mutant.outcome = "timeout"
        elif res["rc"] != 0:
            mutant.outcome = "killed"
            mutant.killer = next(iter(first_failures(log)), f"exit code {res['rc']}")
        else:
            existing = [t for t in new_tests if (worker.tree / t).exists()]
            res2 = worker.pytest(existing, log.with_suffix(".new.log"), timeout) if existing else None
            if res2 is not None and (res2["timeout"] or res2["rc"] != 0):
                mutant.outcome = "killed-new"
                failures = first_failures(log.with_suffix(".new.log"))
                mutant.killer = failures[0] if failures else ("timeout" if res2["timeout"] else f"exit {res2['rc']}")
            else:
                reason = EQUIVALENT.get((mutant.module, mutant.before, mutant.after))
                mutant.outcome = "equivalent" if reason else "survived"
                mutant.reason = reason or ""
    finally:
        target.write_text(original)
        mutant.seconds = time.monotonic() - start


def run_one_line_changes(workers: Sequence[Worker], modules: Sequence[Module], new_tests: Sequence[str],
                         timeout: float) -> List[Tuple[str, str, str, str, str, str]]:
    """(name, module, old, new, outcome, failing tests) for each of ``ONE_LINE_CHANGES``, spread
    over the jobs."""
    by_path = {m.path: m for m in modules}
    changes = [c for c in ONE_LINE_CHANGES if c[1] in by_path]
    rows: List[Optional[tuple]] = [None] * len(changes)
    todo: "queue.Queue[int]" = queue.Queue()
    for i in range(len(changes)):
        todo.put(i)

    def work(worker: Worker) -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            name, path, old, new = changes[i]
            target = worker.tree / path
            original = target.read_text()
            if original.count(old) != 1:
                rows[i] = (name, path, old, new, "not applied: the line is not in the module (it changed)", "")
                continue
            log = worker.logs / f"oneline_{i}.log"
            files = list(by_path[path].tests) + [t for t in new_tests if (worker.tree / t).exists()]
            try:
                target.write_text(original.replace(old, new))
                res = worker.pytest(files, log, timeout, stop_first=False)
            finally:
                target.write_text(original)
            outcome = "timeout" if res["timeout"] else ("caught" if res["rc"] != 0 else "NOT caught")
            rows[i] = (name, path, old, new, outcome, ", ".join(f"`{f}`" for f in first_failures(log)))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in rows if r is not None]


def _files(tests: Sequence[str]) -> List[str]:
    return [t for t in tests if not t.startswith("-")]


def baseline(workers: Sequence[Worker], modules: Sequence[Module], new_tests: Sequence[str]) -> Dict[str, float]:
    """Each test file once on the unmutated tree (with the deselections the modules ask for),
    spread over the jobs: all must pass; a module's timeout follows the sum of its files' times."""
    files = list(dict.fromkeys([f for m in modules for f in _files(m.tests)] +
                               [t for t in new_tests if (ROOT / t).exists()]))
    flags = {f: sorted({t for m in modules for t in m.tests if t.startswith(f"--deselect={f}::")}) for f in files}
    todo: "queue.Queue[str]" = queue.Queue()
    for f in files:
        todo.put(f)
    seconds, failed = {}, []

    def work(worker: Worker) -> None:
        while True:
            try:
                f = todo.get_nowait()
            except queue.Empty:
                return
            log = worker.logs / f"baseline_{Path(f).stem}.log"
            res = worker.pytest([f] + flags[f], log, 1800)
            seconds[f] = res["seconds"]
            if res["rc"] != 0:
                failed.append(f"{f} (see {log})")

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit("the unmutated tests fail: " + "; ".join(failed))
    return seconds


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "wsss"], cwd=root, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return (rev + (" + uncommitted changes under wsss/" if dirty else "")) if rev else "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("cosmic-ray", "torch", "triton", "pytest"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def write_report(path: Path, mutants: Sequence[Mutant], population: Dict, modules: Sequence[Module], args,
                 started: datetime.datetime, wall: float, base_seconds: Dict, command: str, root: Path,
                 one_line: Sequence[Tuple[str, ...]] = ()) -> str:
    rows = []
    totals = dict(sampled=0, killed=0, timeout=0, new=0, equivalent=0, survived=0, other=0)
    for module in modules:
        ms = [m for m in mutants if m.module == module.path]
        c = {k: sum(m.outcome == k for m in ms) for k in ("killed", "timeout", "killed-new", "equivalent", "survived")}
        other = len(ms) - sum(c.values())
        counted = len(ms) - c["equivalent"] - other
        detected = c["killed"] + c["timeout"] + c["killed-new"]
        score = f"{100 * detected / counted:.0f} %" if counted else "-"
        scope = f" ({', '.join(module.scope)})" if module.scope else ""
        rows.append(f"| `{module.path}`{scope} | {population[module.path]} | {len(ms)} | {c['killed']} | "
                    f"{c['timeout']} | {c['killed-new']} | {c['equivalent']} | {c['survived']} | {other} | {score} |")
        for key, n in (("sampled", len(ms)), ("killed", c["killed"]), ("timeout", c["timeout"]),
                       ("new", c["killed-new"]), ("equivalent", c["equivalent"]), ("survived", c["survived"]),
                       ("other", other)):
            totals[key] += n
    counted = totals["sampled"] - totals["equivalent"] - totals["other"]
    detected = totals["killed"] + totals["timeout"] + totals["new"]
    score = f"{100 * detected / counted:.1f} %" if counted else "-"
    rows.append(f"| **all** | {sum(population.values())} | {totals['sampled']} | {totals['killed']} | "
                f"{totals['timeout']} | {totals['new']} | {totals['equivalent']} | {totals['survived']} | "
                f"{totals['other']} | **{score}** |")
    survivors = [m for m in mutants if m.outcome in ("killed-new", "equivalent", "survived")]
    surv_lines = []
    for m in survivors:
        if m.outcome == "killed-new":
            how = f"killed by `{m.killer}`"
        elif m.outcome == "equivalent":
            how = f"equivalent: {m.reason}"
        else:
            how = "**SURVIVED: not handled**"
        surv_lines.append(f"| `{m.module}:{m.line}` | {m.operator.split('/')[1]} | `{_md(m.before)}` → "
                          f"`{_md(m.after)}` | {how} |")
    every = [f"| `{m.module}:{m.line}` | {m.operator.split('/')[1]}#{m.occurrence} | `{_md(m.before)}` → "
             f"`{_md(m.after)}` | {m.outcome} | {_md(m.killer) if m.outcome in ('killed', 'killed-new') else ''} | "
             f"{m.seconds:.1f} |" for m in mutants]
    base = ", ".join(f"{Path(f).stem} {s:.1f} s" for f, s in base_seconds.items())
    text = "\n".join([
        "# Mutation testing of the core modules",
        "",
        f"- Tool: cosmic-ray {importlib.metadata.version('cosmic-ray')} (its mutation operators, applied to a copy "
        "of the tree; runner: `benchmarks/mutation.py`, one fork server per job)",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min with {args.jobs} jobs",
        f"- Command: `{command}`",
        f"- Machine: {machine()}; {_versions()}",
        f"- Load average (1/5/15 min) at start: {args.load[0]}; at end: {args.load[1]} (the machine is shared)",
        f"- Source: wsss git {git_revision(root)}",
        f"- Sample: seed {args.seed}, scale {args.scale:g}; per module a uniform sample of the mutants of the "
        f"operators listed in `OPERATORS` (mutmut's one-token slips), outside the text of `raise` statements and "
        f"`pragma: no cover` blocks; the method files only in the definitions of their objective",
        f"- Each mutant runs the module's test files (`pytest -x`), timeout {args.timeout_factor:g} × their "
        f"unmutated time + {args.timeout_slack:g} s (unmutated, per file: {base}); a survivor then runs "
        f"{', '.join(f'`{t}`' for t in NEW_TESTS)} (the tests written to kill earlier survivors).",
        "- Columns: killed = the module's existing tests fail; timeout = they exceed the timeout (counted as "
        "detected); new = only the new tests fail; equivalent = survives both and no test can tell (reason "
        "below); survived = open; other = no mutation possible; score = detected / (sampled − equivalent − other).",
        "",
        "| module | mutants | sampled | killed | timeout | new | equivalent | survived | other | score |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Tests per module (each mutant runs only these):",
        "",
        *[f"- `{m.path}`: " + ", ".join(f"`{t}`" for t in m.tests) for m in modules],
        "",
        "## Survivors of the existing tests",
        "",
        "| where | operator | mutation | handled |",
        "|---|---|---|---|",
        *(surv_lines or ["| - | - | none | - |"]),
        "",
        "## Issue 18's one-line changes",
        "",
        "Each applied to the module and run against its tests and the new tests (all failures listed).",
        "",
        "| change | where | outcome | failing tests |",
        "|---|---|---|---|",
        *[f"| {name} | `{path}`: `{_md(old)}` → `{_md(new)}` | {outcome} | {failing} |"
          for name, path, old, new, outcome, failing in one_line],
        "",
        "<details><summary>Every sampled mutant</summary>",
        "",
        "| where | operator | mutation | outcome | first failing test | s |",
        "|---|---|---|---|---|---|",
        *every,
        "",
        "</details>",
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every module's sample size")
    parser.add_argument("--modules", nargs="*", default=None, help="only these module paths")
    parser.add_argument("--workdir", default="/tmp/wsss-mutation")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.md"))
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--timeout-slack", type=float, default=30.0)
    parser.add_argument("--list", action="store_true", help="print the sample and exit")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return
    modules = [m for m in MODULES if args.modules is None or m.path in args.modules]
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(["python benchmarks/mutation.py", *(sys.argv[1:] if argv is None else argv)])
    mutants, population = sample_mutants(ROOT, modules, args.seed, args.scale)
    if args.list:
        for m in mutants:
            original, mutated = mutated_source(ROOT, m)
            line, before, after = describe(original, mutated) if mutated else (m.line, "", "(no mutation)")
            print(f"{m.module}:{line} {m.operator.split('/')[1]}#{m.occurrence}: {before} -> {after}")
        print(f"{len(mutants)} mutants of {sum(population.values())}")
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = [Worker(i, workdir, ROOT) for i in range(args.jobs)]
    t0 = time.monotonic()
    try:
        load_start = load_average()
        base_seconds = baseline(workers, modules, NEW_TESTS)
        by_path = {m.path: m for m in modules}
        # interleave the modules so that both jobs finish together and a cut-short run is balanced
        rank, size = {}, {}
        for m in mutants:
            rank[m.key] = size.get(m.module, 0)
            size[m.module] = rank[m.key] + 1
        order = sorted(mutants, key=lambda m: (rank[m.key] + 0.5) / size[m.module])
        todo: "queue.Queue[Mutant]" = queue.Queue()
        for m in order:
            todo.put(m)
        lock = threading.Lock()
        done = [0]

        def work(worker: Worker) -> None:
            while True:
                try:
                    m = todo.get_nowait()
                except queue.Empty:
                    return
                module = by_path[m.module]
                timeout = args.timeout_factor * sum(base_seconds[f] for f in _files(module.tests)) + args.timeout_slack
                try:
                    run_mutant(worker, m, module, timeout, NEW_TESTS)
                except Exception as exc:  # noqa: BLE001 - one broken mutant must not stop the run
                    m.outcome, m.killer = "error", repr(exc)
                with lock:
                    done[0] += 1
                    print(f"[{done[0]}/{len(mutants)} {time.monotonic() - t0:6.0f}s] {m.module}:{m.line} "
                          f"{m.operator.split('/')[1]}: {m.before} -> {m.after}: {m.outcome} {m.killer} "
                          f"({m.seconds:.1f}s)", flush=True)

        threads = [threading.Thread(target=work, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        one_line = run_one_line_changes(workers, modules, NEW_TESTS, 1800)
        for row in one_line:
            print("one-line change:", " | ".join(row), flush=True)
    finally:
        for w in workers:
            w.close()
    wall = time.monotonic() - t0
    args.load = (load_start, load_average())
    (workdir / "mutants.json").write_text(json.dumps([dataclasses.asdict(m) for m in mutants], indent=1))
    text = write_report(Path(args.out), mutants, population, modules, args, started, wall, base_seconds, command, ROOT,
                        one_line)
    print(text.split("## Survivors")[0])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
