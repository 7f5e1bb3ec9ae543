"""The evaluation protocols (SPEC §4, §5) against expectations computed here from the SPEC text,
on stub networks whose outputs are known in closed form."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.config import load_config
from wsss.methods.baseline import fused_segmentation_logits
from wsss.methods.more import predicted_image_labels


class StubSeg(torch.nn.Module):
    """seg_logits (B,K,h,w) = per-class linear functions of the 8×8-average-pooled image, so the
    output of any input is computable by hand; cls_logits fixed."""

    patch_size = 8

    def __init__(self, K=3, cls_logits=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(K, 3, generator=g)
        self.cls = cls_logits

    def forward(self, x, with_score_maps=False):
        pooled = F.avg_pool2d(x, 8)
        seg = torch.einsum("kc,bchw->bkhw", self.w, pooled)
        cls = self.cls.expand(x.shape[0], -1) if self.cls is not None else seg.mean((2, 3))[:, 1:]
        return SimpleNamespace(seg_logits=seg, cls_logits=cls)


def test_e3_fuses_square_scales_flip_sum_and_max():
    """E3: per scale a square 448·s input (here 16·s) and its flip; logits resized to the label
    size; un-flipped flip logits ADDED; element-wise MAX over scales."""
    torch.manual_seed(0)
    model = StubSeg()
    image = torch.randn(1, 3, 20, 28)  # not square: the protocol squares it
    out_size = (20, 28)
    expected = None
    for side in (16, 24):  # scales 1.0 and 1.5 of base 16
        x = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
        a = F.interpolate(model(x).seg_logits, size=out_size, mode="bilinear", align_corners=False)
        b = F.interpolate(model(x.flip(-1)).seg_logits, size=out_size, mode="bilinear", align_corners=False)
        fused = a + b.flip(-1)
        expected = fused if expected is None else torch.maximum(expected, fused)
    got = fused_segmentation_logits(model, [image], (1.0, 1.5), 16, [out_size])[0]
    torch.testing.assert_close(got, expected)
    # the mean of scales (the old softmax-average inference) is a different result
    assert not torch.allclose(got, expected / 2)


def test_e2_predicted_labels_from_the_segmentation_argmax_then_classifier():
    """E2: the seg head's argmax classes (bg excluded) with >= 4 pixels; if no foreground pixel,
    the classifier's cls_logits > 0."""

    class Fixed(torch.nn.Module):
        patch_size = 8

        def __init__(self, pred, cls):
            super().__init__()
            self.pred, self.cls = pred, cls

        def forward(self, x, with_score_maps=False):
            K = 4
            logits = F.one_hot(self.pred, K).permute(0, 3, 1, 2).float()
            return SimpleNamespace(seg_logits=logits, cls_logits=self.cls)

    pred = torch.zeros(1, 8, 8, dtype=torch.long)
    pred[0, :2, :2] = 1  # class 1 (index 0): 4 pixels -> kept
    pred[0, 5, :3] = 2  # class 2: 3 pixels -> dropped
    cls = torch.tensor([[-1.0, 5.0, 5.0]])
    y = predicted_image_labels(Fixed(pred, cls), torch.zeros(1, 3, 8, 8), size=8)
    assert y.tolist() == [[1.0, 0.0, 0.0]]
    # no foreground pixel in the argmax: the classifier decides
    y = predicted_image_labels(Fixed(torch.zeros(1, 8, 8, dtype=torch.long), cls), torch.zeros(1, 3, 8, 8), size=8)
    assert y.tolist() == [[0.0, 1.0, 1.0]]
    # foreground present but every class under 4 pixels: no label (all background), not the classifier
    only3 = torch.zeros(1, 8, 8, dtype=torch.long)
    only3[0, 0, :3] = 3
    y = predicted_image_labels(Fixed(only3, cls), torch.zeros(1, 3, 8, 8), size=8)
    assert y.tolist() == [[0.0, 0.0, 0.0]]


