"""PAR (SPEC §3.1): the reference against a per-pixel loop written straight from the SPEC, and the
Triton kernels (interpreted on CPU, compiled on CUDA) against the reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from wsss.kernels import HAS_TRITON, par_affinity_reference, par_refine, par_refine_reference
from wsss.kernels import _common

needs_triton = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips


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


def test_kappa_rows_sum_to_one_plus_w2():
    kappa = par_affinity_reference(torch.rand(2, 3, 7, 5, dtype=torch.double), (1, 3), w2=0.01)
    assert kappa.shape == (2, 16, 7, 5)
    torch.testing.assert_close(kappa.sum(1), torch.full((2, 7, 5), 1.01, dtype=torch.double))


@needs_triton
@pytest.mark.parametrize("B,K,H,W,h,w,dil,iters", [
    (2, 3, 13, 17, 7, 9, (1, 2), 3),
    (1, 1, 9, 11, 5, 6, (1, 2, 4, 8, 12, 24), 2),  # default dilations, larger than the image
    (1, 33, 6, 5, 3, 3, (1,), 2),  # K over one class block (32): two class programs
    (1, 2, 1, 1, 1, 1, (1, 2), 2),  # a single pixel: every neighbour is the centre
    (1, 2, 5, 4, 5, 4, (1,), 0),  # num_iter = 0: only the resize
])
def test_triton_matches_reference(B, K, H, W, h, w, dil, iters):
    torch.manual_seed(0)
    images = torch.rand(B, 3, H, W, device=DEVICE)
    masks = torch.rand(B, K, h, w, device=DEVICE)
    out = par_refine(images, masks, dil, iters, impl="triton")
    ref = par_refine_reference(images, masks, dil, iters)
    # fp32 both ways; the kernel's online softmax and summation order differ from torch's
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_triton_half_inputs(dtype, tol):
    # compute is fp32 in both paths from the same half inputs; the tolerance covers rounding the
    # result back to the half dtype (bf16: 8 mantissa bits, fp16: 11)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 10, 7, device=DEVICE).to(dtype)
    masks = torch.rand(2, 3, 5, 4, device=DEVICE).to(dtype)
    out = par_refine(images, masks, (1, 2), 3, impl="triton")
    assert out.dtype == dtype and out.shape == (2, 3, 10, 7)
    torch.testing.assert_close(out.float(), par_refine_reference(images, masks, (1, 2), 3), rtol=tol, atol=tol)


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


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_constant_masks_are_fixed_points_and_mass_is_kept(impl):
    images = torch.rand(1, 3, 8, 8, device=DEVICE)
    masks = torch.full((1, 2, 8, 8), 0.25, device=DEVICE)
    out = par_refine(images, masks, dilations=(1, 2), num_iter=4, impl=impl)
    # κ sums to 1 + w2 over the neighbours, so a constant map scales by (1 + w2) per iteration
    torch.testing.assert_close(out, masks * (1.01 ** 4))


@needs_triton
def test_custom_op_registration():
    from wsss.kernels.par import _par_refine_op

    args = (torch.rand(1, 3, 6, 7, device=DEVICE), torch.rand(1, 2, 3, 4, device=DEVICE), [1, 2], 2, 0.3, 0.01)
    torch.library.opcheck(_par_refine_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(images=torch.rand(1, 4, 8, 8)), ValueError, "images must be a \\(B,3,H,W\\)"),
    (dict(images=torch.rand(3, 8, 8)), ValueError, "images must have 4 dims"),
    (dict(masks=torch.rand(2, 2, 4, 4)), ValueError, "masks must be \\(B,K,h,w\\) with B=1"),
    (dict(masks=torch.rand(1, 0, 4, 4)), ValueError, "must not be empty"),
    (dict(masks=torch.ones(1, 2, 4, 4, dtype=torch.long)), TypeError, "masks must be floating point"),
    (dict(masks=[[0.0]]), TypeError, "masks must be a torch.Tensor"),
    (dict(dilations=(0, 1)), ValueError, "dilations must be a non-empty sequence of integers"),
    (dict(dilations=()), ValueError, "dilations must be a non-empty sequence"),
    (dict(dilations=(1.5,)), ValueError, "dilations"),
    (dict(num_iter=-1), ValueError, "num_iter"),
    (dict(w1=0.0), ValueError, "w1 must be"),
    (dict(w2=float("nan")), ValueError, "w2 must be"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
])
def test_validation(kwargs, error, match):
    args = dict(images=torch.rand(1, 3, 8, 8), masks=torch.rand(1, 2, 4, 4), dilations=(1, 2), num_iter=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        par_refine(**args)


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        par_refine(torch.rand(1, 3, 4, 4), torch.rand(1, 1, 4, 4), impl="triton")


def test_auto_without_triton_uses_reference(monkeypatch):
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    assert _common.resolve_impl("auto", "op", torch.zeros(1)) == "reference"
    with pytest.raises(ValueError, match="needs the triton package"):
        _common.resolve_impl("triton", "op", torch.zeros(1))
