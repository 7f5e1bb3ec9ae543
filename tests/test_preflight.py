"""Fail fast: everything a run needs later is checked before iteration 1, every problem named
by its config key and path, all of them in one message."""
import subprocess
import sys

import pytest
import torch

from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.utils.preflight import PreflightError

from test_train import TINY


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=0, num_train=8, num_val=2, size=64,
                                  num_classes=3)


def _train(root, run_dir, *extra):
    from wsss.train.loop import train

    return train(load_config(None, TINY + [f"data.root={root}", f"run_dir={run_dir}", "train.max_iters=2",
                                           "train.ckpt_interval=2", *extra]))


def test_every_problem_is_reported_at_once_before_training(data_root, tmp_path, monkeypatch):
    import wsss.crf._ext as ext

    def no_extension(*a, **k):
        raise ImportError("wsss._C is not built (simulated)")

    monkeypatch.setattr(ext, "ops", no_extension)
    with pytest.raises(PreflightError) as info:
        _train(data_root, tmp_path, "model.method=more", "loss.w_reg=0.05", "eval.crf=true",
               "model.pretrained=/nowhere/vit.pth", "data.val_split=nosuchsplit", f"resume={tmp_path}/none.pt")
    msg = str(info.value)
    assert "loss.w_reg=0.05" in msg and "eval.crf=true" in msg and "compiled extension" in msg
    assert "model.pretrained='/nowhere/vit.pth'" in msg
    assert "nosuchsplit.txt" in msg  # the split file looked for
    assert f"resume='{tmp_path}/none.pt'" in msg
    assert len(info.value.problems) == 5
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.csv").exists()


def test_offline_entropy_file_and_batch_larger_than_split(data_root, tmp_path):
    with pytest.raises(PreflightError) as info:
        _train(data_root, tmp_path, "model.method=aream", "aream.layer_index=2", "aream.entropy=offline",
               f"aream.entropy_file={tmp_path}/ent.json", "train.batch_size=16")
    msg = str(info.value)
    assert f"aream.entropy_file='{tmp_path}/ent.json'" in msg and "wsss.tools.layer_entropy" in msg
    assert "data.train_split=train: 8 images, fewer than one batch of train.batch_size=16" in msg


def test_resume_checkpoint_must_fit(data_root, tmp_path):
    ckpt = _train(data_root, tmp_path / "a", "model.method=baseline", "model.num_reg_tokens=1")
    with pytest.raises(PreflightError) as info:
        _train(data_root, tmp_path / "b", "model.method=more", "model.num_reg_tokens=2", f"resume={ckpt}")
    msg = str(info.value)
    assert "model.method='baseline'" in msg and "model.num_reg_tokens=1" in msg
    # a checkpoint of another class count
    state = torch.load(ckpt, weights_only=True)
    state["num_classes"] = 5
    other = tmp_path / "five.pt"
    torch.save(state, other)
    with pytest.raises(PreflightError, match="checkpoint has 5 classes, the data set at data.root=.* has 3"):
        _train(data_root, tmp_path / "c", "model.method=baseline", "model.num_reg_tokens=1", f"resume={other}")
    # weights only (not a training checkpoint)
    torch.save({"model": state["model"]}, other)
    with pytest.raises(PreflightError, match="not a wsss training checkpoint"):
        _train(data_root, tmp_path / "d", "model.method=baseline", "model.num_reg_tokens=1", f"resume={other}")


def test_more_gpus_asked_than_visible():
    from wsss.utils.preflight import gpu_count_problem

    assert gpu_count_problem("cpu", 8) == []
    if not torch.cuda.is_available():
        (msg,) = gpu_count_problem("cuda", 1)
        assert "1 processes on this node" in msg and "0 visible GPU" in msg


def test_command_line_reports_without_traceback(data_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsss.train", "--cfg", "configs/demo.yaml", f"data.root={data_root}",
                           f"run_dir={tmp_path}", "model.pretrained=missing/weights.pth", "device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "training cannot start" in proc.stderr and "model.pretrained='missing/weights.pth'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_reports_missing_checkpoint_extension_and_split(data_root, tmp_path, monkeypatch):
    import wsss.crf._ext as ext
    from wsss.eval.evaluate import evaluate

    def no_extension(*a, **k):
        raise ImportError("wsss._C is not built (simulated)")

    monkeypatch.setattr(ext, "ops", no_extension)
    cfg = load_config(None, TINY + [f"data.root={data_root}", f"run_dir={tmp_path}", "eval.crf=true",
                                    "data.val_split=nosuchsplit"])
    with pytest.raises(PreflightError) as info:
        evaluate(cfg, tmp_path / "none.pt")
    msg = str(info.value)
    assert "evaluation cannot start" in msg and f"--ckpt='{tmp_path}/none.pt'" in msg
    assert "eval.crf=true" in msg and "nosuchsplit.txt" in msg
    assert not (tmp_path / "eval").exists()
