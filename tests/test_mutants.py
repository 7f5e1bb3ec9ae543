"""Behaviour the mutation run (``benchmarks/mutation.py``, results in
``benchmarks/results/mutation.md``) found untested: each test states a SPEC rule or a documented
contract of a core module; the mutants it kills are listed in the results file."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam import class_attention_gate, multi_scale_aream_cam, multi_scale_maps, refine_cams_with_bkg
from wsss.config import load_config
from wsss.eval.metrics import ConfusionMatrix
from wsss.methods import Schedule, get_method
from wsss.models import AReAM, MoRe

IGN = 255


# ---- wsss/eval/metrics.py (SPEC §4, §5) ----------------------------------------------------------

def test_a_class_absent_from_prediction_and_ground_truth_has_no_iou():
    """IoU is 0/0 for a class neither predicted nor present: NaN per class, ``None`` in the
    summary, skipped by MoRe's mIoU (SPEC §4) and counted as 0 only by AReAM's (SPEC §5)."""
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])  # class 2 predicted only, class 3 nowhere
    mat = ConfusionMatrix(4)
    mat.update(pred, gt)
    iou = mat.iou()
    assert np.isnan(iou[3]) and iou[2] == 0.0
    summary = mat.summary()
    assert summary["iou"]["3"] is None and summary["iou"]["2"] == 0.0
    assert summary["miou"] == pytest.approx((0.5 + 1.0) / 2)
    assert mat.miou(over="all") == pytest.approx((0.5 + 1.0) / 4)


def test_labels_equal_to_num_classes_are_rejected():
    mat = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="gt holds labels outside"):
        mat.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pred holds labels outside"):
        mat.update(torch.tensor([0, 3]), torch.zeros(2, dtype=torch.long))
    mat.update(torch.tensor([2, 0]), torch.tensor([2, 255]))  # the largest class and ignore are fine
    assert mat.matrix.sum() == 1


# ---- wsss/config.py (SPEC §7) -------------------------------------------------------------------

def test_defaults_are_the_voc_recipe_of_spec_section_7():
    cfg = load_config(None)
    n = cfg.train.max_iters
    assert (cfg.data.dataset, cfg.data.crop_size, cfg.data.aug) == ("voc", 448, "more")
    assert (cfg.model.method, cfg.model.num_reg_tokens, cfg.model.aux_layer, cfg.model.gcr) == ("more", 4, -3, True)
    assert (n, cfg.train.batch_size, round(cfg.train.cam2mask * n)) == (20000, 4, 10000)
    o = cfg.optim
    assert (o.lr, o.head_lr_mult, o.weight_decay, o.betas, o.eps) == (6e-5, 10.0, 0.01, [0.9, 0.999], 1e-8)
    assert (round(o.warmup * n), o.warmup_ratio, o.power, o.schedule) == (1500, 1e-6, 0.9, "poly")
    lc = cfg.loss
    assert (lc.w_aux, lc.w_tok, lc.w_ptc, lc.w_cle, lc.w_une, lc.w_seg, lc.w_reg) == (1.0, 1.0, 0.3, 0.2, 0.1, 0.12,
                                                                                       0.05)
    assert Schedule.from_config(cfg).loss_starts == {"ptc": 0, "cle": 0, "une": 0, "seg": 2001, "reg": 2001}
    assert (lc.cle_temp, lc.tok_temp) == (0.5, 0.07)
    assert (lc.reg_weight, lc.reg_sigma_rgb, lc.reg_sigma_xy, lc.reg_scale) == (1e-7, 15.0, 100.0, 0.5)
    assert (lc.cle_high, lc.cle_low, lc.main_high, lc.main_low) == (0.5, 0.25, 0.6, 0.35)
    c = cfg.cam
    assert (c.scales, c.bkg_thre, c.high_thre, c.low_thre) == ([1.0, 0.5, 0.75, 1.5], 0.5, 0.7, 0.25)
    assert (c.par_dilations, c.par_iters, c.par_down_scale) == ([1, 2, 4, 8, 12, 24], 10, 2)
    e = cfg.eval
    assert (e.bkg_thre, e.scales, e.cam_scales) == (0.5, [1.0, 1.25, 1.5], [1.0])
    assert e.lam_seg_scales == [1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0]
    assert (e.crf_iters, e.crf_pos_xy_std, e.crf_pos_w, e.crf_bi_xy_std, e.crf_bi_rgb_std, e.crf_bi_w) == (
        10, 1.0, 3.0, 67.0, 3.0, 4.0)
    a = cfg.aream
    assert (a.layer_index, a.score_l, a.score_h, a.aff_start * 60, a.w_aff) == (7, 0.35, 0.55, pytest.approx(10), 0.1)


def test_validation_input_is_the_crop_size_by_default():
    """SPEC §1 evaluation input: periodic validation resizes to the crop size (448);
    ``data.eval_resize`` 0 stands for it."""
    cfg = load_config(None)
    assert (cfg.data.eval_resize or cfg.data.crop_size) == 448
    assert cfg.eval.input_size in (0, 448)


def test_optional_schedule_settings_are_off_by_default():
    """The cosine schedules are opt-in; left at their defaults the per-iteration cosine decays
    to 0 and the per-epoch one (AReAM's, SPEC §5) starts at the base lr (no warm-up epochs)."""
    from wsss.train.optim import build_optimizer, cosine_warmup_factor

    cfg = load_config(None, ["optim.schedule=cosine"])
    o, n = cfg.optim, 1000
    assert cosine_warmup_factor(n, n, round(o.warmup * n), o.warmup_ratio, o.min_lr_ratio) == pytest.approx(0.0)
    cfg = load_config(None, ["optim.schedule=cosine_epoch", "optim.groups=no_decay", "optim.lr=0.01"])
    opt, _ = build_optimizer(torch.nn.Linear(3, 2), cfg.optim, max_iters=100, iters_per_epoch=10)
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)


