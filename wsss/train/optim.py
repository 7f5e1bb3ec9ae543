"""AdamW with MoRe's five parameter groups and the poly schedule with linear warm-up (SPEC §3.7)."""
import torch


def poly_warmup_factor(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Multiplier of each group's base lr at ``step``."""
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return max(0.0, 1.0 - step / max_iters) ** power


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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: poly_warmup_factor(t, max_iters, warmup_iters, optim_cfg.warmup_ratio, optim_cfg.power))
    return opt, sched
