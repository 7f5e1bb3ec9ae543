"""MoRe pieces: GCR, LIR losses (CLE, UNE), class-token loss, official checkpoint round trip."""
import math

import pytest
import torch
import torch.nn.functional as F

from wsss.losses import cle_loss, token_regularization_loss, une_candidates, une_loss, une_sample, une_select
from wsss.models import GraphCategoryRepresentation, MoRe


def _gcr_loops(m, c, p):
    """SPEC §2 GCR written with explicit loops over images, classes and neighbours."""
    B, C, D = c.shape
    out = torch.empty_like(c)
    k = max(1, math.floor(m.topk_ratio * C))
    for b in range(B):
        v = torch.cat([c[b], p[b]])
        tails = [m.tail_proj(v[j]) for j in range(v.shape[0])]
        for i in range(C):
            e_h = m.head_proj(c[b, i])
            scores = torch.stack([(e_h / math.sqrt(D)) @ t for t in tails])
            top = torch.topk(scores, k).indices.tolist()
            pis = torch.softmax(scores[top], 0)
            a = []
            for j, idx in enumerate(top):
                n = tails[idx]
                r = (1 - pis[j]) * e_h + pis[j] * n
                g = torch.tanh(e_h + r)
                a.append(n.sum() * g.sum())
            beta = torch.softmax(torch.stack(a), 0)
            e_n = sum(beta[j] * tails[idx] for j, idx in enumerate(top))
            u1 = F.leaky_relu(m.linear1(0.1 * (e_h + e_n) + c[b, i]), 0.01)
            u2 = F.leaky_relu(m.linear2(0.1 * (e_h * e_n) + c[b, i]), 0.01)
            out[b, i] = m.norm(u1 + u2)
    return out


def test_gcr_hand_case_identity_weights():
    # D=2, C=2, one patch, identity projections: every quantity can be followed by hand.
    m = GraphCategoryRepresentation(2).double()
    with torch.no_grad():
        for lin in (m.head_proj, m.tail_proj, m.linear1, m.linear2):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    c = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.double)
    p = torch.tensor([[[3.0, 3.0]]], dtype=torch.double)
    # k = floor(0.5·2) = 1: class 0 scores tails (c0,c1,p)·c0/√2 = (1, 0, 3)/√2 → picks p;
    # class 1: (0, 4, 6)/√2 → picks p. One neighbour: π = β = 1, e_N = p for both classes.
    e_n = torch.tensor([3.0, 3.0], dtype=torch.double)
    expected = []
    for ci in c[0]:
        u = F.leaky_relu(0.1 * (ci + e_n) + ci, 0.01) + F.leaky_relu(0.1 * (ci * e_n) + ci, 0.01)
        expected.append(F.layer_norm(u, (2,)))
    got = m(c, p)
    torch.testing.assert_close(got[0], torch.stack(expected))


@pytest.mark.parametrize("B,C,N,D", [(1, 3, 4, 8), (2, 5, 7, 6), (1, 1, 3, 4)])
def test_gcr_matches_loops_and_detaches_patches(B, C, N, D):
    torch.manual_seed(0)
    m = GraphCategoryRepresentation(D).double()
    c = torch.randn(B, C, D, dtype=torch.double, requires_grad=True)
    p = torch.randn(B, N, D, dtype=torch.double, requires_grad=True)
    out = m(c, p)
    torch.testing.assert_close(out, _gcr_loops(m, c.detach(), p.detach()))
    out.sum().backward()
    assert p.grad is None and c.grad is not None
    # every parameter receives a gradient (DDP needs that); the official unused _fc1 is not one
    assert set(dict(m.named_parameters())) == {f"{n}.{w}" for n in ("head_proj", "tail_proj", "linear1", "linear2",
                                                                    "norm") for w in ("weight", "bias")}
    assert all(q.grad is not None for q in m.parameters())


def test_token_regularization_loss_formula():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    loss = token_regularization_loss(t, 0.07)
    expected = 0
    for b in range(2):
        n = t[b] / t[b].norm(dim=-1, keepdim=True)
        logits = n @ n.T / 0.07
        for i in range(4):
            expected = expected - torch.log_softmax(logits[i], 0)[i]
    torch.testing.assert_close(loss.double(), expected / 8, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(lambda x: token_regularization_loss(x, 0.5), (t,))


def _cle_formula(tokens, feats, label, y, temp):
    B, C, _ = tokens.shape
    total = 0
    for b in range(B):
        f = feats[b].flatten(1)
        for c in range(C):
            if y[b, c] == 0:
                continue
            t = tokens[b, c] / tokens[b, c].norm()
            e = torch.exp(t @ f / temp)
            ell = -torch.log(e / (e.sum() + 1e-4))
            m = (label[b].flatten() == c + 1).double()
            total = total + (m * ell).sum() / (m.sum() + 1e-4)
    return total / B


def test_cle_loss_formula_and_gradient():
    torch.manual_seed(0)
    tokens = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    feats = torch.randn(2, 5, 4, 3, dtype=torch.double, requires_grad=True)
    label = torch.randint(0, 4, (2, 4, 3))
    label[0, 0, 0] = 255
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.double)
    loss = cle_loss(tokens, feats, label, y, 0.5)
    expected = _cle_formula(tokens, feats, label, y, 0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-8)
    g1, = torch.autograd.grad(loss, tokens)
    g2, = torch.autograd.grad(expected, tokens)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-7)
    feats.grad = None
    cle_loss(tokens, feats, label, y).backward()
    assert feats.grad is None  # features are detached inside


