"""Confusion-matrix segmentation metrics (SPEC §4)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a K×K confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose ground truth is ``ignore_index`` are skipped. IoU_k = TP / (TP + FP + FN).
    ``miou()`` averages over the classes that occur in the ground truth of the evaluated set
    (MoRe/ToCo's ``scores``, SPEC §4): a class only predicted, never present, is left out, not
    counted as 0. ``miou(over="all")`` averages over all K classes with an absent class at 0
    (AReAM/MCTformer's ``do_python_eval``, SPEC §5).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._device_counts: Optional[torch.Tensor] = None  # (K*K + 2,) int64 on an accelerator

    def update(self, pred, gt) -> None:
        """Adds one prediction. On the CPU it is checked at once; on an accelerator the counts
        stay on the device (no host sync per image) and labels out of range are counted there
        and reported when :attr:`matrix` is next read."""
        pred = torch.as_tensor(pred).reshape(-1)
        gt = torch.as_tensor(gt).reshape(-1).to(pred.device)
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt differ in size: {pred.numel()} vs {gt.numel()}")
        pred, gt = pred.long(), gt.long()
        if pred.device.type == "cpu":
            self._update_checked(pred, gt)
        else:
            self._update_deferred(pred, gt)

    def _update_checked(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        K = self.num_classes
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= K):
            raise ValueError(f"gt holds labels outside 0..{K - 1} and {self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= K):
            raise ValueError(f"pred holds labels outside 0..{K - 1}")
        self._matrix += torch.bincount(gt * K + pred, minlength=K * K).reshape(K, K).numpy()

    def _update_deferred(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Counts on ``pred``'s device without a host sync; two extra bins count the pixels with
        bad gt / bad pred, reported by :meth:`_flush`."""
        K = self.num_classes
        keep = gt != self.ignore_index
        bad_gt = keep & ((gt < 0) | (gt >= K))
        bad_pred = keep & ~bad_gt & ((pred < 0) | (pred >= K))
        good = keep & ~bad_gt & ~bad_pred
        index = torch.where(good, gt * K + pred, torch.where(bad_gt, K * K, K * K + 1))
        if self._device_counts is None or self._device_counts.device != pred.device:
            self._flush()
            self._device_counts = torch.zeros(K * K + 2, dtype=torch.long, device=pred.device)
        self._device_counts.index_put_((index,), keep.long(), accumulate=True)

    def _flush(self) -> None:
        if self._device_counts is None:
            return
        counts = self._device_counts.cpu().numpy()
        self._device_counts = None
        K = self.num_classes
        self._matrix += counts[:K * K].reshape(K, K)
        if counts[K * K]:
            raise ValueError(f"gt holds labels outside 0..{K - 1} and {self.ignore_index}")
        if counts[K * K + 1]:
            raise ValueError(f"pred holds labels outside 0..{K - 1}")

    @property
    def matrix(self) -> np.ndarray:
        """The (K,K) int64 counts (a device-side accumulation is copied in first; one sync)."""
        self._flush()
        return self._matrix

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix[...] += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self, over: str = "gt") -> float:
        """Mean IoU over the classes present in the ground truth (``over="gt"``) or over all
        classes, absent ones counting 0 (``over="all"``)."""
        iou = np.nan_to_num(self.iou(), nan=0.0)
        if over == "all":
            return float(iou.mean())
        if over != "gt":
            raise ValueError(f"over must be 'gt' or 'all', got {over!r}")
        present = self.matrix.sum(1) > 0
        return float(iou[present].mean()) if present.any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total) if total else 0.0

    def summary(self, class_names: Optional[List[str]] = None) -> Dict:
        names = class_names or [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        return {"miou": self.miou(), "pixel_acc": self.pixel_accuracy(),
                "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)}}
