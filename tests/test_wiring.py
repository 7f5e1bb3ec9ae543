"""How MoRe's objective is wired (SPEC §3 step 5, §3.0): which CAM (main or aux), which
thresholds and which labels feed each loss before and after ``cam2mask`` and the loss stages,
checked against labels computed here from the SPEC text on a tiny fixed model."""
import pytest
import torch
import torch.nn.functional as F

import wsss.methods.more as more
from wsss.cam import multi_scale_cam
from wsss.config import load_config
from wsss.methods import Schedule, get_method
from wsss.models import MoRe

IGN = 255


def spec_token_labels(cam, y, size, high, low):
    """SPEC §3 steps 2 and 5: CAM resized to the token grid (bilinear), masked by the image
    labels; label = 1 + argmax; value <= high -> ignore, then value <= low -> background."""
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False) * y[:, :, None, None]
    value, idx = cam.max(dim=1)
    label = idx + 1
    label = torch.where(value <= high, torch.full_like(label, IGN), label)
    return torch.where(value <= low, torch.zeros_like(label), label)


@pytest.fixture
def setup(monkeypatch):
    torch.manual_seed(0)
    model = MoRe(3, backbone="custom", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                 decoder_dim=8, num_reg_tokens=1).eval()
    images = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch = {"image": images, "cls_label": y, "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    seen = {}

    def recorder(name, label_arg):
        def fn(*args, **kwargs):
            seen[name] = args[label_arg].clone()
            return args[0].sum() * 0.0
        return fn

    monkeypatch.setattr(more, "cle_loss", recorder("cle", 2))
    monkeypatch.setattr(more, "une_loss", recorder("une", 2))
    monkeypatch.setattr(more, "masked_cosine_affinity_loss", recorder("ptc", 1))
    monkeypatch.setattr(more, "seg_loss", recorder("seg", 1))
    return model, batch, seen


# CAM thresholds and the switch; no DenseCRF loss (w_reg=0) keeps the test free of the extension
BASE = ["cam.scales=[1.0]", "cam.par_dilations=[1,2]", "cam.par_iters=2", "loss.w_reg=0", "train.max_iters=100",
        "train.cam2mask=0.5", "loss.cle_high=0.5", "loss.cle_low=0.25", "loss.main_high=0.6", "loss.main_low=0.35"]


@pytest.mark.parametrize("thresholds", [("0.7", "0.25"), ("0.65", "0.25")])  # VOC, COCO (SPEC §3.0)
def test_token_labels_before_and_after_cam2mask(setup, thresholds):
    model, batch, seen = setup
    high, low = thresholds
    cfg = load_config(None, BASE + [f"cam.high_thre={high}", f"cam.low_thre={low}"])
    loss_fn = get_method("more").objective(cfg, "cpu")
    schedule = Schedule.from_config(cfg)
    assert schedule.cam2mask == 50
    cam, cam_aux = multi_scale_cam(model, batch["image"], (1.0,))
    y, size = batch["cls_label"], (4, 4)
    aux = spec_token_labels(cam_aux, y, size, float(high), float(low))  # Laux: ptc, UNE before the switch
    cle_before = spec_token_labels(cam_aux, y, size, 0.5, 0.25)
    main = spec_token_labels(cam, y, size, 0.6, 0.35)
    assert not torch.equal(aux, cle_before) or not torch.equal(aux, main)  # the cases are told apart

    ctx = torch.autocast("cpu", enabled=False)
    loss_fn(model, batch, 49, cfg, schedule, ctx)  # before cam2mask
    assert torch.equal(seen["ptc"], aux) and torch.equal(seen["une"], aux) and torch.equal(seen["cle"], cle_before)
    seen.clear()
    loss_fn(model, batch, 50, cfg, schedule, ctx)  # from cam2mask on: the main CAM for CLE and UNE
    assert torch.equal(seen["cle"], main) and torch.equal(seen["une"], main)
    assert torch.equal(seen["ptc"], aux)  # ptc keeps the aux labels


def test_stages_decide_which_losses_run_and_seg_reads_the_main_cam_refinement(setup, monkeypatch):
    model, batch, seen = setup
    cfg = load_config(None, BASE + ["loss.starts.ptc=0.1", "loss.starts.cle=0.2", "loss.starts.une=0.2",
                                    "loss.starts.seg=0.3"])
    loss_fn = get_method("more").objective(cfg, "cpu")
    schedule = Schedule.from_config(cfg)
    ctx = torch.autocast("cpu", enabled=False)
    expected = {10: {"cls", "aux", "tok", "seg"}, 11: {"cls", "aux", "tok", "ptc", "seg"},
                21: {"cls", "aux", "tok", "ptc", "cle", "une", "seg"}}
    for step, names in expected.items():  # a staged loss joins after iteration round(f * max_iters)
        seen.clear()
        losses = loss_fn(model, batch, step, cfg, schedule, ctx)
        assert set(losses) == names, step
        assert "seg" not in seen and float(losses["seg"].detach()) == 0.0  # the idle decoder term, not the seg loss
    # after the seg stage: the segmentation loss reads the PAR refinement of the MAIN CAM
    refined_from = {}
    real = more.refined_pseudo_labels

    def spy(images, cam, y, valid, cfg_, *rest):
        refined_from["cam"] = cam.clone()
        return real(images, cam, y, valid, cfg_, *rest)

    monkeypatch.setattr(more, "refined_pseudo_labels", spy)
    loss_fn(model, batch, 31, cfg, schedule, ctx)
    cam, cam_aux = multi_scale_cam(model, batch["image"], (1.0,))
    assert torch.equal(refined_from["cam"], cam) and not torch.equal(cam, cam_aux)
    assert torch.equal(seen["seg"], real(batch["image"], cam, batch["cls_label"], batch["valid"], cfg))
