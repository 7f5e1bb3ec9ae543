"""AdamW with the model's parameter groups and the poly (MoRe, SPEC §3.7) or cosine
(AReAM/MCTformer, SPEC §5) schedule with linear warm-up."""
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


def build_optimizer(model, optim_cfg, max_iters: int):
    """Returns (AdamW, LambdaLR). Backbone groups get ``lr``, the heads ``head_lr_mult·lr``."""
    groups = model.param_groups()
    mults = [1.0, 1.0] + [optim_cfg.head_lr_mult] * (len(groups) - 2)
    param_groups = [{"params": [p for p in g if p.requires_grad], "lr": optim_cfg.lr * m,
                     "weight_decay": optim_cfg.weight_decay}
                    for g, m in zip(groups, mults) if any(p.requires_grad for p in g)]
    opt = torch.optim.AdamW(param_groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                            weight_decay=optim_cfg.weight_decay)
    warmup_iters = int(round(optim_cfg.warmup * max_iters))
    if optim_cfg.schedule == "cosine":
        factor = lambda t: cosine_warmup_factor(t, max_iters, warmup_iters, optim_cfg.warmup_ratio,  # noqa: E731
                                                optim_cfg.min_lr_ratio)
    else:
        factor = lambda t: poly_warmup_factor(t, max_iters, warmup_iters, optim_cfg.warmup_ratio,  # noqa: E731
                                              optim_cfg.power)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def optimizer_step(total, model, opt, scaler, sched, grad_clip: float = 0.0) -> None:
    """Backward of ``total`` and one AdamW + schedule step (GradScaler-aware, optional clipping)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
