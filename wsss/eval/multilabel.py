"""Multi-label classification metrics: the per-image mAP that AReAM / MCTformer validate with
every epoch (SPEC §5: the mean over images with at least one label of sklearn's
``average_precision_score(y, σ(class logits))``), sharded over ranks."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from wsss.utils.distributed import rank_and_world, shard


def average_precision(y_true, scores) -> float:
    """Average precision of one binary ranking, as sklearn's ``average_precision_score``:
    ``Σ_k (R_k − R_{k−1}) · P_k`` over the distinct score thresholds in decreasing order (tied
    scores form one threshold), ``R_0 = 0``. ``y_true`` needs at least one positive."""
    y = np.asarray(y_true, dtype=np.float64).ravel() > 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.size} vs {s.size}")
    if not y.any():
        raise ValueError("y_true has no positive label: average precision is undefined")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of tied scores
    tps = np.cumsum(y)[ends]
    precision = tps / (ends + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@torch.no_grad()
def mean_image_average_precision(predict: Callable, dataset, transform: Callable, device, max_images: int = 0,
                                 batch_size: int = 16) -> float:
    """Mean over the images with ≥ 1 label of :func:`average_precision` (labels, σ(logits)).

    ``predict`` maps a normalised batch (B,3,S,S) to class logits (B,C); ``transform`` maps the
    item's original image (a PIL image) to (3,S,S). Each rank scores its strided shard of the
    first ``max_images`` images (0 = all); the sums are reduced, so every rank returns the value
    one process would (every rank must call it)."""
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    total, count = 0.0, 0
    indices = list(shard(n))
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        images = torch.stack([transform(Image.fromarray(it["image_uint8"].numpy())) for it in items]).to(device)
        probs = torch.sigmoid(predict(images).float()).cpu().numpy()
        for it, p in zip(items, probs):
            y = it["cls_label"].numpy()
            if y.sum() > 0:
                total += average_precision(y, p)
                count += 1
    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    _, world = rank_and_world()
    if world > 1:
        if dist.get_backend() == "nccl":
            sums = sums.cuda()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = sums.cpu()
    return float(sums[0] / sums[1]) if sums[1] > 0 else 0.0
