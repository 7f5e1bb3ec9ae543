"""Attention aggregation and CAM propagation (SPEC §5): references against explicit loops,
Triton kernels (interpreted on CPU) against the references, q/k entry point against the
materialised logits."""
import pytest
import torch
from conftest import DEVICE

from wsss.kernels import (HAS_TRITON, aggregate_attention, aggregate_attention_reference, attention_logits_from_qk,
                          propagate_cam, propagate_cam_qk, propagate_cam_qk_reference, propagate_cam_reference)
from wsss.kernels import attention as attention_module

needs_triton = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips
IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]
# fp32: online (streamed) softmax and a different summation order than torch → ~1e-6 relative
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _ieee(ieee_fp32_dots):
    """FP32_TOL holds on CUDA too: fp32 products in IEEE fp32 (conftest.ieee_fp32_dots)."""


def _aggregate_loops(x, weights):
    L, B, Hd, T, _ = x.shape
    out = torch.zeros(B, T, T, dtype=torch.double)
    for layer in range(L):
        for b in range(B):
            for h in range(Hd):
                out[b] += weights[layer] * torch.softmax(x[layer, b, h].double(), dim=-1) / (L * Hd)
    return out


def _propagate_loops(cam, agg, cc):
    B, C, h, w = cam.shape
    out = torch.zeros(B, C, h * w, dtype=torch.double)
    flat = cam.double().reshape(B, C, -1)
    for b in range(B):
        for c in range(C):
            for m in range(h * w):
                out[b, c, m] = sum(agg[b, cc + m, cc + n] * flat[b, c, n] for n in range(h * w))
    return out.reshape(B, C, h, w)


def test_references_match_loops_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 3, 6, 6, dtype=torch.double, requires_grad=True)
    weights = [0.25, 2.0]
    agg = aggregate_attention_reference(x, weights)
    torch.testing.assert_close(agg, _aggregate_loops(x.detach(), weights))
    torch.testing.assert_close(aggregate_attention_reference(x), _aggregate_loops(x.detach(), [1.0, 1.0]))
    cam = torch.rand(2, 3, 2, 2, dtype=torch.double)
    torch.testing.assert_close(propagate_cam_reference(cam, x, 2, weights),
                               _propagate_loops(cam.detach(), agg.detach(), 2))
    xs = x[:, :1, :2, :4, :4].detach().requires_grad_()  # gradcheck on a small slice keeps CI fast
    cs = cam[:1, :, :1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: aggregate_attention_reference(a, weights), (xs,))
    assert torch.autograd.gradcheck(lambda c, a: propagate_cam_reference(c, a, 2, weights), (cs, xs))


def test_qk_reference_equals_materialised():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 7, 4, dtype=torch.double), torch.randn(2, 1, 2, 7, 4, dtype=torch.double)
    cam = torch.rand(1, 2, 2, 3, dtype=torch.double)
    logits = attention_logits_from_qk(q, k, 0.7)
    torch.testing.assert_close(logits, torch.einsum("lbhid,lbhjd->lbhij", q, k) * 0.7)
    torch.testing.assert_close(propagate_cam_qk_reference(cam, q, k, 1, [1.0, 3.0], 0.7),
                               propagate_cam_reference(cam, logits, 1, [1.0, 3.0]))


# ---------------------------------------------------------------------------------------------- triton
@needs_triton
@pytest.mark.parametrize("L,B,Hd,T", [(2, 2, 3, 23), (1, 1, 1, 1), (3, 1, 2, 130)])
@pytest.mark.parametrize("weights", [None, [0.5, 1.5, 0.25]])
def test_aggregate_triton_matches_reference(L, B, Hd, T, weights):
    torch.manual_seed(0)
    weights = None if weights is None else weights[:L]
    x = (3 * torch.randn(L, B, Hd, T, T, device=DEVICE)).requires_grad_()
    out = aggregate_attention(x, weights, impl="triton")
    ref = aggregate_attention_reference(x, weights)
    assert out.shape == (B, T, T) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], **FP32_TOL)