def test_cle_large_features_stay_finite():
    tokens = torch.randn(1, 2, 4, requires_grad=True)
    feats = torch.randn(1, 4, 3, 3) * 1e4
    loss = cle_loss(tokens, feats, torch.ones(1, 3, 3, dtype=torch.long), torch.tensor([[1.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tokens.grad).all()


def _roi(label):
    roi = torch.zeros_like(label, dtype=torch.float)
    roi[(label >= 1) & (label != 255)] = 2
    roi[label == 255] = 1
    return roi


def test_une_candidates_match_the_rule():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 13, 11))
    label[torch.rand(label.shape) < 0.3] = 255
    kept, fg, (hi, wi) = une_candidates(label)
    assert (hi, wi) == (7, 5)
    for b in range(2):
        roi = _roi(label[b])
        inner = roi[3:10, 3:8]
        for i in range(hi):
            for j in range(wi):
                expected = bool(inner[i, j] == 1 and roi[i:i + 6, j:j + 6].mean() >= 1.2)
                assert bool(kept[b, i, j]) == expected
                assert bool(fg[b, i, j]) == bool(inner[i, j] == 2)


def test_une_select_sampling_rules():
    h = w = 14
    many = torch.full((1, h, w), 255)
    many[0, :, :7] = 1  # ignore cells next to foreground: lots of kept candidates
    kept, _, (hi, wi) = une_candidates(many)
    assert kept.sum() > 8
    g = torch.Generator().manual_seed(0)
    (sel,) = une_select(many, g)
    assert len(sel) == 8 and len(set(sel.tolist())) == 8
    allowed = {int(i) * w + int(j) for i, j in torch.nonzero(kept[0])}  # relative (i,j) used as absolute
    assert set(sel.tolist()) <= allowed

    few = torch.ones(1, h, w, dtype=torch.long)  # all foreground, nothing uncertain
    few[0, 6, 6] = 255
    kept, fg, _ = une_candidates(few)
    (sel,) = une_select(few, torch.Generator().manual_seed(1))
    n_kept = int(kept.sum())
    assert n_kept == 1 and len(sel) == n_kept + (8 - n_kept) // 4

    tiny = torch.full((1, 6, 6), 255)  # no inner region at all
    (sel,) = une_select(tiny, torch.Generator().manual_seed(0))
    assert len(sel) == 0


def test_une_select_extras_from_the_inner_foreground_else_the_whole_inner_region():
    h = w = 14
    few = torch.ones(1, h, w, dtype=torch.long)  # all foreground, one uncertain cell: 1 kept, (8-1)//4 = 1 extra
    few[0, 6, 6] = 255
    kept, fg, (hi, wi) = une_candidates(few)
    assert torch.nonzero(kept[0]).tolist() == [[3, 3]]
    foreground = {int(i) * w + int(j) for i, j in torch.nonzero(fg[0])}
    picks = set()
    for seed in range(20):
        (sel,) = une_select(few, torch.Generator().manual_seed(seed))
        assert sel[0].item() == 3 * w + 3 and sel[1].item() in foreground  # the kept cell, then a foreground one
        picks.add(sel[1].item())
    assert len(picks) > 1  # drawn at random

    background = torch.zeros(1, h, w, dtype=torch.long)  # nothing kept, no foreground: 2 from the whole inner region
    (sel,) = une_select(background, torch.Generator().manual_seed(3))
    inner = {i * w + j for i in range(hi) for j in range(wi)}
    assert len(sel) == 2 and len(set(sel.tolist())) == 2 and set(sel.tolist()) <= inner


def test_une_sample_is_batched_and_seeded():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (3, 14, 12))
    label[torch.rand(label.shape) < 0.4] = 255
    index, valid = une_sample(label, torch.Generator().manual_seed(7))
    again, valid2 = une_sample(label, torch.Generator().manual_seed(7))
    assert index.shape == valid.shape == (3, 10) and torch.equal(index, again) and torch.equal(valid, valid2)
    kept, _, _ = une_candidates(label)
    # per image: min(kept, 8) samples from the kept cells, then (8 - kept)//4 extras when kept <= 8
    for b in range(3):
        k = int(kept[b].sum())
        assert int(valid[b, :8].sum()) == min(k, 8)
        assert int(valid[b, 8:].sum()) == (0 if k > 8 else (8 - k) // 4)


def test_une_loss_formula_and_seeded():
    torch.manual_seed(0)
    tokens = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    feats = torch.randn(2, 6, 14, 14, dtype=torch.double, requires_grad=True)
    label = torch.randint(0, 4, (2, 14, 14))
    label[:, 4:10, 4:10] = 255
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.double)
    loss = une_loss(tokens, feats, label, y, generator=torch.Generator().manual_seed(5))
    chosen = une_select(label, torch.Generator().manual_seed(5))
    terms = []
    for b, idx in enumerate(chosen):
        f = feats[b].flatten(1)
        t = tokens[b].detach() / tokens[b].detach().norm(dim=-1, keepdim=True)
        for n in idx.tolist():
            u = f[:, n] / f[:, n].norm()
            s = (t @ u).abs()
            terms.append(0.5 * (1 - (s * y[b]).sum() / (y[b].sum() + 1)) + 0.5 * (s * (1 - y[b])).sum() / ((1 - y[b]).sum() + 1))
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean())
    again = une_loss(tokens, feats, label, y, generator=torch.Generator().manual_seed(5))
    assert loss.item() == again.item()
    loss.backward()
    assert tokens.grad is None and torch.isfinite(feats.grad).all()


