import pytest
import torch
import torch.nn.functional as F

from wsss.losses import classification_loss, seg_loss


def _seg_loss_formula(logits, label):
    """Direct formula: per-pixel CE averaged separately over bg and fg pixels."""
    logp = F.log_softmax(logits.double(), dim=1)
    bg_terms, fg_terms = [], []
    B, K, H, W = logits.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                t = int(label[b, i, j])
                if t == 255:
                    continue
                (bg_terms if t == 0 else fg_terms).append(-logp[b, t, i, j])
    bg = torch.stack(bg_terms).sum() / (len(bg_terms) + 1e-6) if bg_terms else torch.zeros((), dtype=torch.double)
    fg = torch.stack(fg_terms).sum() / (len(fg_terms) + 1e-6) if fg_terms else torch.zeros((), dtype=torch.double)
    return 0.5 * (bg + fg)


@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (2, 4, 7, 6)])
def test_seg_loss_matches_formula(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    label = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    label[torch.rand(label.shape) < 0.2] = 255
    loss = seg_loss(logits, label)
    torch.testing.assert_close(loss.double(), _seg_loss_formula(logits, label), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fill", [255, 0, 1])
def test_seg_loss_degenerate_is_finite_and_connected(fill):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.full((2, 4, 4), fill)
    loss = seg_loss(logits, label)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    if fill == 255:
        assert loss.item() == 0.0


def test_seg_loss_validation():
    with pytest.raises(ValueError, match="outside 0..2"):
        seg_loss(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 5], [1, 2]]]))
    with pytest.raises(ValueError, match="must match"):
        seg_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        seg_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2))


def test_classification_loss():
    logits = torch.tensor([[2.0, -1.0]])
    y = torch.tensor([[1.0, 0.0]])
    expected = 0.5 * (F.softplus(-logits[0, 0]) + F.softplus(logits[0, 1]))
    torch.testing.assert_close(classification_loss(logits, y), expected)
    with pytest.raises(ValueError, match="differ"):
        classification_loss(logits, torch.ones(1, 3))