@needs_triton
def test_small_tiles_stream_over_column_chunks(monkeypatch):
    # 16-wide tiles: the row statistics and the flash-style propagation loop over several chunks
    monkeypatch.setattr(attention_module, "_tile", lambda T, dev, cuda, cpu: 16)
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 1, 2, 37, 37, device=DEVICE)).requires_grad_()
    out = aggregate_attention(x, impl="triton")
    ref = aggregate_attention_reference(x)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], **FP32_TOL)
    cam = torch.rand(1, 3, 5, 7, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(propagate_cam(cam, x, 2, impl="triton"), propagate_cam_reference(cam, x, 2),
                                   **FP32_TOL)
    q, k = torch.randn(2, 1, 2, 37, 8, device=DEVICE), torch.randn(2, 1, 2, 37, 8, device=DEVICE)
    torch.testing.assert_close(propagate_cam_qk(cam, q, k, 2, impl="triton"),
                               propagate_cam_qk_reference(cam, q, k, 2), **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("L,B,Hd,cc,C,h,w", [(2, 2, 3, 3, 4, 4, 5), (1, 1, 1, 0, 1, 1, 1), (2, 1, 2, 20, 20, 3, 3),
                                             (1, 1, 2, 1, 70, 2, 3)])  # C=70: two class blocks
def test_propagate_triton_matches_reference(L, B, Hd, cc, C, h, w):
    torch.manual_seed(0)
    T = cc + h * w
    x = 3 * torch.randn(L, B, Hd, T, T, device=DEVICE)
    cam = torch.rand(B, C, h, w, device=DEVICE)
    weights = torch.linspace(0.5, 1.5, L, device=DEVICE)
    out = propagate_cam(cam, x, cc, weights, impl="triton")
    assert out.shape == (B, C, h, w) and out.dtype == torch.float32
    torch.testing.assert_close(out, propagate_cam_reference(cam, x, cc, weights), **FP32_TOL)
    # the q/k entry point equals the materialised logits
    q, k = torch.randn(L, B, Hd, T, 8, device=DEVICE), torch.randn(L, B, Hd, T, 8, device=DEVICE)
    out_qk = propagate_cam_qk(cam, q, k, cc, weights, impl="triton")
    torch.testing.assert_close(out_qk, propagate_cam(cam, attention_logits_from_qk(q, k), cc, weights,
                                                     impl="reference"), **FP32_TOL)


@needs_triton
def test_propagate_head_splits_add_up(monkeypatch):
    # on CUDA small grids split the (layer, head) pairs over programs; force 3 splits of 2 here
    config = attention_module._propagate_config
    monkeypatch.setattr(attention_module, "_propagate_config",
                        lambda *a, **k: dict(config(*a, **k), heads_per_program=2))
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 2, 3, 13, 13, device=DEVICE)
    cam = torch.rand(2, 5, 3, 3, device=DEVICE)
    weights = [0.5, 2.0]
    torch.testing.assert_close(propagate_cam(cam, x, 4, weights, impl="triton"),
                               propagate_cam_reference(cam, x, 4, weights), **FP32_TOL)
    q, k = torch.randn(2, 2, 3, 13, 8, device=DEVICE), torch.randn(2, 2, 3, 13, 8, device=DEVICE)
    torch.testing.assert_close(propagate_cam_qk(cam, q, k, 4, weights, impl="triton"),
                               propagate_cam_qk_reference(cam, q, k, 4, weights), **FP32_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 tensor-core dots need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_core_dots_on_cuda(dtype):
    # the default CUDA path: TF32 for fp32 logits (10-bit mantissa) and half q·k with fp32
    # accumulation; the propagated CAM is a weighted mean, so its relative error stays ~1e-3
    torch.set_float32_matmul_precision("high")  # as wsss's tf32 config; the fixture restores it
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 6, 220, 64, device=DEVICE).to(dtype) for _ in range(2))
    cam = torch.rand(2, 20, 10, 20, device=DEVICE)
    out = propagate_cam_qk(cam, q, k, 20, impl="triton")
    ref = propagate_cam_qk_reference(cam, q, k, 20)
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3 * ref.abs().max().item())