def test_e1_crf_post_probabilities_and_label_mapping():
    """crf_post: probabilities [1 − max_c M_c ; M_c of the present classes] (not renormalised);
    with 0 mean-field iterations the CRF returns the normalised clipped probabilities, so the
    labels are their argmax mapped through [0; present + 1]."""
    from wsss.methods.base import cam_crf_labels

    cfg = load_config(None, ["eval.crf_iters=0"])
    rng = np.random.default_rng(0)
    valid = torch.from_numpy(rng.random((4, 5, 6))).float()  # C=4 maps in [0,1]
    classes = torch.tensor([1, 3])
    valid[[0, 2]] = 0  # absent classes are zero in a label-masked CAM
    image = torch.from_numpy(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8))
    got = cam_crf_labels(image, valid, classes, cfg)
    present = valid[classes]
    probs = torch.cat([1 - present.max(0, keepdim=True).values, present]).clamp(1e-5, 1)
    expected = torch.tensor([0, 2, 4])[probs.argmax(0)]
    assert torch.equal(got, expected)


def test_more_validation_columns_by_value(tmp_path):
    """Periodic validation (SPEC §4): Score Map = the forward's F · class tokens, one scale, no
    flip, resized to the label, normalised, bkg 0.5; Fused = normalised CAM × Score Map; Seg =
    argmax of the resized seg logits; aux CAM from the aux classifier."""
    from wsss.cam import multi_scale_cam, normalize_maps
    from wsss.methods import get_method
    from wsss.models import MoRe

    torch.manual_seed(0)
    cfg = load_config(None, ["cam.scales=[1.0]", "eval.bkg_thre=0.5"])
    model = MoRe(3, backbone="custom", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                 decoder_dim=8, num_reg_tokens=1).eval()
    image = torch.randn(3, 32, 32)
    label = torch.zeros(40, 44, dtype=torch.long)
    item = {"image": image, "label": label, "cls_label": torch.tensor([1.0, 0.0, 1.0]),
            "image_uint8": torch.zeros(40, 44, 3, dtype=torch.uint8)}
    cols = get_method("more").validate(model, item, cfg, torch.device("cpu"))

    y = item["cls_label"][None]

    def to_label(maps):
        m = maps * y[:, :, None, None]
        v, idx = m.max(1)
        return torch.where(v <= 0.5, 0, idx + 1)[0]

    with torch.no_grad():
        out = model(image[None], with_score_maps=False)
        score = torch.einsum("bdhw,bcd->bchw", out.patch_features, out.class_tokens)
        score = normalize_maps(F.interpolate(score, size=(40, 44), mode="bilinear", align_corners=False))
        cam, cam_aux = multi_scale_cam(model, image[None], (1.0,), out_size=(40, 44))
        seg = F.interpolate(out.seg_logits, size=(40, 44), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(cols["score_map"], to_label(score))
    assert torch.equal(cols["fused"], to_label(normalize_maps(cam * score)))
    assert torch.equal(cols["cam"], to_label(cam)) and torch.equal(cols["aux_cam"], to_label(cam_aux))
    assert torch.equal(cols["seg"], seg)


def test_aream_official_protocol_pads_flips_and_uses_all_layers_uniformly():
    """SPEC §5 official: pad to a multiple of the patch, scale 1 + flip, gate by all layers'
    class attention, refine with the uniform mean of all layers' affinity, crop, un-flip, sum,
    min-max normalise."""
    from wsss.cam import normalize_maps
    from wsss.methods.aream import official_pseudo_label_maps
    from wsss.models import AReAM

    torch.manual_seed(0)
    model = AReAM(3, backbone="custom", embed_dim=24, depth=3, num_heads=2, patch_size=8, img_size=32).eval()
    image = torch.randn(1, 3, 21, 30)  # padded to 24 x 32
    got = official_pseudo_label_maps(model, image, impl="reference")
    maps = []
    C = 3
    for x in (image, image.flip(-1)):
        xp = F.pad(x, (0, 2, 0, 3))  # 21 x 30 -> 24 x 32, zeros bottom/right
        cam, q, k = model.cam_and_qk(xp)
        L = q.shape[0]
        # per layer: softmax over all C+N tokens, mean over heads (SPEC §5), T x T materialised
        att = [(q[l] @ k[l].transpose(-1, -2) * model.attn_scale).softmax(-1).mean(1)[0] for l in range(L)]
        gate = sum(a[:C, C:] for a in att) / L  # class attention of all layers
        aff = sum(a[C:, C:] for a in att) / L  # uniform mean of all layers, no entropy weights
        gated = cam[0].reshape(C, -1) * gate
        refined = (gated @ aff.T).reshape(1, C, 3, 4)  # cam'_c[m] = sum_n aff[m, n] gated_c[n]
        m = F.interpolate(refined, size=(24, 32), mode="bilinear", align_corners=False)[..., :21, :30]
        maps.append(m)
    expected = normalize_maps(maps[0] + maps[1].flip(-1), eps=1e-5)
    # fp32, batched [x; flip] vs one image at a time and q·kᵀ in another order: 1e-4 after the
    # normalisation to [0, 1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_e2_lam_segmentation_with_predicted_labels_by_value():
    """E2 (SPEC §4) end to end on a real MoRe with fixed random weights, two images of different
    sizes in one batch: each image resized to S² (bilinear); predicted labels from the S² input
    alone (seg argmax classes with >= 4 pixels, else cls_logits > 0); LAM = F · GCR class tokens
    at each scale (bilinear resize to a multiple of the patch) and its flip, both resized to S²,
    flip merged by MAX, no ReLU, summed over scales, min-max normalised; resized to the label
    size; label = 1 + argmax over the predicted classes, background where <= bkg_thre."""
    from wsss.cam import normalize_maps
    from wsss.methods import get_method
    from wsss.models import MoRe

    torch.manual_seed(0)
    S, scales, bkg = 32, (1.0, 0.5, 1.5), 0.5
    cfg = load_config(None, [f"eval.input_size={S}", f"eval.lam_seg_scales={list(scales)}", f"eval.bkg_thre={bkg}",
                             "eval.crf=false"])
    model = MoRe(3, backbone="custom", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                 decoder_dim=8, num_reg_tokens=1).eval()
    sizes = [(40, 44), (24, 36)]
    batch = [{"image": torch.randn(3, h, w), "label": torch.zeros(h, w, dtype=torch.long),
              "cls_label": torch.tensor([1.0, 0.0, 1.0]), "image_uint8": torch.zeros(h, w, 3, dtype=torch.uint8)}
             for h, w in sizes]
    protocol = get_method("more").protocol_table(cfg)["E2"]()
    got = protocol.predict(model, batch, torch.device("cpu"))
    row = "E2 LAM segmentation, predicted labels (val)"
    for item, size, result in zip(batch, sizes, got):
        with torch.no_grad():
            x = F.interpolate(item["image"][None], size=(S, S), mode="bilinear", align_corners=False)
            y = predicted_image_labels(model, x, S)
            acc = 0
            for s in scales:
                side = max(8, int(round(S * s / 8)) * 8)
                z = x if side == S else F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
                a = F.interpolate(model.lam(z), size=(S, S), mode="bilinear", align_corners=False)
                b = F.interpolate(model.lam(z.flip(-1)), size=(S, S), mode="bilinear", align_corners=False).flip(-1)
                acc = acc + torch.maximum(a, b)
            lam = F.interpolate(normalize_maps(acc), size=size, mode="bilinear", align_corners=False)
        m = lam * y[:, :, None, None]
        v, idx = m.max(1)
        expected = torch.where(v <= bkg, 0, idx + 1)[0]
        assert torch.equal(result[row], expected)
    assert {tuple(r[row].shape) for r in got} == set(sizes)
