"""Periodic validation (SPEC §4): the method's validation columns over the val split, sharded over
the ranks with the confusion matrices summed."""
from __future__ import annotations

from typing import Dict

import torch

from wsss.methods import get_method
from wsss.utils.distributed import all_reduce_confusion, shard

from .engine import stream
from .metrics import ConfusionMatrix


@torch.no_grad()
def quick_validate(model, val_ds, cfg, device, max_images: int = 0) -> Dict[str, float]:
    """mIoU of each validation column of ``cfg.model.method`` (MoRe: CAM, aux CAM, Score Map,
    Fused, Seg; AReAM: CAM, AReAM CAM) on the first ``max_images`` val images (0 = all), each
    resized to the crop size by the data set and scored at the label size.

    Under torch.distributed every rank validates its strided shard and the confusion matrices
    are summed, so all ranks return the scores one process would (SPEC §4); every rank must
    call it."""
    method = get_method(cfg.model.method)
    K = val_ds.num_classes + 1
    mats: Dict[str, ConfusionMatrix] = {}
    n = len(val_ds) if not max_images else min(max_images, len(val_ds))

    def predict(batch):
        return [method.validate(model, item, cfg, device) for item in batch]

    def consume(item, cols):
        for col, pred in cols.items():
            mats.setdefault(col, ConfusionMatrix(K)).update(pred, item["label"])

    stream(val_ds, shard(n), predict, consume, cfg, device, crf=False)
    if not mats:  # a rank without images still takes part in the reduction
        probe = val_ds[0]
        mats = {col: ConfusionMatrix(K) for col in method.validate(model, probe, cfg, device)}
    all_reduce_confusion(mats[k] for k in sorted(mats))
    return {k: mats[k].miou() for k in sorted(mats)}


__all__ = ["quick_validate"]
