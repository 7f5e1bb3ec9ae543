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


def _worker(rank, world, port, overrides):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from wsss.train.loop import train

    train(load_config(None, overrides))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=1, num_train=12, num_val=2, size=64,
                                  num_classes=3)


def _overrides(root, run_dir, batch, *extra):
    # baseline before seg_start: per-image mean losses, so 2 x 2 images == 1 x 4 images exactly
    return TINY + [f"data.root={root}", f"run_dir={run_dir}", f"train.batch_size={batch}", "model.method=baseline",
                   "train.max_iters=3", "train.seg_start=1.0", "train.ckpt_interval=2", "train.keep_checkpoints=true",
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
