"""AReAM (SPEC §5): entropy weights, the affinity loss against its formula, the CAM
re-activation against a direct einsum, the backbone's q/k, and short training runs."""
import json
import math

import pytest
import torch

from wsss.cam import aream_refined_cam, class_attention_gate, layer_entropy_bits, normalize_entropy
from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.models import AReAM

from test_train import TINY

AREAM = TINY + ["model.method=aream", "aream.layer_index=1", "aream.aff_start=0.5", "aream.scales=[1.0]",
                "optim.schedule=cosine", "eval.layerwise=true"]


def _softmax_attn(q, k, scale):
    return (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)  # (..., T, T)


def test_normalize_entropy_hand_case():
    torch.testing.assert_close(normalize_entropy(torch.tensor([3.0, 1.0, 2.0, 5.0])),
                               torch.tensor([0.5, 0.0, 0.25, 1.0]))
    # all layers equal: zeros, not 0/0
    assert torch.equal(normalize_entropy(torch.full((4,), 2.5)), torch.zeros(4))


def test_layer_entropy_hand_cases():
    B, C, h, w = 1, 2, 2, 3
    N, T = h * w, C + h * w
    cam = torch.rand(B, C, h, w)
    y = torch.tensor([[1.0, 0.0]])
    # layer 0: q = 0 -> uniform attention -> every position gets the same value -> log2(N) bits
    q0, k0 = torch.zeros(B, 1, T, T), torch.randn(B, 1, T, T)
    # layer 1: logits 60·I -> attention ≈ identity -> the normalised CAM of the present class itself
    q1, k1 = 60.0 * torch.eye(T).expand(B, 1, T, T), torch.eye(T).expand(B, 1, T, T)
    q, k = torch.stack([q0, q1]), torch.stack([k0, k1])
    ent = layer_entropy_bits(cam, q, k, y, scale=1.0, impl="reference")
    assert ent.shape == (2, 1)
    assert ent[0, 0].item() == pytest.approx(math.log2(N), abs=1e-5)
    m = cam[0, 0].flatten()
    m = (m - m.min()) / (m.max() - m.min() + 1e-5)  # the per-map normalisation of SPEC notation
    p = m.double().softmax(0)
    assert ent[1, 0].item() == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-4)


def test_refined_cam_equals_direct_einsum():
    torch.manual_seed(0)
    L, B, Hd, C, h, w, dh = 4, 2, 3, 3, 3, 5, 8
    T = C + h * w
    q, k = torch.randn(L, B, Hd, T, dh), torch.randn(L, B, Hd, T, dh)
    cam = torch.rand(B, C, h, w)
    weights = torch.tensor([0.2, 1.0, 0.5, 0.7])
    scale = dh ** -0.5
    A = _softmax_attn(q, k, scale).mean(dim=2)  # (L,B,T,T) head mean
    gate = A[:, :, :C, C:].mean(dim=0).reshape(B, C, h, w)
    torch.testing.assert_close(class_attention_gate(q, k, C, (h, w), scale), gate)
    li = 3
    aff = (weights[:li, None, None, None] * A[:li, :, C:, C:]).sum(0) / li  # (B,N,N)
    direct = torch.einsum("bmn,bcn->bcm", aff, (cam * gate).flatten(2)).reshape(B, C, h, w)
    got = aream_refined_cam(cam, q, k, li, weights, scale, impl="reference")
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer_index"):
        aream_refined_cam(cam, q, k, 0, weights, scale)


def test_backbone_qk_matches_logits_and_fused_output():
    torch.manual_seed(0)
    model = AReAM(3, backbone="custom", embed_dim=48, depth=3, num_heads=3, patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 40, 24)
    bb = model.backbone
    ref = bb(x, aux_layer=-1, attn_layers=(0, 1, 2))
    got = bb(x, aux_layer=-1, qk_layers=(0, 1, 2))
    plain = bb(x, aux_layer=-1)
    for i in range(3):
        q, k = got.qk[i]
        torch.testing.assert_close(q @ k.transpose(-1, -2), ref.attn_logits[i], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.patches, ref.patches, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.patches, ref.patches, rtol=1e-4, atol=1e-5)
    out = model(x)
    # no final LayerNorm: the class score reads the residual stream (a LayerNorm output's mean is constant)
    assert out.cls_logits.shape == (2, 3) and out.cls_logits.std() > 0
    torch.testing.assert_close(out.patch_logits, out.cam.mean(dim=(-2, -1)))


