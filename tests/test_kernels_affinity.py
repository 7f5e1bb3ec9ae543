"""Affinity labels and the ptc loss (SPEC §3.2) against per-pair loops."""
import pytest
import torch
from conftest import DEVICE

from wsss.kernels import affinity_labels, masked_cosine_affinity_loss, masked_cosine_affinity_loss_reference


def _labels_loops(lab, ign=255, diag=True):
    B = lab.shape[0]
    flat = lab.reshape(B, -1)
    N = flat.shape[1]
    out = torch.empty(B, N, N, dtype=torch.long)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                if flat[b, i] == ign or flat[b, j] == ign or (diag and i == j):
                    out[b, i, j] = ign
                else:
                    out[b, i, j] = int(flat[b, i] == flat[b, j])
    return out


@pytest.mark.parametrize("diag", [True, False])
def test_affinity_labels(diag):
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (2, 3, 5))
    lab[0, 1, 2] = 255
    assert torch.equal(affinity_labels(lab, ignore_diagonal=diag), _labels_loops(lab, diag=diag))


def _ptc_loops(feats, lab):
    B, D = feats.shape[:2]
    f = feats.reshape(B, D, -1)
    aff = _labels_loops(lab)
    pos_sum = neg_sum = pos_n = neg_n = 0
    for b in range(B):
        for i in range(f.shape[2]):
            for j in range(f.shape[2]):
                c = torch.cosine_similarity(f[b, :, i], f[b, :, j], dim=0, eps=1e-8).abs()
                if aff[b, i, j] == 1:
                    pos_sum, pos_n = pos_sum + c, pos_n + 1
                elif aff[b, i, j] == 0:
                    neg_sum, neg_n = neg_sum + c, neg_n + 1
    return 0.5 * (1 - pos_sum / (pos_n + 1)) + 0.5 * neg_sum / (neg_n + 1)


@pytest.mark.parametrize("shape", [(1, 4, 2, 3), (2, 5, 3, 3)])
def test_ptc_loss_matches_loops_and_gradcheck(shape):
    torch.manual_seed(0)
    feats = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    lab = torch.randint(0, 3, (shape[0], *shape[2:]))
    lab.view(-1)[0] = 255
    loss = masked_cosine_affinity_loss(feats, lab)
    torch.testing.assert_close(loss, _ptc_loops(feats, lab))
    assert torch.autograd.gradcheck(lambda f: masked_cosine_affinity_loss_reference(f, lab), (feats,))


@pytest.mark.parametrize("fill", [255, 1])
def test_ptc_loss_degenerate(fill):
    feats = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    lab = torch.full((1, 3, 3), fill, device=DEVICE)
    loss = masked_cosine_affinity_loss(feats, lab)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()
    if fill == 255:
        assert loss.item() == 0.5  # no pair: 0.5·(1 − 0) + 0.5·0


def test_ptc_validation():
    with pytest.raises(ValueError, match="labels must be \\(B,h,w\\)"):
        masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="negative"):
        masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), -torch.ones(1, 3, 3, dtype=torch.long))