def test_default_background_sweep_holds_scores_in_the_cam_range():
    sweep = load_config(None).eval.bkg_sweep
    assert sweep == sorted(sweep) and all(0.0 < t < 1.0 for t in sweep)


@pytest.mark.parametrize("word, value", [("y", True), ("yes", True), ("on", True), ("n", False), ("no", False),
                                         ("off", False)])
def test_yaml11_boolean_words(word, value):
    assert load_config(None, [f"eval.crf={word}"]).eval.crf is value


# ---- wsss/cam.py (SPEC §3 steps 1-3, §5) --------------------------------------------------------

def test_multi_scale_maps_runs_each_image_and_its_horizontal_flip():
    """SPEC §3 step 1: the CAM branch runs on [x_s; flip(x_s)], the flip being horizontal."""
    seen = []

    def fn(x):
        seen.append(x.clone())
        return x[:, :2]

    images = torch.randn(2, 3, 16, 24)
    multi_scale_maps(fn, images, (1.0, 0.5), multiple=8)
    for x in seen:
        torch.testing.assert_close(x[2:], x[:2].flip(-1))
    torch.testing.assert_close(seen[0][:2], images)  # scale 1: the images themselves, channels in order


def _spy_par(log):
    def par(images, masks):
        log["images"], log["masks"] = images.clone(), masks.clone()
        return F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
    return par


def test_refine_cams_with_bkg_gives_par_the_half_size_image_and_stacks():
    """SPEC §3 step 3: image and CAMs downscaled by 2 (bilinear, align_corners False), stacks
    ``[high; cams of the present classes]`` and ``[low; …]`` soft-maxed over the stack."""
    torch.manual_seed(0)
    images, cams = torch.rand(1, 3, 12, 10), torch.rand(1, 3, 12, 10)
    y = torch.tensor([[1.0, 0.0, 1.0]])
    log = {}
    refine_cams_with_bkg(images, cams, y, 0.7, 0.25, par=_spy_par(log))
    torch.testing.assert_close(log["images"], F.interpolate(images, size=(6, 5), mode="bilinear",
                                                            align_corners=False))
    small = F.interpolate(cams, size=(6, 5), mode="bilinear", align_corners=False)[0, [0, 2]]
    for j, thre in enumerate((0.7, 0.25)):
        stack = torch.cat([torch.full((1, 6, 5), thre), small]).softmax(dim=0)
        torch.testing.assert_close(log["masks"][0, 3 * j:3 * j + 3], stack)