@needs_triton
def test_propagate_triton_gradients_via_composition():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 2, 8, 8, device=DEVICE, requires_grad=True)
    cam = torch.rand(1, 3, 2, 3, device=DEVICE, requires_grad=True)
    out = propagate_cam(cam, x, 2, impl="triton")
    ref = propagate_cam_reference(cam, x, 2)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for a, b in zip(torch.autograd.grad(out.sum(), (cam, x)), torch.autograd.grad(ref.sum(), (cam, x))):
        torch.testing.assert_close(a, b, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_half_inputs(dtype, tol):
    # both paths upcast the same half inputs and return fp32, so they agree to fp32 rounding
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 2, 2, 14, 14, device=DEVICE)).to(dtype)
    cam = torch.rand(2, 4, 3, 4, device=DEVICE).to(dtype)
    q, k = torch.randn(2, 2, 2, 14, 8, device=DEVICE).to(dtype), torch.randn(2, 2, 2, 14, 8, device=DEVICE).to(dtype)
    torch.testing.assert_close(aggregate_attention(x, impl="triton"), aggregate_attention_reference(x),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(propagate_cam(cam, x, 2, impl="triton"), propagate_cam_reference(cam, x, 2),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(propagate_cam_qk(cam, q, k, 2, impl="triton"),
                               propagate_cam_qk_reference(cam, q, k, 2), rtol=tol, atol=tol)
    xg = x.detach().requires_grad_()
    g = torch.randn(2, 14, 14, device=DEVICE)
    a, = torch.autograd.grad(aggregate_attention(xg, impl="triton"), xg, g)
    b, = torch.autograd.grad(aggregate_attention_reference(xg), xg, g)
    assert a.dtype == dtype
    # gradient rounded to the input dtype (bf16: 8 mantissa bits, fp16: 11)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@needs_triton
def test_gradcheck_and_opcheck_triton_aggregate():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 1, 4, 4, dtype=torch.double, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: aggregate_attention(a, [0.5, 2.0], impl="triton"), (x,))
    coef = torch.tensor([0.25, 0.5], dtype=torch.double, device=DEVICE)
    torch.library.opcheck(attention_module._aggregate_op, (x, coef),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    cam = torch.rand(1, 2, 1, 2, dtype=torch.double, device=DEVICE)
    torch.library.opcheck(attention_module._propagate_op, (cam, x.detach(), coef, 2),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_logits_average_the_cam(impl):
    # equal logits: every row of the softmax is uniform over T, so the patch block is 1/T each
    cam = torch.rand(1, 2, 3, 3, device=DEVICE)
    x = torch.zeros(2, 1, 2, 11, 11, device=DEVICE)
    out = propagate_cam(cam, x, 2, impl=impl)
    expected = cam.sum(dim=(2, 3), keepdim=True).expand_as(cam) / 11
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("call, error, match", [
    (lambda: aggregate_attention(torch.randn(2, 1, 2, 5, 4)), ValueError, "attn_logits must be a non-empty"),
    (lambda: aggregate_attention(torch.randn(1, 2, 5, 5)), ValueError, "attn_logits must have 5 dims"),
    (lambda: aggregate_attention(torch.randint(0, 3, (1, 1, 1, 5, 5))), TypeError, "floating point"),
    (lambda: aggregate_attention(torch.randn(2, 1, 2, 5, 5), [1.0]), ValueError, "one number per layer \\(L=2\\)"),
    (lambda: aggregate_attention(torch.randn(1, 1, 2, 5, 5), [float("nan")]), ValueError, "finite"),
    (lambda: aggregate_attention(torch.randn(1, 1, 2, 5, 5), impl="gpu"), ValueError, "impl must be one of"),
    (lambda: propagate_cam(torch.rand(1, 2, 2, 2), torch.randn(1, 1, 1, 7, 7), 2), ValueError,
     "num_class_tokens \\+ h·w = T=7"),
    (lambda: propagate_cam(torch.rand(2, 2, 2, 2), torch.randn(1, 1, 1, 6, 6), 2), ValueError, "B=1"),
    (lambda: propagate_cam(torch.rand(1, 2, 2, 2), torch.randn(1, 1, 1, 6, 6), -2), ValueError,
     "num_class_tokens must be an integer >= 0"),
    (lambda: propagate_cam(torch.rand(1, 2, 4), torch.randn(1, 1, 1, 6, 6), 2), ValueError, "cam must have 4 dims"),
    (lambda: propagate_cam_qk(torch.rand(1, 2, 2, 2), torch.randn(1, 1, 1, 6, 4), torch.randn(1, 1, 1, 6, 3), 2),
     ValueError, "same non-empty"),
    (lambda: propagate_cam_qk(torch.rand(1, 2, 2, 2), torch.randn(1, 1, 1, 6, 4), torch.randn(1, 1, 1, 6, 4), 2,
                              scale=float("nan")), ValueError, "scale must be a finite number"),
])
def test_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()
