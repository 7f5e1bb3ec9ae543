"""benchmarks/gpu_check.py: its CPU dry run (every step runs or says why not, the results file
lists them all, quickly) and the parts that keep the GPU run in its time: a hanging step is
killed, the global deadline still writes the results file, the benchmark tables are read."""
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
DRY_RUN_LIMIT_S = 90  # the bound for the dry run on the 2-core CI machine
ROW = re.compile(r"^\| (\d+) \| (\w+): [^|]* \| (pass|fail|skipped)(?:: ([^|]*))? \| ([\d.]+) \| [\d.]+ \| (.*) \|$")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _rows(text: str) -> dict:
    """{step name: (status, why, key numbers)} of a results file's table."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(2)] = (m.group(3), (m.group(4) or "").strip(), m.group(6).strip())
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "gpu-check.md"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(base / "work")],
                       capture_output=True, text=True, timeout=300)
    return p, out, time.monotonic() - t0


def test_dry_run_writes_every_step_with_a_status(dry_run):
    p, out, _ = dry_run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = out.read_text()
    rows = _rows(text)
    assert list(rows) == [s.name for s in gpu_check.STEPS], text
    skipped = {"sanitizer", "bench_crf"}  # no CUDA here; bench_crf's sizes are fixed
    assert all(rows[name][0] == "skipped" and rows[name][1] for name in skipped), rows  # skipped, with why
    assert all(status == "pass" for name, (status, _, _) in rows.items() if name not in skipped), rows
    for header in ("- device:", "- CUDA:", "- versions:", "- command:", "- date:"):
        assert header in text


def test_dry_run_reports_the_key_numbers(dry_run):
    rows = _rows(dry_run[1].read_text())
    assert re.search(r"\d+ tests collected", rows["tests"][2])
    for step in ("train_fp32", "train_bf16"):
        assert re.search(r"[\d.]+ s/it", rows[step][2]), rows[step]
    assert re.search(r"more: \d+ op-level; aream: \d+ op-level", rows["host_syncs"][2]), rows["host_syncs"]
    assert "s/it" in rows["bench_train"][2] and "reference rows" in rows["bench_kernels"][2]


def test_dry_run_is_quick(dry_run):
    assert dry_run[2] < DRY_RUN_LIMIT_S, f"the dry run took {dry_run[2]:.0f} s"


def _sleep(ctx):
    time.sleep(60)


def _raise(ctx):
    raise RuntimeError("the step broke")


def _die(ctx):
    import os

    os._exit(3)


@pytest.mark.parametrize("func, why", [(_sleep, "timed out after 1 s"), (_raise, "RuntimeError: the step broke"),
                                       (_die, "ended with status 3")])
def test_a_failing_or_hanging_step_is_recorded_as_failed(tmp_path, func, why):
    ctx = gpu_check.Context(dry_run=False, work=tmp_path)
    t0 = time.monotonic()
    result = gpu_check.run_step(gpu_check.Step("probe", "probe", {"gpu": 1, "dry": 1}, func), ctx, timeout=1.0)
    assert result.status == "fail" and why in result.why, result
    assert time.monotonic() - t0 < 1 + gpu_check.KILL_GRACE_S + 5


def test_the_global_deadline_skips_steps_and_still_writes_the_results(tmp_path):
    out = tmp_path / "r.md"
    argv = ["--dry-run", "--fresh-processes", "--deadline-s", "0", "--out", str(out), "--work", str(tmp_path / "w")]
    assert gpu_check.main(argv) == 0
    rows = _rows(out.read_text())
    assert list(rows) == [s.name for s in gpu_check.STEPS]
    assert all(status == "skipped" and why.startswith("global deadline") for status, why, _ in rows.values()), rows


@pytest.mark.parametrize("name, result", [("bench_kernels", "kernels-cpu.md"), ("bench_train", "train-cpu.md"),
                                          ("bench_crf", "crf-cpu.md")])
def test_key_numbers_of_the_committed_benchmark_results(name, result):
    path = REPO / "benchmarks" / "results" / result
    if not path.is_file():
        pytest.skip(f"{path} is not committed")
    rows = gpu_check.markdown_rows(path.read_text())
    key = gpu_check.BENCH_KEYS[name](rows)
    assert rows and re.search(r"\d", key) and "None" not in key, key


def test_the_test_step_selects_the_device_tests():
    names = {p.name for p in gpu_check.cuda_test_files()}
    assert {"test_crf.py", "test_lattice.py", "test_energy_loss.py", "test_amp.py", "test_kernels_par.py",
            "test_kernels_affinity.py", "test_kernels_attention.py"} <= names
    assert "test_gpu_check.py" not in names and "test_train.py" not in names
    extension = {p.name for p in gpu_check.extension_test_files()}
    assert {"test_crf.py", "test_lattice.py"} <= extension <= names
    groups = gpu_check.shard(gpu_check.cuda_test_files(), 4)
    assert len(groups) <= 4 and sorted(p for g in groups for p in g) == gpu_check.cuda_test_files()


def test_junit_summary(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="assert 1 == 2&#10;more"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no device"/></testcase>'
                   '<testcase classname="t" name="d"><error message=""/></testcase></testsuite></testsuites>')
    counts, failures, skips = gpu_check.junit_summary([xml])
    assert counts == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert failures == ["t::b: assert 1 == 2", "t::d: error"] and skips == {"no device": 1}


def test_a_step_in_a_fresh_interpreter(tmp_path):
    """--fresh-processes (and the fallback when this process holds CUDA state): fork, then exec."""
    ctx = gpu_check.Context(dry_run=False, work=tmp_path, fresh=True)
    sanitizer = next(s for s in gpu_check.STEPS if s.name == "sanitizer")
    result = gpu_check.run_step(sanitizer, ctx, timeout=60)
    assert result.status == "skipped" and "no CUDA device" in result.why, result