@pytest.mark.parametrize("H, W", [(1, 6), (6, 1), (1, 1)])
def test_refine_cams_with_bkg_tiny_images(H, W):
    cams = torch.zeros(1, 2, H, W)
    cams[0, 1] = 1.0
    labels = refine_cams_with_bkg(torch.rand(1, 3, H, W), cams, torch.tensor([[0.0, 1.0]]), 0.7, 0.25,
                                  par=_spy_par({}))
    assert labels.shape == (1, H, W) and (labels == 2).all()


def test_class_attention_gate_uses_the_given_scale():
    """MCTformer's gate (SPEC §5): mean over layers and heads of softmax(q_cls kᵀ · scale),
    patch columns; an explicit scale replaces 1/√dh."""
    torch.manual_seed(0)
    L, B, Hd, C, h, w, dh = 2, 1, 2, 2, 2, 3, 4
    q, k = torch.randn(L, B, Hd, C + h * w, dh), torch.randn(L, B, Hd, C + h * w, dh)
    for scale in (None, 0.3):
        s = dh ** -0.5 if scale is None else scale
        expected = ((q[:, :, :, :C] @ k.transpose(-1, -2)) * s).softmax(-1).mean(dim=(0, 2))[..., C:]
        torch.testing.assert_close(class_attention_gate(q, k, C, (h, w), scale=scale), expected.reshape(B, C, h, w))


@pytest.fixture(scope="module")
def deep_aream():
    torch.manual_seed(0)
    return AReAM(2, backbone="custom", embed_dim=16, depth=8, num_heads=2, patch_size=8, img_size=16).eval()


