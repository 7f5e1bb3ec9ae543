import numpy as np
import pytest
import torch

from wsss.eval.metrics import ConfusionMatrix


def _independent_miou(preds, gts, K, ignore=255):
    """Count intersections and unions per class directly, no confusion matrix."""
    inter, union = np.zeros(K), np.zeros(K)
    for p, g in zip(preds, gts):
        keep = g != ignore
        p, g = p[keep], g[keep]
        for k in range(K):
            inter[k] += np.logical_and(p == k, g == k).sum()
            union[k] += np.logical_or(p == k, g == k).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    in_gt = np.array([any((g[g != ignore] == k).any() for g in gts) for k in range(K)])
    return np.nan_to_num(iou)[in_gt].mean(), iou


@pytest.mark.parametrize("K", [2, 5, 21])
def test_miou_matches_independent_count(K):
    rng = np.random.default_rng(K)
    preds, gts = [], []
    mat = ConfusionMatrix(K)
    for _ in range(4):
        h, w = rng.integers(5, 40, size=2)
        g = rng.integers(0, K, size=(h, w))
        g[rng.random((h, w)) < 0.1] = 255
        p = np.where(rng.random((h, w)) < 0.6, np.where(g == 255, 0, g), rng.integers(0, K, size=(h, w)))
        preds.append(p)
        gts.append(g)
        mat.update(torch.from_numpy(p), torch.from_numpy(g))
    miou, iou = _independent_miou(preds, gts, K)
    assert mat.miou() == pytest.approx(miou, abs=1e-12)
    np.testing.assert_allclose(mat.iou(), iou, equal_nan=True)
    acc = sum(((p == g) & (g != 255)).sum() for p, g in zip(preds, gts)) / sum((g != 255).sum() for g in gts)
    assert mat.pixel_accuracy() == pytest.approx(acc)


def test_perfect_and_all_background():
    g = torch.tensor([[0, 1, 2], [2, 255, 0]])
    mat = ConfusionMatrix(3)
    mat.update(g.clamp(max=2), g)
    assert mat.miou() == 1.0
    bg = ConfusionMatrix(3)
    bg.update(torch.zeros_like(g), g)
    # background IoU = 2 / 5 (two bg pixels predicted right, five predicted bg), others 0
    assert bg.miou() == pytest.approx((2 / 5) / 3)


def test_bad_labels_raise():
    mat = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="gt holds labels outside"):
        mat.update(torch.zeros(2), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="differ in size"):
        mat.update(torch.zeros(3), torch.zeros(2))


def test_miou_averages_over_ground_truth_classes_only():
    """SPEC §4 (official ``scores``): a class only predicted is skipped, not counted as 0;
    SPEC §5 (AReAM's ``do_python_eval``): all classes, absent ones 0."""
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])  # class 2 predicted once, never in the ground truth
    mat = ConfusionMatrix(4)
    mat.update(pred, gt)
    # IoU: bg 1/2, class 1 1.0, class 2 0/1 (predicted only), class 3 absent everywhere
    assert mat.miou() == pytest.approx((0.5 + 1.0) / 2)
    assert mat.miou(over="all") == pytest.approx((0.5 + 1.0 + 0 + 0) / 4)
    with pytest.raises(ValueError, match="over must be"):
        mat.miou(over="present")