def test_affinity_loss_equals_the_formula(monkeypatch, tmp_path):
    """The training objective's ``aff`` term (from q, k) equals SPEC §5's formula evaluated on
    materialised head-mean logits, in value and in gradient."""
    from wsss.methods import Schedule
    from wsss.methods.aream import AReAMLosses

    torch.manual_seed(0)
    cfg = load_config(None, AREAM + ["aream.entropy=none", "aream.w_aff=0.1", "data.root=unused"])
    model = AReAM(3, backbone="custom", embed_dim=48, depth=3, num_heads=3, patch_size=8, img_size=64)
    B, H = 2, 32
    images = torch.randn(B, 3, H, H)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    label = torch.randint(0, 4, (B, H, H))
    label[0, :8] = 255
    loss_fn = AReAMLosses(cfg, "cpu")
    monkeypatch.setattr(loss_fn, "pseudo_labels", lambda *a, **kw: label.clone())
    batch = {"image": images, "cls_label": y, "valid": torch.ones(B, H, H, dtype=torch.bool)}
    losses = loss_fn(model, batch, 10, cfg, Schedule(0, 0, aff_start=0), torch.autocast("cpu", enabled=False))
    got = losses["aff"]
    grads = torch.autograd.grad(got, [p for p in model.backbone.parameters()], allow_unused=True)

    out = model.backbone(images, aux_layer=-1, attn_layers=(1, 2))
    tok = label[:, ::8, ::8]  # nearest down-sampling by the patch size
    C, scale = 3, model.attn_scale
    lab = tok.flatten(1)
    valid = lab != 255
    same = lab[:, :, None] == lab[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    pos, neg = (same & both).float(), (~same & both).float()  # the diagonal is not ignored (public code)
    terms = []
    for i in (1, 2):
        p = torch.sigmoid(out.attn_logits[i][:, :, C:, C:].mean(dim=1) * scale)
        terms.append(0.5 * (pos * (1 - p)).sum() / (pos.sum() + 1) + 0.5 * (neg * p).sum() / (neg.sum() + 1))
    expected = 0.1 * torch.stack(terms).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    exp_grads = torch.autograd.grad(expected, [p for p in model.backbone.parameters()], allow_unused=True)
    for g, e in zip(grads, exp_grads):
        if e is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)


def test_entropy_modes_give_weights():
    model = AReAM(2, backbone="custom", embed_dim=24, depth=4, num_heads=2, patch_size=8, img_size=32)
    r, l = model.layer_weights("none")
    assert torch.equal(r, torch.ones(4)) and torch.equal(l, torch.ones(4))
    with pytest.raises(RuntimeError, match="no layer entropies"):
        model.layer_weights("online")
    model.update_layer_entropy(torch.tensor([1.0, 2.0, 3.0, 5.0]), momentum=0.9)
    model.update_layer_entropy(torch.tensor([1.0, 2.0, 3.0, 15.0]), momentum=0.9)
    torch.testing.assert_close(model.layer_entropy, torch.tensor([1.0, 2.0, 3.0, 6.0]))
    r, l = model.layer_weights("online")
    torch.testing.assert_close(l, torch.tensor([0.0, 0.2, 0.4, 1.0]))
    torch.testing.assert_close(r, 1 - l)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=3, num_train=8, num_val=2, size=64,
                                  num_classes=3)