def test_multi_scale_aream_cam_defaults_and_extras(deep_aream):
    """SPEC §5 pseudo-label CAM at scale 1: the refined CAM (layer_index 7 by default) of the
    image and its flip, upsampled, the flip un-flipped and summed, ReLU, per map ``m − min``,
    ``/ (max + 1e-6)``. ``extras`` adds one single-layer map per layer (the layer-wise
    analysis): layer l alone is layer_index l+1 with equal weights."""
    from wsss.cam import aream_refined_cam

    images = torch.randn(1, 3, 16, 24)
    refined = multi_scale_aream_cam(deep_aream, images)
    cam, q, k = deep_aream.cam_and_qk(torch.cat([images, images.flip(-1)]))
    r = F.interpolate(aream_refined_cam(cam, q, k, 7, None, deep_aream.attn_scale), size=(16, 24), mode="bilinear",
                      align_corners=False)
    s = F.relu(r[:1] + r[1:].flip(-1))
    s = s - s.amin(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(refined, s / (s.amax(dim=(-2, -1), keepdim=True) + 1e-6))
    assert not torch.allclose(refined, multi_scale_aream_cam(deep_aream, images, layer_index=8))
    main, gated, singles = multi_scale_aream_cam(deep_aream, images, extras=True)
    torch.testing.assert_close(main, refined)
    assert len(singles) == deep_aream.depth
    torch.testing.assert_close(singles[0], multi_scale_aream_cam(deep_aream, images, layer_index=1))
    torch.testing.assert_close(singles[3], multi_scale_aream_cam(deep_aream, images, layer_index=4,
                                                                 refine_weights=[0, 0, 0, 4, 0, 0, 0, 0]))


# ---- wsss/crf (SPEC §6) ---------------------------------------------------------------------------

def test_dense_crf_batch_rejects_zero_labels():
    from wsss.crf import dense_crf_batch

    with pytest.raises(ValueError, match="K >= 1"):
        dense_crf_batch(torch.zeros(1, 3, 4, 5, dtype=torch.uint8), torch.ones(1, 0, 4, 5))


# ---- wsss/kernels ---------------------------------------------------------------------------------

@pytest.mark.needs_triton
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_triton_block_sizes_are_powers_of_two(device_type):
    """tl.arange and tl.dot take power-of-two sizes of at least 16: every BLOCK_* the launchers
    choose, on CUDA as in the interpreter, for tiny to ViT-B shapes."""
    from wsss.kernels import affinity, attention, par

    configs = []
    for dtype in (torch.float32, torch.bfloat16):
        for N in (1, 7, 33, 200, 784):
            configs.append(affinity._logit_config(N, dtype, device_type))
            configs.append(attention._row_config(N + 20, dtype, device_type))
            configs.append(attention._tile_config(N + 20, dtype, device_type))
            for D in (3, 16, 100, 384, 768):
                configs.append(affinity._dot_fwd_config(N, D, dtype, device_type))
                configs.append(affinity._dot_bwd_config(N, D, dtype, device_type))
        configs.append(attention._propagate_config(12, 6, 2, 1712, 20, 20, 64, dtype, device_type, True))
    configs += [par._kappa_config(224 * 224, device_type), par._par_propagate_config(42, 224 * 224, device_type)]
    sizes = [v for cfg in configs for k, v in cfg.items() if k.startswith("BLOCK")]
    assert sizes and all(s >= 16 and s & (s - 1) == 0 for s in sizes), sizes


def test_propagate_cam_triton_over_several_row_tiles():
    """T = 2 + 81 tokens: more rows than one tile holds on either device."""
    from wsss.kernels import propagate_cam, propagate_cam_reference

    torch.manual_seed(0)
    cam = torch.rand(1, 3, 9, 9)
    logits = torch.randn(1, 1, 2, 83, 83)
    torch.testing.assert_close(propagate_cam(cam, logits, 2, impl="triton"),
                               propagate_cam_reference(cam, logits, 2), rtol=1e-5, atol=1e-6)


def test_propagate_cam_qk_without_gradients_runs_the_triton_kernel(monkeypatch):
    """Inputs that need no gradient take the forward-only kernel even while grad mode is on;
    the reference (one (B,Hd,T,T) layer at a time) is only for gradients."""
    from wsss.kernels import attention

    torch.manual_seed(0)
    cam, q, k = torch.rand(1, 2, 2, 3), torch.randn(2, 1, 2, 8, 4), torch.randn(2, 1, 2, 8, 4)
    expected = attention.propagate_cam_qk_reference(cam, q, k, 2)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(attention, "propagate_cam_qk_reference", no_reference)
    with torch.enable_grad():
        torch.testing.assert_close(attention.propagate_cam_qk(cam, q, k, 2, impl="triton"), expected)


def test_par_refine_dispatch_and_empty_images(monkeypatch):
    """STYLE 2: ``impl`` picks the path in one place: "reference" never launches Triton and
    "triton" never runs the reference; empty images are rejected like empty masks."""
    from wsss.kernels import par

    torch.manual_seed(0)
    images, masks = torch.rand(1, 3, 4, 5), torch.rand(1, 2, 2, 3)
    with pytest.raises(ValueError, match="must not be empty"):
        par.par_refine(torch.rand(1, 3, 0, 5), masks)
    ref = par.par_refine(images, masks, dilations=(1,), num_iter=1, impl="reference")
    tri = par.par_refine(images, masks, dilations=(1,), num_iter=1, impl="triton")

    def fail(*args, **kwargs):
        raise AssertionError("the other path ran")

    monkeypatch.setattr(par, "_par_refine_triton", fail)
    torch.testing.assert_close(par.par_refine(images, masks, dilations=(1,), num_iter=1, impl="reference"), ref)
    monkeypatch.undo()
    monkeypatch.setattr(par, "par_refine_reference", fail)
    torch.testing.assert_close(par.par_refine(images, masks, dilations=(1,), num_iter=1, impl="triton"), tri)


# ---- wsss/methods: the objectives (SPEC §3.6, §5) -------------------------------------------------

TINY = ["cam.scales=[1.0]", "cam.par_dilations=[1,2]", "cam.par_iters=2", "train.max_iters=100", "loss.w_reg=0"]
NO_AMP = torch.autocast("cpu", enabled=False)


def test_active_weights_follow_the_voc_stages():
    """SPEC §3.6: cls, aux and tok always (L_cls unweighted), ptc/CLE/UNE from the start, seg
    and reg after the 2 000 warm iterations, with the VOC weights."""
    from wsss.methods.more import active_weights

    cfg = load_config(None)
    schedule = Schedule.from_config(cfg)
    early = {"cls": 1.0, "aux": 1.0, "tok": 1.0, "ptc": 0.3, "cle": 0.2, "une": 0.1}
    assert active_weights(cfg.loss, schedule, 0) == early
    assert active_weights(cfg.loss, schedule, 2000) == early
    assert active_weights(cfg.loss, schedule, 2001) == {**early, "seg": 0.12, "reg": 0.05}


def _labels_and_seg_logits(model, batch, cfg):
    """What the segmentation stage trains on (SPEC §3 steps 1-3): the PAR-refined labels of the
    main training CAM, and the decoder's logits upsampled to the 32×32 crop."""
    from wsss.methods.baseline import refined_pseudo_labels, training_cams

    images = batch["image"]
    cam, _ = training_cams(model, images, cfg)
    label = refined_pseudo_labels(images, cam, batch["cls_label"], batch["valid"], cfg)
    seg = F.interpolate(model(images, with_score_maps=False).seg_logits, size=(32, 32), mode="bilinear",
                        align_corners=False)
    return label, seg


def _more_setup(*overrides, gcr=True, valid=None):
    torch.manual_seed(0)
    model = MoRe(3, backbone="custom", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                 decoder_dim=8, num_reg_tokens=1, gcr=gcr).eval()
    images = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    valid = torch.ones(2, 32, 32, dtype=torch.bool) if valid is None else valid
    cfg = load_config(None, TINY + list(overrides))
    return model, {"image": images, "cls_label": y, "valid": valid}, cfg


def test_more_computes_only_terms_of_positive_weight_and_weights_tok():
    """MoReLosses: a started term of weight 0 is not computed or logged (COCO's w_une = 0);
    tok is ``w_tok · L_tok`` on the forward's class tokens."""
    from wsss.losses import token_regularization_loss

    model, batch, cfg = _more_setup("loss.w_une=0", "loss.w_tok=0.5", "loss.starts.seg=0.5", "loss.starts.reg=0.5")
    schedule = Schedule.from_config(cfg)
    losses = get_method("more").objective(cfg, "cpu")(model, batch, 0, cfg, schedule, NO_AMP)
    assert set(losses) == {"cls", "aux", "tok", "ptc", "cle", "seg"} and float(losses["seg"].detach()) == 0.0
    out = model(batch["image"], with_score_maps=False)
    torch.testing.assert_close(losses["tok"], 0.5 * token_regularization_loss(out.class_tokens, cfg.loss.tok_temp))


def test_more_token_labels_ignore_the_padding_of_a_crop(monkeypatch):
    """SPEC §1 (ToCo crops): tokens outside ``valid`` get the ignore label in the token pseudo
    labels of CLE, UNE and ptc."""
    import wsss.methods.more as more

    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :, :16] = False
    model, batch, cfg = _more_setup(valid=valid)
    seen = {}

    def recorder(name, index):
        def fn(*args, **kwargs):
            seen[name] = args[index].clone()
            return args[0].sum() * 0.0
        return fn

    monkeypatch.setattr(more, "cle_loss", recorder("cle", 2))
    monkeypatch.setattr(more, "une_loss", recorder("une", 2))
    monkeypatch.setattr(more, "masked_cosine_affinity_loss", recorder("ptc", 1))
    more.MoReLosses(cfg, "cpu")(model, batch, 0, cfg, Schedule.from_config(cfg), NO_AMP)
    for lab in seen.values():
        assert (lab[0, :, :2] == IGN).all() and (lab[1] != IGN).any()
    assert set(seen) == {"cle", "une", "ptc"}


