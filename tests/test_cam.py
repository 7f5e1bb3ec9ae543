import pytest
import torch
import torch.nn.functional as F

from wsss.cam import cam_to_label, multi_scale_maps, normalize_maps, refine_cams_with_bkg


def test_cam_to_label_plain_and_ignore_mid():
    cam = torch.tensor([[[[0.9, 0.6, 0.3, 0.1]], [[0.2, 0.65, 0.1, 0.05]]]])  # (1,2,1,4)
    y = torch.tensor([[1.0, 1.0]])
    valid, label = cam_to_label(cam, y, bkg_thre=0.5)
    assert torch.equal(valid, cam)
    assert label.tolist() == [[[1, 2, 0, 0]]]
    _, label = cam_to_label(cam, y, high_thre=0.7, low_thre=0.25, ignore_mid=True)
    assert label.tolist() == [[[1, 255, 255, 0]]]
    # absent classes are masked out before the argmax
    _, label = cam_to_label(cam, torch.tensor([[0.0, 1.0]]), bkg_thre=0.5)
    assert label.tolist() == [[[0, 2, 0, 0]]]
    with pytest.raises(ValueError, match="cls_label"):
        cam_to_label(cam, torch.ones(1, 3))
    with pytest.raises(ValueError, match="needs both"):
        cam_to_label(cam, y, ignore_mid=True)


def test_normalize_maps_range():
    m = normalize_maps(torch.randn(2, 3, 5, 7) * 4 + 1)
    assert torch.all(m.amin(dim=(-2, -1)) == 0)
    assert torch.all(m.amax(dim=(-2, -1)) <= 1) and torch.all(m.amax(dim=(-2, -1)) > 0.99)


def test_multi_scale_maps_flip_merge():
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return x[:, :1] * 0 + torch.arange(x.shape[-1], dtype=x.dtype)  # a ramp along x

    images = torch.zeros(2, 3, 16, 16)
    out = multi_scale_maps(fn, images, (1.0, 0.5), multiple=8)
    assert calls == [(4, 3, 16, 16), (4, 3, 8, 8)]  # images and flips in one batch per scale
    # the flipped pass maps back to a reversed ramp; max of both is symmetric
    torch.testing.assert_close(out, out.flip(-1))
    assert out.shape == (2, 1, 16, 16)


def _identity_par(images, masks):
    return torch.nn.functional.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)


def test_refine_cams_with_bkg_rules():
    H = W = 8
    cams = torch.zeros(2, 3, H, W)
    cams[0, 0, :, :4] = 1.0  # strong class 0 on the left
    cams[0, 0, :, 4:6] = 0.5  # medium: below high (0.7) but above low (0.25) → ignore
    cams[1, 2, 2:6, 2:6] = 0.9
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1]])  # image 1 also lists class 1, whose CAM is zero
    images = torch.rand(2, 3, H, W)
    labels = refine_cams_with_bkg(images, cams, y, 0.7, 0.25, down_scale=1, par=_identity_par)
    assert labels.dtype == torch.long and labels.shape == (2, H, W)
    assert torch.all(labels[0, :, :4] == 1)
    assert torch.all(labels[0, :, 4:6] == 255)
    assert torch.all(labels[0, :, 6:] == 0)
    assert torch.all(labels[1, 2:6, 2:6] == 3)
    assert set(labels[1].unique().tolist()) <= {0, 3, 255}


def test_refine_cams_with_no_class_present():
    labels = refine_cams_with_bkg(torch.rand(1, 3, 6, 6), torch.rand(1, 2, 6, 6), torch.zeros(1, 2), 0.7, 0.25,
                                  down_scale=1, par=_identity_par)
    assert torch.all(labels == 0)


def test_refine_cams_with_bkg_default_par_runs():
    cams = torch.rand(1, 2, 16, 16)
    labels = refine_cams_with_bkg(torch.rand(1, 3, 16, 16), cams, torch.tensor([[1.0, 0.0]]), 0.7, 0.25)
    assert set(labels.unique().tolist()) <= {0, 1, 255}


def _refine_spec_loop(images, cams, cls_labels, high, low, par, down_scale=2, ignore_index=255):
    """SPEC §3 step 3 written per image: [const; cams[present]] stacks, softmax, PAR, upsample,
    argmax through keys = [0] + (present + 1); L_h background -> ignore unless L_l background too."""
    B, C, H, W = cams.shape
    size = (H // down_scale, W // down_scale)
    img_s = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
    out = []
    for b in range(B):
        present = [c for c in range(C) if cls_labels[b, c] > 0]
        keys = torch.tensor([0] + [c + 1 for c in present])
        maps = []
        for thre in (high, low):
            stack = torch.cat([torch.full((1, *size), thre), cams_s[b, present]]).softmax(dim=0)
            refined = par(img_s[b:b + 1], stack[None])
            maps.append(F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)[0])
        l_high, l_low = keys[maps[0].argmax(0)], keys[maps[1].argmax(0)]
        lab = l_high.clone()
        lab[l_high == 0] = ignore_index
        lab[(l_high == 0) & (l_low == 0)] = 0
        out.append(lab)
    return torch.stack(out)


@pytest.mark.parametrize("C,max_classes", [(3, None), (3, 3), (5, 4), (1, None)])
def test_refine_cams_with_bkg_equals_the_spec_loop(C, max_classes):
    """The batched refinement (present classes in slots, −∞ padding, one PAR call) equals the
    per-image SPEC loop with its own PAR call per stack, label for label."""
    from functools import partial

    from wsss.kernels import par_refine

    g = torch.Generator().manual_seed(C)
    B, H, W = 4, 12, 10
    images = torch.rand(B, 3, H, W, generator=g)
    y = (torch.rand(B, C, generator=g) < 0.5).float()
    y[0] = 0.0  # an image without a class
    y[1] = 0.0
    y[1, : min(C, 4)] = 1.0  # and one with min(C, 4), the most (max_classes=4 covers it)
    y[2:, 4:] = 0.0
    cams = torch.rand(B, C, H, W, generator=g) * y[:, :, None, None]
    par = partial(par_refine, dilations=(1, 2), num_iter=3, impl="reference")
    got = refine_cams_with_bkg(images, cams, y, 0.55, 0.3, par=par, max_classes=max_classes)
    assert torch.equal(got, _refine_spec_loop(images, cams, y, 0.55, 0.3, par))
