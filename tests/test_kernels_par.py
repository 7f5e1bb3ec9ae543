"""PAR (SPEC §3.1): the reference against a per-pixel loop written straight from the SPEC."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from wsss.kernels import par_refine, par_refine_reference


def _par_loops(images, masks, dilations, num_iter, w1=0.3, w2=0.01):
    B, _, H, W = images.shape
    masks = F.interpolate(masks.double(), size=(H, W), mode="bilinear", align_corners=True)
    img = images.double()
    offs = [(d * dy, d * dx) for d in dilations
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))]
    dist = torch.tensor([math.hypot(*o) for o in offs], dtype=torch.double)
    pos = torch.softmax(-(dist / (dist.std() + 1e-8) / w1) ** 2, 0)
    clamp = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731  (replicate padding)
    kappa = torch.zeros(B, len(offs), H, W, dtype=torch.double)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                nb = torch.stack([img[b, :, clamp(i + dy, H), clamp(j + dx, W)] for dy, dx in offs], 1)  # (3,J)
                std = nb.std(dim=1, keepdim=True)
                a = (-((nb - img[b, :, i, j, None]).abs() / (std + 1e-8) / w1) ** 2).mean(0)
                kappa[b, :, i, j] = torch.softmax(a, 0) + w2 * pos
    for _ in range(num_iter):
        new = torch.zeros_like(masks)
        for i in range(H):
            for j in range(W):
                for n, (dy, dx) in enumerate(offs):
                    new[:, :, i, j] += kappa[:, n, i, j, None] * masks[:, :, clamp(i + dy, H), clamp(j + dx, W)]
        masks = new
    return masks


@pytest.mark.parametrize("B,K,H,W,h,w,dil,iters", [
    (1, 1, 5, 7, 3, 4, (1,), 2),
    (2, 3, 9, 6, 9, 6, (1, 2), 3),
    (1, 2, 11, 13, 4, 5, (1, 2, 4, 8, 12, 24), 2),  # dilations larger than the image
])
def test_reference_matches_spec_loops(B, K, H, W, h, w, dil, iters):
    torch.manual_seed(0)
    images = torch.rand(B, 3, H, W)
    masks = torch.rand(B, K, h, w)
    got = par_refine_reference(images.double(), masks.double(), dil, iters)
    torch.testing.assert_close(got, _par_loops(images, masks, dil, iters), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_dispatch_dtypes_and_device(dtype, tol):
    # half inputs are computed in fp32; the tolerance covers the input rounding and the cast back
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 10, device=DEVICE)
    masks = torch.rand(2, 4, 6, 5, device=DEVICE)
    ref = par_refine_reference(images, masks, (1, 2), 3)
    out = par_refine(images.to(dtype), masks.to(dtype), dilations=(1, 2), num_iter=3)
    assert out.dtype == dtype and out.shape == (2, 4, 12, 10) and out.device.type == DEVICE
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_constant_masks_are_fixed_points_and_mass_is_kept():
    images = torch.rand(1, 3, 8, 8)
    masks = torch.full((1, 2, 8, 8), 0.25)
    out = par_refine(images, masks, dilations=(1, 2), num_iter=4)
    # κ sums to 1 + w2 over the neighbours, so a constant map scales by (1 + w2) per iteration
    torch.testing.assert_close(out, masks * (1.01 ** 4))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(images=torch.rand(1, 4, 8, 8)), ValueError, "images must be a \\(B,3,H,W\\)"),
    (dict(masks=torch.rand(2, 2, 4, 4)), ValueError, "masks must be \\(B,K,h,w\\) with B=1"),
    (dict(masks=torch.ones(1, 2, 4, 4, dtype=torch.long)), TypeError, "floating point"),
    (dict(dilations=(0, 1)), ValueError, "dilations must be positive"),
    (dict(num_iter=-1), ValueError, "num_iter"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
])
def test_validation(kwargs, error, match):
    args = dict(images=torch.rand(1, 3, 8, 8), masks=torch.rand(1, 2, 4, 4), dilations=(1, 2), num_iter=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        par_refine(**args)