def test_more_regularized_loss_after_its_stage():
    """SPEC §3.6: after the warm iterations ``w_reg · DenseEnergyLoss`` on the normalised input,
    the upsampled segmentation logits and the refined label (crop box as the roi)."""
    from wsss.crf.energy import DenseEnergyLoss

    model, batch, cfg = _more_setup("loss.w_reg=0.05", "loss.reg_weight=1.0", "loss.starts.seg=0.1",
                                    "loss.starts.reg=0.1")
    schedule = Schedule.from_config(cfg)
    fn = get_method("more").objective(cfg, "cpu")
    assert "reg" not in fn(model, batch, 10, cfg, schedule, NO_AMP)
    losses = fn(model, batch, 11, cfg, schedule, NO_AMP)
    label, seg = _labels_and_seg_logits(model, batch, cfg)
    expected = 0.05 * DenseEnergyLoss(weight=1.0)(batch["image"], seg, label, roi=batch["valid"].float())
    torch.testing.assert_close(losses["reg"], expected)


def test_baseline_seg_loss_starts_with_its_stage():
    """The baseline (``model.method=baseline``): the idle zero before ``loss.starts.seg``, then
    ``w_seg · L_seg`` on the PAR-refined labels of the main CAM (SPEC §3 steps 1-3, §3.6)."""
    from wsss.losses import seg_loss

    model, batch, cfg = _more_setup("model.method=baseline", "loss.starts.seg=0.1", gcr=False)
    schedule = Schedule.from_config(cfg)
    fn = get_method("baseline").objective(cfg, "cpu")
    before = fn(model, batch, 10, cfg, schedule, NO_AMP)
    assert set(before) == {"cls", "aux", "seg"} and float(before["seg"].detach()) == 0.0
    after = fn(model, batch, 11, cfg, schedule, NO_AMP)
    label, seg = _labels_and_seg_logits(model, batch, cfg)
    expected = cfg.loss.w_seg * seg_loss(seg, label, IGN)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(after["seg"], expected)


