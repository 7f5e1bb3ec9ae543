"""torch.distributed helpers shared by training, validation and evaluation.

Everything here works unchanged in a single process (no process group): shards are then the
whole range and reductions are no-ops.
"""
from __future__ import annotations

import os
from typing import Iterable, List, NamedTuple

import numpy as np
import torch
import torch.distributed as dist


class DistEnv(NamedTuple):
    world: int
    rank: int
    local_rank: int
    local_world: int


def dist_env() -> DistEnv:
    """World size, rank, local rank and processes on this node, from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(world=world, rank=int(os.environ.get("RANK", "0")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def rank_and_world() -> tuple:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int) -> range:
    """This rank's indices of ``range(n)``: strided, so every rank gets ``n // world`` or one more
    and the union over the ranks is every index exactly once."""
    rank, world = rank_and_world()
    return range(rank, n, world)


def all_reduce_confusion(mats: Iterable) -> None:
    """Sum the confusion matrices (``ConfusionMatrix.matrix``, int64) of all ranks in place.

    One collective for all matrices; int64 on the CPU is exact with gloo, and with NCCL the
    matrices travel as one int64 CUDA tensor.
    """
    mats: List = list(mats)
    rank, world = rank_and_world()
    if world == 1 or not mats:
        return
    flat = torch.from_numpy(np.concatenate([m.matrix.reshape(-1) for m in mats]))
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu().numpy()
    offset = 0
    for m in mats:
        size = m.matrix.size
        m.matrix[...] = flat[offset:offset + size].reshape(m.matrix.shape)
        offset += size


def init_from_env(cfg, what: str, cpu_collectives: bool = False, timeout=None) -> DistEnv:
    """Join torchrun's process group for a command (``wsss.eval``, ``wsss.infer``) when launched
    with several processes: each rank takes the GPU of its ``LOCAL_RANK`` (``cfg.device``
    becomes ``cuda:<local rank>``) after checking there are enough GPUs. NCCL on GPUs, gloo on
    the CPU or when ``cpu_collectives`` (a command whose only collectives are on CPU tensors).
    Returns the environment; a single process is left alone."""
    env = dist_env()
    if env.world > 1:
        from wsss.utils.device import resolve_device
        from wsss.utils.preflight import gpu_count_problem, raise_if

        device = resolve_device(cfg.device)
        if device.type == "cuda":
            raise_if(what, gpu_count_problem(device.type, env.local_world))
            torch.cuda.set_device(env.local_rank)
            cfg.device = f"cuda:{env.local_rank}"
        backend = "nccl" if device.type == "cuda" and not cpu_collectives else "gloo"
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend, **kwargs)
    return env
