"""The README's benchmark commands, run as a user runs them, shrunk in size only (the numbers are
not checked here: they are measured alone on the machine and committed in benchmarks/results/)."""
import subprocess
import sys
from pathlib import Path

import pytest

from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A 1-iteration checkpoint of configs/demo.yaml's architecture on a small synthetic set."""
    from wsss.train.loop import train

    root = make_synthetic_dataset(tmp_path_factory.mktemp("bench_data"), seed=3, num_train=8, num_val=3, size=80,
                                  num_classes=5)
    run = tmp_path_factory.mktemp("bench_run")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={root}", f"run_dir={run}", "train.max_iters=1",
                                                        "train.batch_size=4", "data.num_workers=0", "device=cpu",
                                                        "train.eval_interval=0", "train.ckpt_interval=1"])
    return root, train(cfg)


def test_bench_eval_command(demo_checkpoint, tmp_path):
    root, ckpt = demo_checkpoint
    out = tmp_path / "eval-cpu.md"
    proc = _run(["benchmarks/bench_eval.py", "--ckpt", str(ckpt), "--data", str(root), "--images", "3",
                 "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    for row in ("| off | loop | 1 |", "| off | engine | 1 |", "| on | loop | 1 |", "| on | engine | 1 |",
                "| on | engine | 2 |"):
        assert row in text, text
    # the engine and the loop (and 2 processes) score the same
    assert "CRF off: yes, CRF on: yes" in text
    # the forward-only bound, in 1 and 2 processes, over the same 3 images
    assert "| 1 | 3 |" in text and "| 2 | 3 |" in text, text
    assert "images/s" in proc.stdout


def test_bench_train_command(tmp_path):
    out = tmp_path / "train-cpu.md"
    _run(["benchmarks/bench_train.py", "--device", "cpu", "--size", "64", "--batch", "2", "--iters", "1", "--warmup",
          "1", "--threads", "1", "--out", str(out), "model.depth=4", "aream.layer_index=3"])
    text = out.read_text()
    for row in ("| more step (", "| aream step ("):
        assert text.count(row) == 2, text  # auto and reference rows of each method
    assert "skipped" not in text


def test_bench_kernels_command(tmp_path):
    out = tmp_path / "kernels-cpu.md"
    _run(["benchmarks/bench_kernels.py", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert "| " in out.read_text()


def test_bench_crf_command(tmp_path):
    out = tmp_path / "crf-cpu.md"
    _run(["benchmarks/bench_crf.py", "--device", "cpu", "--repeats", "1", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert "| dense_crf | official 1/3, 67/3/4 |" in text and "pydensecrf2" in text
