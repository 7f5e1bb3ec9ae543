"""The training loop: one plain loop, autocast + GradScaler, DDP from torchrun's environment,
periodic validation, atomic checkpoints and exact resume."""
from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from wsss.cam import present_class_count
from wsss.config import Config, config_to_dict, save_config
from wsss.data import DatasetError, build_datasets
from wsss.kernels._common import trusted_values
from wsss.methods import Schedule, get_method
from wsss.models.checkpoints import ARCH_KEYS
from wsss.utils.device import autocast, configure_precision, resolve_device, seed_everything
from wsss.utils.logging import setup_logging

from wsss.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from wsss.utils.distributed import dist_env
from wsss.utils.preflight import extension_problem, gpu_count_problem, missing_file, raise_if
from .optim import build_optimizer, optimizer_step


class ResumableSampler(Sampler):
    """Per-epoch shuffle seeded by (seed, epoch), sharded over ranks, able to start mid-epoch.

    The order depends only on the seed, the epoch and the world size, so a resumed run sees
    exactly the batches the interrupted run would have seen next.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.length, generator=g).tolist()
        per_rank = self.length // self.world_size  # drop the tail so ranks stay in step
        # Strided shards: the ranks' k-th batches together are consecutive entries of the
        # permutation, the same images one process would take as one global batch.
        return perm[:per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.length // self.world_size - self.start


def _batches(loader: DataLoader, sampler: ResumableSampler, dataset, start_step: int, batch_size: int,
             world_size: int):
    """Yield batches forever from ``start_step`` on, with (epoch, offset) derived from the step."""
    per_epoch = len(dataset) // world_size // batch_size
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(dataset)} images, fewer than one batch of "
                         f"{batch_size} per process ({world_size} processes)")
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch, offset * batch_size)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch, offset = epoch + 1, 0


def _to_device(batch: dict, device) -> dict:
    """The batch on ``device`` (asynchronous copies from the loader's pinned memory) plus
    ``max_classes``, the most classes of one image, counted on the host labels before the copy
    so that the pseudo-labelling never reads it back from the device."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if torch.is_tensor(batch.get("cls_label")):
        out["max_classes"] = present_class_count(batch["cls_label"])
    return out


class NonFiniteGuard:
    """The finite-loss check of the training steps without a host read per step.

    Each step folds ``isfinite(total)`` (the minimum over DDP ranks) into a sticky device flag
    and returns it as the step's ``skip`` (:func:`optimizer_step`): from the first non-finite
    loss on, no update is applied, so the weights and optimizer state stay those of the last
    good step. The host reads the flag and the latest losses in one transfer at :meth:`check`
    (the log interval, and before a checkpoint or a validation), which raises
    ``FloatingPointError`` naming the first non-finite step and its losses."""

    def __init__(self, device, world: int = 1, note: str = ""):
        self.ok = torch.ones((), device=device)  # 1 while every loss so far was finite
        self.world, self.note = world, note
        self.pending = []  # (step, names, detached losses, finite flag) since the last check

    def update(self, step: int, names, stacked: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(total.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # all ranks skip together
        self.ok = self.ok * finite
        self.pending.append((step, list(names), torch.cat([stacked.detach(), total.detach().view(1)]), finite))
        return 1.0 - self.ok

    def check(self) -> Optional[dict]:
        """One host read: raises at the first non-finite step since the last check; else returns
        the latest step's losses as floats (``total`` included), or None if no step ran since."""
        if not self.pending:
            return None
        _, names, values, _ = self.pending[-1]
        host = torch.cat([self.ok.view(1), values]).tolist()
        if host[0] < 1:  # the run is over: reading each step's flag costs nothing any more
            for step, names, values, finite in self.pending:
                if float(finite) < 1:
                    bad = dict(zip(names + ["total"], values.tolist()))
                    raise FloatingPointError(f"non-finite loss at step {step}: {bad}{self.note}")
            raise FloatingPointError(f"non-finite loss before step {self.pending[0][0]}{self.note}")
        self.pending.clear()
        return dict(zip(names + ["total"], host[1:]))


def train_step(loss_fn, train_model, model, batch: dict, step: int, cfg: Config, schedule, amp_ctx, opt, scaler,
               sched, guard: NonFiniteGuard) -> None:
    """One iteration: the objective, the device-side finite check and a backward + optimizer step
    the guard's flag skips on the device. Reads nothing back to the host: the kernels' value
    checks are off inside (``trusted_values``; the step's labels are in range by construction)."""
    with trusted_values():
        losses = loss_fn(train_model, batch, step, cfg, schedule, amp_ctx)
    stacked = torch.stack(list(losses.values()))
    total = stacked.sum()
    skip = guard.update(step, losses.keys(), stacked, total)
    optimizer_step(total, model, opt, scaler, sched, cfg.train.grad_clip, skip=skip)


class MetricsWriter:
    """Losses and lr to ``metrics.csv`` and, when installed, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "name", "value"])
            for k, v in values.items():
                w.writerow([step, k, f"{v:.6g}"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _config_problems(cfg: Config, device, local_world: int) -> list:
    """Problems of the resolved config that would otherwise surface mid-run (SPEC-free checks)."""
    problems = gpu_count_problem(device.type, local_world)
    problems += get_method(cfg.model.method).config_problems(cfg)
    if cfg.eval.crf:
        problems += extension_problem("eval.crf=true (dense CRF at the final evaluation)")
    if cfg.model.pretrained:
        problems += missing_file("model.pretrained", cfg.model.pretrained,
                                 "a local ImageNet ViT/DeiT checkpoint; model.pretrained='' trains from scratch")
    if cfg.resume:
        problems += missing_file("resume", cfg.resume)
    return problems


def _resume_problems(cfg: Config, ckpt: dict, num_classes: int) -> list:
    """A resume checkpoint must be a wsss checkpoint of the same architecture and class count."""
    problems = []
    saved = (ckpt.get("config") or {}).get("model", {})
    for key in ARCH_KEYS:
        if key in saved and saved[key] != getattr(cfg.model, key):
            problems.append(f"resume={cfg.resume}: checkpoint has model.{key}={saved[key]!r}, the config "
                            f"model.{key}={getattr(cfg.model, key)!r}")
    saved_c = int(ckpt.get("num_classes", num_classes))
    if saved_c != num_classes:
        problems.append(f"resume={cfg.resume}: checkpoint has {saved_c} classes, the data set at "
                        f"data.root={cfg.data.root} has {num_classes}")
    for key in ("optimizer", "scheduler", "scaler", "step", "rng"):
        if key not in ckpt:
            problems.append(f"resume={cfg.resume}: not a wsss training checkpoint (no {key!r} entry); "
                            "to start from trained weights use model.pretrained or wsss.eval --ckpt")
    return problems


def train(cfg: Config) -> Path:
    """Train as ``cfg`` says; returns the path of the final checkpoint."""
    world, rank, local_rank, local_world = dist_env()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        raise_if("training", gpu_count_problem(device.type, local_world))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    configure_precision(device, cfg.tf32)
    run_dir = Path(cfg.run_dir)
    log = setup_logging(run_dir, "train", rank)

    # Everything the run needs later is checked now, before a process group or a model exists.
    problems = _config_problems(cfg, device, local_world)
    try:
        train_ds, _, val_ds = build_datasets(cfg.data.dataset, cfg.data.root, cfg.data.train_split,
                                             cfg.data.val_split, cfg.data.crop_size,
                                             cls_labels=cfg.data.cls_labels or None, aug=cfg.data.aug,
                                             seed=cfg.seed, eval_resize=cfg.data.eval_resize or cfg.data.crop_size,
                                             train_masks=False)
    except (DatasetError, ValueError) as e:
        problems.append(f"data ({cfg.data.dataset} at data.root={cfg.data.root}): {e}")
        train_ds = val_ds = None
    if train_ds is not None and len(train_ds) < cfg.train.batch_size * world:
        problems.append(f"data.train_split={cfg.data.train_split}: {len(train_ds)} images, fewer than one batch of "
                        f"train.batch_size={cfg.train.batch_size} x {world} process(es)")
    ckpt = None
    if cfg.resume and not missing_file("resume", cfg.resume):
        try:
            ckpt = load_checkpoint(cfg.resume)
        except ValueError as e:
            problems.append(f"resume={cfg.resume}: {e}")
        if ckpt is not None and train_ds is not None:
            problems += _resume_problems(cfg, ckpt, train_ds.num_classes)
    raise_if("training", problems)

    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed + rank)
    num_classes = train_ds.num_classes
    method = get_method(cfg.model.method)
    model = method.build_model(cfg.model, num_classes).to(device)
    iters_per_epoch = len(train_ds) // world // cfg.train.batch_size  # as _batches counts epochs
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_iters, iters_per_epoch=iters_per_epoch,
                                 global_batch=cfg.train.batch_size * world)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    step = 0
    best = None  # {"metric", "value", "step"} of checkpoint_best.pt (the method's best_metric)
    if ckpt is not None:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if missing or unexpected:
            raise ValueError(f"resume={cfg.resume}: the checkpoint's weights do not fit the model; missing "
                             f"{missing[:8]}, unexpected {unexpected[:8]}")
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        best = ckpt.get("best")
        rngs = ckpt["rng"]  # one per rank of the saving run; a new world size reuses rank 0's
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        log.info("resumed from %s at step %d", cfg.resume, step)
    if cfg.compile:  # in place (nn.Module.compile): state-dict keys and checkpoints stay unchanged
        model.backbone.compile()
    loss_fn = method.objective(cfg, device)
    if hasattr(loss_fn, "prepare"):
        loss_fn.prepare(model, cfg)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ResumableSampler(len(train_ds), cfg.seed, rank, world)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    batches = _batches(loader, sampler, train_ds, step, cfg.train.batch_size, world)
    schedule = Schedule.from_config(cfg)
    loss_rng = getattr(loss_fn, "generator", None)
    if cfg.resume and loss_rng is not None and ckpt.get("loss_rng") is not None:
        try:
            loss_rng.set_state(ckpt["loss_rng"])
        except RuntimeError:  # a generator of another device type (older wsss sampled UNE on the CPU)
            log.warning("resume=%s: the checkpoint's loss generator state does not fit the %s generator; the "
                        "loss sampling restarts from seed %d", cfg.resume, loss_rng.device, cfg.seed)
    amp_ctx = autocast(device, cfg.amp)
    writer = MetricsWriter(run_dir, enabled=rank == 0)
    ckpt_path = run_dir / "checkpoint.pt"
    log.info("training %s on %s: %d images, %d classes, %d iterations, batch %d x %d process(es); %s",
             cfg.model.method, device, len(train_ds), num_classes, cfg.train.max_iters, cfg.train.batch_size,
             world, method.describe_schedule(schedule))

    guard = NonFiniteGuard(device, world, f"; training stopped, the last good checkpoint ({ckpt_path}) is kept")

    def save(at_step: int, path: Path = ckpt_path) -> None:
        guard.check()  # never save the weights of a run that hit a non-finite loss
        rngs = [None] * world
        state = rng_state()
        if world > 1:
            dist.all_gather_object(rngs, state)
        else:
            rngs = [state]
        if rank == 0:
            save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), scaler=scaler.state_dict(), step=at_step,
                            config=config_to_dict(cfg), rng=rngs, num_classes=num_classes,
                            class_names=list(train_ds.class_names),
                            loss_rng=loss_rng.get_state() if loss_rng is not None else None, best=best)
            if cfg.train.keep_checkpoints and path == ckpt_path:
                shutil.copyfile(ckpt_path, run_dir / f"checkpoint_{at_step:06d}.pt")

    model.train()
    # The bar is for terminals; logs and files get the periodic log lines instead.
    bar = tqdm(total=cfg.train.max_iters, initial=step, disable=rank != 0 or not sys.stderr.isatty(),
               desc="train", dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.train.max_iters:
        batch = _to_device(next(batches), device)
        train_step(loss_fn, train_model, model, batch, step, cfg, schedule, amp_ctx, opt, scaler, sched, guard)
        step += 1
        bar.update(1)
        if step % cfg.train.log_interval == 0 or step == cfg.train.max_iters:
            # the one host read of the log interval: the finite flag and the latest losses
            values = {f"loss/{k}": v for k, v in guard.check().items()}
            values["lr"] = opt.param_groups[0]["lr"]
            writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss/total']:.4f}", lr=f"{values['lr']:.2e}")
            log.info("step %d/%d %s (%.2fs/it)", step, cfg.train.max_iters,
                     " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items()),
                     (time.time() - t0) / max(1, step))
        if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.max_iters
                and step >= round(cfg.train.eval_start * cfg.train.max_iters)):
            guard.check()
            # every rank validates its shard (no rank waits in a collective meanwhile)
            _periodic_eval(model, val_ds, cfg, device, writer, step, log)
            model.train()
        if step % iters_per_epoch == 0:  # the method's per-epoch metrics; its best epoch is kept
            model.eval()
            metrics = method.epoch_end(model, val_ds, cfg, device)
            model.train()
            if metrics:
                writer.write(step, {f"val/{k}": v for k, v in metrics.items()})
                log.info("epoch %d: %s", step // iters_per_epoch, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            value = metrics.get(method.best_metric)
            if value is not None and (best is None or value > best["value"]):
                best = {"metric": method.best_metric, "value": float(value), "step": step}
                save(step, run_dir / "checkpoint_best.pt")
        if step % cfg.train.ckpt_interval == 0 or step == cfg.train.max_iters:
            save(step)
    bar.close()
    if world > 1:
        _check_replicas_in_sync(model)
    _periodic_eval(model, val_ds, cfg, device, writer, step, log)
    writer.close()
    if world > 1:
        dist.destroy_process_group()
    log.info("done in %.1f min; checkpoint %s", (time.time() - t0) / 60, ckpt_path)
    return ckpt_path


@torch.no_grad()
def _check_replicas_in_sync(model) -> None:
    """All ranks must end with the same weights; a cheap checksum makes divergence loud."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    local = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype,
                                                          device=flat.device).remainder(7919)).sum()])
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if any(not torch.allclose(g, gathered[0], rtol=1e-9, atol=0) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {[g.tolist() for g in gathered]}")


def _periodic_eval(model, val_ds, cfg: Config, device, writer: MetricsWriter, step: int, log) -> Optional[dict]:
    from wsss.eval.inference import quick_validate

    model.eval()
    scores = quick_validate(model, val_ds, cfg, device, max_images=cfg.eval.val_images)
    writer.write(step, {f"val/{k}": v for k, v in scores.items()})
    log.info("step %d validation mIoU: %s", step, "  ".join(f"{k} {100 * v:.1f}" for k, v in scores.items()))
    return scores

