"""Two gloo processes on the CPU: identical replicas, equal to one process with the same
global batch, and resume under another world size."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset

from test_train import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank, world, port):
    """What torchrun sets for one of ``world`` local processes; one thread each on 2 cores."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _worker(rank, world, port, overrides):
    _torchrun_env(rank, world, port)
    from wsss.train.loop import train

    train(load_config(None, overrides))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=1, num_train=12, num_val=2, size=64,
                                  num_classes=3)


def _overrides(root, run_dir, batch, *extra):
    # baseline before its seg stage: per-image mean losses, so 2 x 2 images == 1 x 4 images exactly
    return TINY + [f"data.root={root}", f"run_dir={run_dir}", f"train.batch_size={batch}", "model.method=baseline",
                   "train.max_iters=3", "loss.starts.seg=1.0", "train.ckpt_interval=2", "train.keep_checkpoints=true",
                   "model.num_reg_tokens=0", *extra]


def test_two_processes_match_one_process(data_root, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), _overrides(data_root, tmp_path / "ddp", 2)), nprocs=2, join=True)
    from wsss.train.loop import train

    train(load_config(None, _overrides(data_root, tmp_path / "single", 4)))
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    # fp32 reductions in a different order (per-rank means, then the all-reduce): tiny differences
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    # resume the 2-process run's step-2 checkpoint in one process
    resumed = tmp_path / "resumed"
    train(load_config(None, _overrides(data_root, resumed, 4,
                                       f"resume={tmp_path / 'ddp' / 'checkpoint_000002.pt'}")))
    ckpt = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3


def _validate_worker(rank, world, port, overrides, state_path, out_dir):
    import json
    import os

    _torchrun_env(rank, world, port)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        scores = _validate_once(overrides, state_path)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(scores, f)
    finally:
        dist.destroy_process_group()


def _validate_once(overrides, state_path):
    from wsss.data import build_datasets
    from wsss.eval.inference import quick_validate
    from wsss.models import build_model

    cfg = load_config(None, overrides)
    _, _, val = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.val_split,
                               cfg.data.crop_size, eval_resize=cfg.data.crop_size, train_masks=False)
    model = build_model(cfg.model, val.num_classes)
    model.load_state_dict(torch.load(state_path, weights_only=True))
    return quick_validate(model.eval(), val, cfg, torch.device("cpu"))


@pytest.mark.parametrize("method", ["more", "aream"])
def test_sharded_validation_equals_one_process(tmp_path_factory, tmp_path, method):
    """Every rank validates a strided shard (5 images over 2 ranks: 3 + 2) and the confusion
    matrices are summed: each rank reports exactly the single-process scores."""
    import json

    from wsss.models import build_model

    root = make_synthetic_dataset(tmp_path_factory.mktemp("val5"), seed=3, num_train=4, num_val=5, size=64,
                                  num_classes=3)
    extra = ["aream.layer_index=2", "aream.entropy=none"] if method == "aream" else ["model.num_reg_tokens=1"]
    overrides = TINY + [f"data.root={root}", f"model.method={method}", "eval.val_images=0", *extra]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    state_path = tmp_path / "model.pt"
    torch.save(build_model(cfg.model, 3).state_dict(), state_path)
    single = _validate_once(overrides, state_path)
    mp.spawn(_validate_worker, args=(2, _free_port(), overrides, str(state_path), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        shard_scores = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert shard_scores == single, (rank, shard_scores, single)
    assert set(single) == ({"cam", "aream_cam"} if method == "aream"
                           else {"cam", "aux_cam", "score_map", "fused", "seg"})


@pytest.mark.parametrize("method,extra", [
    ("more", ["model.num_reg_tokens=2", "loss.starts.seg=0.5", "loss.starts.reg=0.5", "train.cam2mask=0.75"]),
    ("aream", ["aream.layer_index=2", "aream.aff_start=0.5", "aream.entropy=online"]),
])
def test_every_method_trains_under_ddp_through_all_stages(data_root, tmp_path, method, extra):
    """Every loss stage (MoRe: before/after the seg/reg stage and cam2mask; AReAM: before/after
    aff_start) and a mid-run validation on both ranks: a parameter without a gradient or a rank
    waiting in a collective would stop this run (the loop also checks the replicas agree)."""
    overrides = TINY + [f"data.root={data_root}", f"run_dir={tmp_path}", f"model.method={method}",
                        "train.batch_size=2", "train.max_iters=4", "train.eval_interval=2", "train.ckpt_interval=4",
                        *extra]
    mp.spawn(_worker, args=(2, _free_port(), overrides), nprocs=2, join=True)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    log = (tmp_path / "train.log").read_text()
    assert "step 2 validation mIoU" in log and "step 4 validation mIoU" in log


def _eval_worker(rank, world, port, overrides, ckpt, out):
    _torchrun_env(rank, world, port)
    import torch.distributed as dist

    from wsss.eval.evaluate import evaluate

    dist.init_process_group("gloo")
    try:
        evaluate(load_config(None, overrides), ckpt, out)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(tmp_path_factory, tmp_path):
    """wsss.eval's protocols (E1 CAM/LAM with CRF, E2, E3, the swept extras) over 2 gloo
    processes: the same table as one process, to the last digit."""
    import json

    from wsss.eval.evaluate import evaluate
    from wsss.train.loop import train

    root = make_synthetic_dataset(tmp_path_factory.mktemp("eval5"), seed=4, num_train=5, num_val=5, size=64,
                                  num_classes=3)
    overrides = TINY + [f"data.root={root}", f"run_dir={tmp_path / 'run'}", "model.method=more",
                        "model.num_reg_tokens=1", "train.max_iters=2", "loss.starts.seg=0.5", "train.ckpt_interval=2",
                        "eval.val_images=0", "eval.train_images=0", "eval.crf=true", "eval.input_size=64",
                        "eval.protocols=[E1-CAM,E1-LAM,E2,E3,extra-LAM]", "eval.lam_seg_scales=[1.0,0.5]"]
    ckpt = train(load_config(None, overrides))
    single = evaluate(load_config(None, overrides), ckpt, tmp_path / "one")["table"]
    mp.spawn(_eval_worker, args=(2, _free_port(), overrides, str(ckpt), str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["table"]
    assert [r["result"] for r in two] == [r["result"] for r in single]
    assert len(single) == 10  # 4 protocols x (raw, CRF) + the 2 extra rows
    for a, b in zip(single, two):
        assert (a["miou"], a["pixel_acc"], a["note"]) == (b["miou"], b["pixel_acc"], b["note"]), a["result"]