@pytest.mark.parametrize("fill", [0, 255])
def test_lir_losses_degenerate_are_zero_and_connected(fill):
    tokens = torch.randn(1, 2, 4, requires_grad=True)
    feats = torch.randn(1, 4, 8, 8, requires_grad=True)
    label = torch.full((1, 8, 8), fill)
    loss = cle_loss(tokens, feats, label, torch.zeros(1, 2))  # no class present
    assert loss.item() == 0.0 and loss.requires_grad
    # UNE still samples (8 - 0)//4 random inner tokens when nothing is uncertain (official rule)
    loss = une_loss(tokens, feats, label, torch.ones(1, 2))
    assert torch.isfinite(loss) and loss.requires_grad
    # a map without an inner region selects nothing: zero, still connected
    loss = une_loss(tokens, feats[..., :6, :6], label[..., :6, :6], torch.ones(1, 2))
    assert loss.item() == 0.0 and loss.requires_grad


def test_official_state_dict_round_trip():
    torch.manual_seed(0)
    m = MoRe(5, backbone="custom", embed_dim=64, depth=3, num_heads=2, patch_size=8, img_size=32,
             decoder_dim=32).eval()
    official = m.official_state_dict()
    assert official["encoder.cls_token"].shape == (1, 4 + 5, 64)
    assert {"decoder.conv6.weight", "classifier.weight", "aux_classifier.weight", "graph_layer._fc1.0.weight",
            "encoder.head.weight"} <= set(official)
    loaded = MoRe.from_official_state_dict({"module." + k: v for k, v in official.items()}, num_heads=2).eval()
    x = torch.randn(2, 3, 48, 32)
    a, b = m(x), loaded(x)
    for field in a.__dataclass_fields__:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(m.lam(x), loaded.lam(x))
    with pytest.raises(ValueError, match="missing 'encoder.cls_token'"):
        MoRe.from_official_state_dict({"classifier.weight": torch.zeros(5, 64, 1, 1)})


def test_schedule_switches_at_configured_iterations():
    from wsss.config import load_config
    from wsss.methods import Schedule

    # "iterations <= 2 000 without seg/reg" (SPEC §3.6): the first iteration with them is 2 001
    s = Schedule.from_config(load_config(None, ["train.max_iters=20000"]))
    assert (s.loss_starts["seg"], s.loss_starts["reg"], s.loss_starts["ptc"], s.cam2mask) == (2001, 2001, 0, 10000)
    assert not s.started("seg", 2000) and s.started("seg", 2001) and s.started("ptc", 0)
    s = Schedule.from_config(load_config(None, ["train.max_iters=100", "loss.starts.seg=0.25", "train.cam2mask=0.6"]))
    assert (s.loss_starts["seg"], s.cam2mask) == (26, 60)


def test_eval_loads_an_official_checkpoint_file(tmp_path):
    from wsss.config import load_config
    from wsss.eval.evaluate import load_model

    torch.manual_seed(0)
    m = MoRe(3, backbone="custom", embed_dim=64, depth=3, num_heads=1, patch_size=8, img_size=32,
             decoder_dim=16).eval()
    path = tmp_path / "official.pth"
    torch.save({"model": {"module." + k: v for k, v in m.official_state_dict().items()}}, path)
    cfg = load_config(None, ["model.num_heads=1", "device=cpu"])
    loaded, C = load_model(cfg, path, torch.device("cpu"))
    assert C == 3
    x = torch.randn(1, 3, 32, 40)
    assert torch.equal(loaded(x).seg_logits, m(x).seg_logits)
