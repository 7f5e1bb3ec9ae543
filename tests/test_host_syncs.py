"""Host syncs and ATen launches of a training step (MoRe and AReAM), counted on the CPU.

A real training step — the loop's own ``train_step`` on the loop's own pieces (data set, model,
fused AdamW, objective, schedule, ``NonFiniteGuard``) — runs ``train.log_interval`` times under
``tests/sync_counter.SyncCounter``, then the log interval's ``guard.check()``. On a CPU the host
reads are free, so the counter recognises what *would* block the host on a CUDA device (value
reads, data-dependent output sizes, device → host and pageable host → device copies). Budget:
exactly one blocking host read per log interval (the check). ``ELSEWHERE`` may list sync
sources outside the step's own code with a cap each; it is empty: the kernels' value checks
(label ranges, finite layer weights) are off inside the step (``wsss.kernels._common.
trusted_values``) and the AReAM model's update counter is decided on the device.

Measured on this test's configuration (batch 4, 64² crops, a 3-block width-48 ViT, CPU,
``impl=auto`` = the kernels' PyTorch references), per step after one warm-up step; "before" is
commit 34d81c2, counted the same way:

- MoRe, every loss on. Host syncs 28 → 0 of its own (+1 per log interval, the guard's read).
  Before: UNE's per-image ``nonzero`` + ``.cpu()`` 16, PAR's per-image present classes 4,
  label-range checks 5 (3 in ``wsss.losses``, 2 in the ptc kernel), ``denormalize``'s mean/std
  copies 2, ``finite.item()`` 1. Left: none. ATen ops 2616 → 1744 (``impl=triton``, the CUDA path: 2114 → 1236).
- AReAM, affinity loss with online entropies. Host syncs 15 → 0 of its own (+1 per log
  interval). Before: PAR's present classes 4, ``denormalize`` 2, ``finite.item()`` 1, and 8 in
  code outside the step (kernel label checks 2 × layers, the layer-weight finite check, the
  model's update counter read 3 times); left of those: none. ATen ops 1986 → 1447.

"Before" leaves out AdamW's step-count reads on the CPU single-tensor path (57 / 42 per step):
on a CUDA run they are host tensors. Of the ATen ops, the optimizer went from 570 (CPU
single-tensor AdamW) to 15 (fused); what remains is mostly the network's forward and backward
and, on the CPU, the PAR reference (~430 ops; one custom op on the Triton path).
"""
import pytest
import torch
from torch.utils.data import DataLoader

from wsss.config import load_config
from wsss.data import build_datasets
from wsss.data.synthetic import make_synthetic_dataset
from wsss.methods import Schedule, get_method
from wsss.train.loop import NonFiniteGuard, _to_device, train_step
from wsss.train.optim import build_optimizer
from wsss.utils.device import autocast

from sync_counter import SyncCounter
from test_train import TINY

LOG_INTERVAL = 2
RECIPES = {
    # every MoRe loss from the first iteration: cls, aux, tok, ptc, cle, une, seg, reg
    "more": ["model.method=more", "model.num_reg_tokens=2", "loss.starts.seg=0.0", "loss.starts.reg=0.0",
             "train.cam2mask=0.5"],
    # the affinity loss with the online entropy estimate from the first iteration; timm's optimizer
    "aream": ["model.method=aream", "aream.layer_index=1", "aream.aff_start=0.0", "aream.entropy=online",
              "optim.groups=no_decay", "optim.schedule=cosine_epoch"],
}
TERMS = {"more": {"cls", "aux", "tok", "ptc", "cle", "une", "seg", "reg", "total"},
         "aream": {"cls", "patch", "aff", "total"}}
# (file, function) of sync sources outside the training step's own code -> their count per step today
ELSEWHERE = {"more": {}, "aream": {}}  # the kernels' value checks are off in the step (trusted_values)
# ATen ops per step: 80 % of the count before the change, so per-image loops cannot come back
LAUNCH_BOUND = {"more": int(0.8 * 2616), "aream": int(0.8 * 1986)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=0, num_train=8, num_val=1, size=64,
                                  num_classes=3)


def _source(key: str):
    """("file", "function") of a SyncCounter key "what @ file:line function"."""
    place = key.split(" @ ", 1)[1]
    file_line, _, function = place.partition(" ")
    return file_line.rsplit(":", 1)[0], function


class _Run:
    """The pieces ``wsss.train.loop.train`` builds, on the CPU, and its step."""

    def __init__(self, root, method: str):
        self.cfg = cfg = load_config(None, TINY + RECIPES[method] + [
            f"data.root={root}", "run_dir=unused", "train.max_iters=20", f"train.log_interval={LOG_INTERVAL}"])
        device = torch.device("cpu")
        train_ds, _, _ = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.val_split,
                                        cfg.data.crop_size, aug=cfg.data.aug, seed=cfg.seed,
                                        eval_resize=cfg.data.crop_size, train_masks=False)
        torch.manual_seed(cfg.seed)
        m = get_method(method)
        self.model = m.build_model(cfg.model, train_ds.num_classes).to(device).train()
        per_epoch = len(train_ds) // cfg.train.batch_size
        self.opt, self.sched = build_optimizer(self.model, cfg.optim, cfg.train.max_iters, iters_per_epoch=per_epoch,
                                               global_batch=cfg.train.batch_size)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.loss_fn = m.objective(cfg, device)
        if hasattr(self.loss_fn, "prepare"):
            self.loss_fn.prepare(self.model, cfg)
        self.schedule = Schedule.from_config(cfg)
        self.amp_ctx = autocast(device, cfg.amp)
        self.guard = NonFiniteGuard(device)
        loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=False, drop_last=True)
        # host work and asynchronous copies only (the host label count is read before the copy)
        self.batch = _to_device(next(iter(loader)), device)
        self.it = 0

    def step(self):
        train_step(self.loss_fn, self.model, self.model, self.batch, self.it, self.cfg, self.schedule, self.amp_ctx,
                   self.opt, self.scaler, self.sched, self.guard)
        self.it += 1


@pytest.mark.parametrize("method", ["more", "aream"])
def test_training_step_reads_the_device_once_per_log_interval(data_root, method):
    run = _Run(data_root, method)
    run.step()  # warm-up: the optimizer creates its state on the first step
    run.guard.check()
    with SyncCounter() as counter:
        for _ in range(LOG_INTERVAL):
            run.step()
        logged = run.guard.check()
    assert set(logged) == TERMS[method] and all(torch.isfinite(torch.tensor(v)) for v in logged.values()), logged

    elsewhere = {}
    own = {}
    for key, n in counter.syncs.items():
        src = _source(key)
        (elsewhere if src in ELSEWHERE[method] else own)[key] = n
    launches = counter.launches / LOG_INTERVAL
    report = (f"{method}: {counter.num_syncs} host syncs in {LOG_INTERVAL} steps + check, {launches:.0f} ATen ops "
              f"per step; own {own}; elsewhere {elsewhere}")
    print(report)
    assert sum(own.values()) <= 1, report  # the guard's read at the log interval
    for key, n in elsewhere.items():
        assert n <= ELSEWHERE[method][_source(key)] * LOG_INTERVAL, report
    assert launches <= LAUNCH_BOUND[method], report


def test_the_check_is_the_one_read_and_a_second_check_reads_nothing(data_root):
    run = _Run(data_root, "more")
    run.step()
    with SyncCounter() as counter:
        first = run.guard.check()
        second = run.guard.check()
    assert first is not None and second is None
    assert counter.num_syncs == 1, counter.syncs
