"""Short CPU training runs on a tiny synthetic data set: smoke, resume, evaluation."""
import csv

import pytest
import torch

from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset

TINY = [
    "model.backbone=custom", "model.embed_dim=48", "model.depth=3", "model.num_heads=3", "model.patch_size=8",
    "model.img_size=64", "data.crop_size=64", "data.train_split=train", "data.num_workers=0",
    "train.batch_size=4", "train.log_interval=1", "train.eval_interval=0", "cam.scales=[1.0]",
    "cam.par_dilations=[1,2]", "cam.par_iters=2", "eval.val_images=2", "eval.train_images=2",
    "eval.scales=[1.0]", "eval.cam_scales=[1.0]", "eval.bkg_sweep=[0.3,0.5]", "eval.panels=1",
    "optim.lr=1e-4", "device=cpu",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=0, num_train=12, num_val=3, size=64,
                                  num_classes=3)


def _cfg(root, run_dir, *extra):
    return load_config(None, TINY + [f"data.root={root}", f"run_dir={run_dir}", *extra])


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss/total"}


@pytest.mark.parametrize("method", ["baseline", "more"])
def test_smoke_run_and_eval(data_root, tmp_path, method):
    from wsss.eval.evaluate import evaluate
    from wsss.train.loop import train

    run = tmp_path / method
    cfg = _cfg(data_root, run, f"model.method={method}", "model.num_reg_tokens=2", "train.max_iters=4",
               "loss.starts.seg=0.5", "loss.starts.reg=0.5", "train.cam2mask=0.5", "train.ckpt_interval=4")
    ckpt = train(cfg)
    assert ckpt.is_file() and (run / "config.yaml").is_file() and (run / "train.log").is_file()
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    result = evaluate(cfg, ckpt)
    names = [r["result"] for r in result["table"]]
    assert "E3 segmentation (val)" in names and "E1 CAM pseudo labels (train)" in names
    assert ("E2 LAM segmentation, predicted labels (val)" in names) == (method == "more")
    assert all(0.0 <= r["miou"] <= 1.0 for r in result["table"])
    assert (run / "eval" / "results.md").is_file() and (run / "eval" / "results.csv").is_file()
    assert list((run / "eval" / "panels").glob("*.png"))


def test_resume_gives_the_same_next_steps(data_root, tmp_path):
    from wsss.train.loop import train

    common = ["model.method=more", "model.num_reg_tokens=2", "train.max_iters=4", "loss.starts.seg=0.5",
              "loss.starts.reg=0.5", "train.cam2mask=0.75", "train.ckpt_interval=2", "train.keep_checkpoints=true"]
    full = tmp_path / "full"
    train(_cfg(data_root, full, *common))
    resumed = tmp_path / "resumed"
    train(_cfg(data_root, resumed, *common, f"resume={full / 'checkpoint_000002.pt'}"))
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch):
    import wsss.methods.baseline as steps
    from wsss.train.loop import train

    run = tmp_path / "nan"
    calls = {"n": 0}
    real = steps.classification_loss

    def poisoned(logits, y):  # the 4th step's loss goes NaN
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(steps, "classification_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train(_cfg(data_root, run, "model.method=baseline", "train.max_iters=6", "train.ckpt_interval=2"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("optimizer,scaled", [("fused", False), ("fused", True), ("plain", False)])
def test_non_finite_step_is_skipped_on_the_device_and_reported_at_the_check(optimizer, scaled):
    """From the first non-finite loss on no update is applied (weights and AdamW state stay those
    of the last good step, also for the finite steps after it) without a host read per step;
    the check at the log interval raises naming the first bad step. fused: the kernel's
    found_inf; scaled: GradScaler's own skip (fp16 runs); plain: the host-read fallback."""
    from wsss.train.loop import NonFiniteGuard
    from wsss.train.optim import optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=optimizer == "fused", foreach=False if optimizer ==
                            "plain" else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    guard = NonFiniteGuard("cpu")
    x = torch.randn(4, 3)

    def step(i, poison):
        loss = model(x).pow(2).mean() * (float("nan") if poison else 1.0)
        stacked = loss.view(1)
        total = stacked.sum()
        optimizer_step(total, model, opt, scaler, sched, grad_clip=1.0, skip=guard.update(i, ["l"], stacked, total))

    step(0, False)
    step(1, False)
    assert set(guard.check()) == {"l", "total"}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state.items()}
    step(2, True)
    step(3, False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in opt.state.items():
        for n, t in s.items():
            assert torch.equal(t, state[p][n]), n
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: \{'l': nan, 'total': nan\}"):
        guard.check()


def test_non_finite_loss_between_log_steps_keeps_the_checkpoint_before_it(data_root, tmp_path, monkeypatch):
    """The flag is read at the log interval and before every checkpoint: a NaN at step 3 with
    log_interval 4 stops the run at the step-4 check, and checkpoint 2 stays the last one."""
    import wsss.methods.baseline as steps
    from wsss.train.loop import train

    run = tmp_path / "nan4"
    calls = {"n": 0}
    real = steps.classification_loss

    def poisoned(logits, y):
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(steps, "classification_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train(_cfg(data_root, run, "model.method=baseline", "train.max_iters=8", "train.ckpt_interval=2",
                   "train.log_interval=4"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (run / "metrics.csv").exists()  # nothing was logged: the step-4 check raised
