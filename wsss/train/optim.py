"""AdamW and its lr schedule.

MoRe (SPEC §3.7): the model's parameter groups (``optim.groups=model``) with the poly schedule
and linear warm-up, stepped per iteration. AReAM / MCTformer (SPEC §5, the official run script):
timm's ``create_optimizer_v2`` (``optim.groups=no_decay``: biases, 1-D norm weights and the
model's ``no_weight_decay()`` names without weight decay), the DeiT lr scaling
``lr × global batch / lr_base_batch`` and timm's ``CosineLRScheduler`` stepped once per epoch
(``optim.schedule=cosine_epoch``, :class:`EpochSchedule`). ``cosine`` is a per-iteration cosine.
"""
import math

import torch


def poly_warmup_factor(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Multiplier of each group's base lr at ``step``."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return max(0.0, 1.0 - step / max_iters) ** power


def cosine_warmup_factor(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float,
                         min_ratio: float) -> float:
    """Linear warm-up as :func:`poly_warmup_factor`, then a cosine from 1 to ``min_ratio``."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    t = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class EpochSchedule:
    """A timm scheduler counted in epochs behind the per-iteration interface of the other
    schedules: ``step()`` after every optimizer step, ``state_dict()``/``load_state_dict()``.

    Iteration ``i`` belongs to epoch ``e = i // iters_per_epoch``. The official loop (DeiT's
    ``main.py``, which MCTformer and AReAM keep) calls ``scheduler.step(epoch)`` after epoch
    ``epoch`` has ended, so epoch ``e`` trains at timm's value for ``t = max(e − 1, 0)``: epochs 0
    and 1 both at ``warmup_lr`` (the value timm sets at construction is its ``t = 0`` value).
    The state is the iteration count plus the timm scheduler's own state, so a resumed run sets
    exactly the lr the interrupted one would have."""

    def __init__(self, scheduler, iters_per_epoch: int):
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        self.scheduler = scheduler
        self.iters_per_epoch = int(iters_per_epoch)
        self.last_iter = 0
        self._apply()

    def epoch_value_index(self, iteration: int) -> int:
        """The timm time ``t`` whose value is the lr of ``iteration``."""
        return max(iteration // self.iters_per_epoch - 1, 0)

    def _apply(self) -> None:
        self.scheduler.step(self.epoch_value_index(self.last_iter))

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.scheduler.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "iters_per_epoch": self.iters_per_epoch,
                "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_iter = int(state["last_iter"])
        self.iters_per_epoch = int(state["iters_per_epoch"])
        self.scheduler.load_state_dict(state["timm"])
        self._apply()


def scaled_lr(optim_cfg, global_batch: int) -> float:
    """``optim.lr``, or with ``optim.lr_base_batch > 0`` DeiT's linear scaling
    ``lr × global batch / lr_base_batch`` (SPEC §5: 5e-4 × 64 / 512)."""
    if optim_cfg.lr_base_batch <= 0:
        return optim_cfg.lr
    if global_batch < 1:
        raise ValueError(f"optim.lr_base_batch={optim_cfg.lr_base_batch} scales the lr by the global batch, "
                         f"got global_batch={global_batch}")
    return optim_cfg.lr * global_batch / optim_cfg.lr_base_batch


def _fusable(model) -> bool:
    """torch's fused AdamW (one kernel per parameter group; it skips a step on a device flag,
    see :func:`optimizer_step`) runs on floating-point CUDA and CPU parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def _no_decay_adamw(model, optim_cfg, lr: float):
    """timm's AdamW with its two groups: weight decay 0 for biases, 1-D parameters and the names
    of ``model.no_weight_decay()``; ``optim.weight_decay`` for the rest (SPEC §5)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=optim_cfg.weight_decay,
                               eps=optim_cfg.eps, betas=tuple(optim_cfg.betas), filter_bias_and_bn=True,
                               fused=_fusable(model))


def _epoch_cosine(opt, optim_cfg, max_iters: int, iters_per_epoch: int) -> EpochSchedule:
    """timm's cosine with linear warm-up, in epochs (``create_scheduler_v2``, SPEC §5)."""
    from timm.scheduler import create_scheduler_v2

    if iters_per_epoch < 1:
        raise ValueError("optim.schedule=cosine_epoch needs the iterations per epoch (iters_per_epoch >= 1), "
                         f"got {iters_per_epoch}")
    epochs = math.ceil(max_iters / iters_per_epoch)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, min_lr=optim_cfg.min_lr,
                                   warmup_lr=optim_cfg.warmup_lr, warmup_epochs=optim_cfg.warmup_epochs,
                                   cooldown_epochs=0, step_on_epochs=True)
    return EpochSchedule(sched, iters_per_epoch)