def test_training_offline_entropy_and_evaluation(data_root, tmp_path):
    """Classification run -> offline entropy file -> AReAM run with it -> evaluation with the
    layer-wise table and plot; then the online estimate."""
    from wsss.eval.evaluate import evaluate
    from wsss.tools.layer_entropy import main as entropy_main
    from wsss.train.loop import train

    base = AREAM + [f"data.root={data_root}", "train.max_iters=2", "eval.train_images=2"]
    cls_cfg = load_config(None, base + [f"run_dir={tmp_path / 'cls'}", "aream.w_aff=0", "aream.entropy=none"])
    ckpt = train(cls_cfg)
    ent_file = tmp_path / "entropy.json"
    cfg_file = tmp_path / "cls" / "config.yaml"
    assert entropy_main(["--cfg", str(cfg_file), "--ckpt", str(ckpt), "--out", str(ent_file),
                         "--max-images", "3"]) == 0
    record = json.loads(ent_file.read_text())
    assert len(record["entropy_bits"]) == 3 and record["images"] == 3
    assert all(0 < v <= math.log2(64 // 8 * 64 // 8) + 1e-6 for v in record["entropy_bits"])

    from wsss.tools.affinity import main as affinity_main

    assert affinity_main(["--cfg", str(cfg_file), "--ckpt", str(ckpt), "--max-images", "2",
                          f"run_dir={tmp_path / 'aff'}"]) == 0
    stats = json.loads((tmp_path / "aff" / "affinity.json").read_text())
    assert stats["images"] == 2 and len(stats["statistics"]["object_share"]) == 3
    assert all(0 <= v <= 1 for v in stats["statistics"]["object_share"] + stats["statistics"]["sink"])
    assert "| 2 |" in (tmp_path / "aff" / "affinity.md").read_text()
    assert set(stats["reactivation"]) == {"gated CAM, no re-activation", "model affinity, layers 0-0",
                                          *(f"reference affinity, own-class share {s:g}"
                                            for s in (0.25, 0.5, 0.75, 0.9, 1.0))}
    assert all(0 <= v <= 1 for v in stats["reactivation"].values())
    with pytest.raises(SystemExit) as e:
        affinity_main(["--cfg", str(cfg_file), "--ckpt", str(tmp_path / "nope.pt")])
    assert e.value.code == 2

    cfg = load_config(None, base + [f"run_dir={tmp_path / 'aream'}", "aream.entropy=offline",
                                    f"aream.entropy_file={ent_file}", "train.max_iters=3"])
    ckpt = train(cfg)
    state = torch.load(ckpt, weights_only=True)["model"]
    torch.testing.assert_close(state["layer_entropy"], torch.tensor(record["entropy_bits"]))
    result = evaluate(cfg, ckpt)
    names = [r["result"] for r in result["table"]]
    assert names[:5] == ["official: AReAM CAM pseudo labels (train)", "CAM pseudo labels (train)",
                         "gated CAM pseudo labels (train)", "AReAM CAM pseudo labels (train)",
                         "AReAM CAM + PAR pseudo labels (train)"]
    assert [r["protocol"] for r in result["table"]][:2] == ["official", "analysis"]
    assert sorted(n for n, _ in result["series"]["layerwise"]) == ["aggregated", "layer 0", "layer 1", "layer 2"]
    assert (tmp_path / "aream" / "eval" / "layerwise.png").stat().st_size > 1000

    online = load_config(None, base + [f"run_dir={tmp_path / 'online'}", "aream.entropy=online",
                                       "train.max_iters=4"])
    state = torch.load(train(online), weights_only=True)["model"]
    assert int(state["entropy_updates"]) == 2  # aff_start 0.5 of 4 iterations -> steps 2 and 3 (0-based)
    assert torch.isfinite(state["layer_entropy"]).all() and state["layer_entropy"].min() > 0


def test_config_errors(tmp_path):
    from wsss.methods import get_method

    build_loss_fn = get_method("aream").objective

    with pytest.raises(ValueError, match="entropy_file"):
        build_loss_fn(load_config(None, AREAM + ["aream.entropy=offline"]), "cpu")
    with pytest.raises(ValueError, match="score_l"):
        build_loss_fn(load_config(None, AREAM + ["aream.entropy=none", "aream.score_l=0.6"]), "cpu")
    model = AReAM(2, backbone="custom", embed_dim=24, depth=3, num_heads=2, patch_size=8, img_size=32)
    with pytest.raises(FileNotFoundError, match="entropy_file not found"):
        model.load_layer_entropy(tmp_path / "missing.json")
    (tmp_path / "short.json").write_text(json.dumps({"entropy_bits": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="expected 3"):
        model.load_layer_entropy(tmp_path / "short.json")


def test_pretrained_deit_loads_without_final_norm(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    path = tmp_path / "deit.pth"
    torch.save(vit.state_dict(), path)
    model = AReAM(3, backbone="custom", embed_dim=24, depth=2, num_heads=2, patch_size=8, img_size=32,
                  pretrained=str(path))
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(model.backbone.cls_token, vit.cls_token.expand(1, 3, 24))


def test_ablation_three_rows_and_reuse(data_root, tmp_path, monkeypatch):
    import yaml

    from wsss.tools import ablation

    cfg_file = tmp_path / "tiny_aream.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"method": "aream"}}))
    overrides = AREAM + [f"data.root={data_root}", f"run_dir={tmp_path / 'run'}", "train.max_iters=2",
                         "aream.entropy=online", "eval.train_images=1"]
    table = ablation.run_ablation(str(cfg_file), overrides)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "pseudo labels" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[:3]] == list(ablation.AREAM_VARIANTS)
    assert (tmp_path / "run" / "ablation" / "layerwise.png").is_file()
    share = table.split("own class, per layer")[1].splitlines()
    assert share[2] == "| layer | " + " | ".join(ablation.AREAM_VARIANTS) + " |"
    assert [line.split(" | ")[0] for line in share[4:7]] == ["| 0", "| 1", "| 2"]
    assert "| reference affinity, own-class share 1 |" in table

    def no_training(cfg):
        raise AssertionError("--reuse must not train a finished variant again")

    monkeypatch.setattr("wsss.train.loop.train", no_training)
    assert ablation.run_ablation(str(cfg_file), overrides, reuse=True).splitlines()[4:7] == table.splitlines()[4:7]


def test_affinity_statistics_hand_case():
    """wsss.cam.affinity_statistics against the docstring's definitions, computed query by query:
    a 2×2 grid behind one other token, two heads (the head mean of the softmaxes), one ignored
    patch, one background query."""
    from wsss.cam import affinity_statistics

    T, P = 5, 1
    labels = torch.tensor([[[1, 1], [0, 2]]])  # flat: 1 1 0 2 ; patch (1,0) background
    labels_ign = torch.tensor([[[1, 255], [0, 2]]])
    torch.manual_seed(0)
    logits = torch.randn(2, T, T) * 2  # two heads' attention logits
    # with k = I and scale 1, q·kᵀ = q: q holds the logits themselves
    q = logits[None, None]  # (L=1,B=1,Hd=2,T,dh=T)
    k = torch.eye(T).expand(1, 1, 2, T, T).contiguous()
    A = logits.softmax(dim=-1).mean(dim=0)[P:, P:]  # (N,N) head-mean patch block
    pos = [(0, 0), (0, 1), (1, 0), (1, 1)]

    def expected(lab, ignore=255):
        lab = lab.flatten().tolist()
        shares, chances, masses, dists, tops = [], [], [], [], []
        for m in range(4):
            row = A[m].tolist()
            masses.append(sum(row))
            dists.append(sum(r * math.dist(pos[m], pos[n]) for n, r in enumerate(row)) / sum(row))
            tops.append(max(range(4), key=lambda n: row[n]))
            if lab[m] in (0, ignore):
                continue
            valid = [n for n in range(4) if lab[n] != ignore]
            shares.append(sum(row[n] for n in valid if lab[n] == lab[m]) / sum(row[n] for n in valid))
            chances.append(sum(1 for n in valid if lab[n] == lab[m]) / len(valid))
        common = max(tops.count(t) for t in tops) / 4
        uniform = sum(math.dist(a, b) for a in pos for b in pos) / 16
        return dict(object_share=sum(shares) / len(shares), object_chance=sum(chances) / len(chances),
                    patch_mass=sum(masses) / 4, distance=sum(dists) / 4, sink=common, distance_uniform=uniform)

    for lab in (labels, labels_ign):
        got = affinity_statistics(q, k, lab, scale=1.0)
        for key, value in expected(lab).items():
            assert got[key].shape == (1,)
            assert got[key].item() == pytest.approx(value, abs=1e-6), key
    # labels without the batch dimension are refused
    with pytest.raises(ValueError, match="labels"):
        affinity_statistics(q, k, labels[0])


def test_reference_affinity_has_the_share_it_is_built_with():
    """The affinity tool's yardstick: rows sum to 1 and ``affinity_statistics`` reads back the
    share; token labels are each token's majority label."""
    from wsss.cam import affinity_statistics
    from wsss.tools.affinity import reference_affinity, token_labels

    label = torch.zeros(8, 8, dtype=torch.long)
    label[:4, :4] = 1  # token (0,0): all class 1
    label[:3, 4:] = 2  # token (0,1): 12 of 16 pixels class 2
    label[4:, :4] = 255  # token (1,0): ignored
    label[4, 4] = 3  # token (1,1): 1 of 16 pixels class 3 -> background
    tok = token_labels(label, 2, num_classes=4)
    assert tok.tolist() == [[[1, 2], [255, 0]]]
    labels = torch.tensor([[[1, 1, 0], [2, 0, 255]]])  # (1,2,3)
    for share in (0.25, 0.6, 1.0):
        A = reference_affinity(labels, share)
        torch.testing.assert_close(A.sum(-1), torch.ones(1, 6))
        assert A[0, :, 5].abs().max() == 0  # the ignored patch gets nothing
        # as logits of a 1-token-prefix attention with k = I: softmax(log A) = A
        logits = torch.cat([torch.full((6, 1), -1e4), A[0].clamp(min=1e-30).log()], dim=1)
        logits = torch.cat([torch.zeros(1, 7), logits])[None, None, None]  # (L,B,Hd,T,T)
        stats = affinity_statistics(logits, torch.eye(7).expand(1, 1, 1, 7, 7).contiguous(), labels, scale=1.0)
        assert stats["object_share"].item() == pytest.approx(share, abs=1e-5)