AREAM = ["model.method=aream", "aream.layer_index=1", "aream.scales=[1.0]", "cam.par_dilations=[1,2]",
         "cam.par_iters=2", "train.max_iters=100"]


@pytest.mark.parametrize("scores", [(0.35, 1.0), (0.0, 0.55), (0.55, 0.55)])
def test_aream_background_scores_must_be_ordered_inside_the_unit_interval(scores):
    """SPEC §5: two thresholds 0 < α1 < α2 < 1."""
    from wsss.methods.aream import AReAMLosses

    cfg = load_config(None, AREAM + ["aream.entropy=none", f"aream.score_l={scores[0]}",
                                     f"aream.score_h={scores[1]}"])
    with pytest.raises(ValueError, match="score_l < score_h"):
        AReAMLosses(cfg, "cpu")


def test_aream_online_entropy_is_estimated_from_each_layers_queries_and_keys(monkeypatch):
    """SPEC §5 (online estimate): per layer the entropy in bits of the CAM re-activated by that
    layer's attention softmax(q kᵀ · scale); the first estimate becomes the running value."""
    from wsss.cam import layer_entropy_bits
    from wsss.methods.aream import AReAMLosses

    torch.manual_seed(0)
    cfg = load_config(None, AREAM + ["aream.entropy=online"])
    model = AReAM(3, backbone="custom", embed_dim=24, depth=3, num_heads=2, patch_size=8, img_size=32)
    with torch.no_grad():  # peaked attention, so that each layer re-activates the CAM differently
        for block in model.backbone.blocks:
            block.attn.qkv.weight.mul_(8.0)
    images = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss_fn = AReAMLosses(cfg, "cpu")
    monkeypatch.setattr(loss_fn, "pseudo_labels", lambda *a, **kw: torch.zeros(2, 32, 32, dtype=torch.long))
    batch = {"image": images, "cls_label": y, "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    loss_fn(model, batch, 0, cfg, Schedule(aff_start=0), NO_AMP)
    with torch.no_grad():
        out = model(images, qk_layers=range(3))
        q = torch.stack([out.qk[i][0] for i in range(3)])
        k = torch.stack([out.qk[i][1] for i in range(3)])
        expected = layer_entropy_bits(F.relu(out.cam), q, k, y, model.attn_scale, "reference").mean(dim=1)
    assert int(model.entropy_updates) == 1
    torch.testing.assert_close(model.layer_entropy, expected, rtol=1e-5, atol=1e-6)
    keys_only = layer_entropy_bits(F.relu(out.cam), k, k, y, model.attn_scale, "reference").mean(dim=1)
    assert not torch.allclose(keys_only, expected, rtol=1e-3)  # q and k are told apart