def _model_groups_adamw(model, optim_cfg, lr: float):
    """AdamW over ``model.param_groups()``: backbone groups at ``lr``, the heads at
    ``head_lr_mult·lr``, one weight decay (MoRe, SPEC §3.7)."""
    groups = model.param_groups()
    mults = [1.0, 1.0] + [optim_cfg.head_lr_mult] * (len(groups) - 2)
    param_groups = [{"params": [p for p in g if p.requires_grad], "lr": lr * m,
                     "weight_decay": optim_cfg.weight_decay}
                    for g, m in zip(groups, mults) if any(p.requires_grad for p in g)]
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, fused=_fusable(model))


def build_optimizer(model, optim_cfg, max_iters: int, iters_per_epoch: int = 0, global_batch: int = 0):
    """Returns (AdamW, schedule whose ``step()`` follows every optimizer step).

    ``optim.groups``: ``model`` (the model's groups, :func:`_model_groups_adamw`) or ``no_decay``
    (timm's, :func:`_no_decay_adamw`). ``optim.schedule``: ``poly`` / ``cosine`` per iteration
    (LambdaLR) or ``cosine_epoch`` (:class:`EpochSchedule`, needs ``iters_per_epoch``).
    ``optim.lr_base_batch > 0`` scales the lr by ``global_batch`` (:func:`scaled_lr`)."""
    lr = scaled_lr(optim_cfg, global_batch)
    if optim_cfg.groups == "no_decay":
        opt = _no_decay_adamw(model, optim_cfg, lr)
    else:
        opt = _model_groups_adamw(model, optim_cfg, lr)
    if optim_cfg.schedule == "cosine_epoch":
        return opt, _epoch_cosine(opt, optim_cfg, max_iters, iters_per_epoch)
    warmup_iters = int(round(optim_cfg.warmup * max_iters))
    if optim_cfg.schedule == "cosine":
        factor = lambda t: cosine_warmup_factor(t, max_iters, warmup_iters, optim_cfg.warmup_ratio,  # noqa: E731
                                                optim_cfg.min_lr_ratio)
    else:
        factor = lambda t: poly_warmup_factor(t, max_iters, warmup_iters, optim_cfg.warmup_ratio,  # noqa: E731
                                              optim_cfg.power)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def optimizer_step(total, model, opt, scaler, sched, grad_clip: float = 0.0, skip=None) -> None:
    """Backward of ``total`` and one AdamW + schedule step (GradScaler-aware, optional clipping).

    ``skip``: a 0-dim float flag on the device; where it is 1 the step changes no weight and no
    optimizer state, decided on the device without a host read: the fused AdamW kernel takes it
    as its ``found_inf`` (moments, weights and step counts stay as they were). Under fp16's
    GradScaler, which hands the optimizer its own ``found_inf``, the loss is multiplied by NaN
    instead, so every gradient is non-finite and the scaler skips the step. An optimizer
    without that interface reads the flag on the host (a sync per step). The schedule always
    steps (a skipped step ends the run, :class:`wsss.train.loop.NonFiniteGuard`)."""
    opt.zero_grad(set_to_none=True)
    if skip is not None and scaler.is_enabled():
        total = total * torch.where(skip > 0, float("nan"), 1.0)
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if skip is None or scaler.is_enabled():
        scaler.step(opt)
    elif getattr(opt, "_step_supports_amp_scaling", False):  # fused: the kernel reads the flag
        opt.found_inf = skip
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif not bool(skip):
        opt.step()
    scaler.update()
    sched.step()
