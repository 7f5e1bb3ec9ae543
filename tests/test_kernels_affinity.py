"""Affinity labels, the ptc loss (SPEC §3.2) and the AReAM sigmoid affinity loss (SPEC §5):
references against per-pair loops, Triton kernels (interpreted on CPU) against the references."""
import pytest
import torch
from conftest import DEVICE

from wsss.kernels import (HAS_TRITON, affinity_labels, head_mean_logits, masked_cosine_affinity_loss,
                          masked_cosine_affinity_loss_reference, masked_sigmoid_affinity_loss,
                          masked_sigmoid_affinity_loss_qk, masked_sigmoid_affinity_loss_qk_reference,
                          masked_sigmoid_affinity_loss_reference)
from wsss.kernels import affinity as affinity_module

needs_triton = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips
IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]
# fp32: the kernels sum tile partials in a different order than torch (and the dot products over
# D in blocks), so ~1e-6 relative; gradients are O(1/#pairs), hence the small atol.
FP32_TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(autouse=True)
def _ieee(ieee_fp32_dots):
    """FP32_TOL holds on CUDA too: fp32 products in IEEE fp32 (conftest.ieee_fp32_dots)."""


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


def _random_labels(B, h, w, classes=3, ignored=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (B, h, w), generator=g)
    lab.view(-1)[torch.randperm(lab.numel(), generator=g)[:ignored]] = 255
    return lab.to(DEVICE)


@pytest.mark.parametrize("diag", [True, False])
def test_affinity_labels(diag):
    lab = _random_labels(2, 3, 5).cpu()
    out = affinity_labels(lab, ignore_diagonal=diag)
    assert out.dtype == torch.int64 and out.shape == (2, 15, 15)
    assert torch.equal(out, _labels_loops(lab, diag=diag))


def _pair_loss_loops(score, lab, sim, diag, cosine):
    aff = _labels_loops(lab.cpu(), diag=diag)
    pos_sum = neg_sum = pos_n = neg_n = 0
    B, N, _ = score.shape
    for b in range(B):
        for i in range(N):
            for j in range(N):
                s = sim(score[b, i, j])
                if aff[b, i, j] == 1:
                    pos_sum, pos_n = pos_sum + (s if cosine else 1 - s), pos_n + 1
                elif aff[b, i, j] == 0:
                    neg_sum, neg_n = neg_sum + s, neg_n + 1
    pos = pos_sum / (pos_n + 1)
    return 0.5 * ((1 - pos) if cosine else pos) + 0.5 * neg_sum / (neg_n + 1)


@pytest.mark.parametrize("shape", [(1, 4, 2, 3), (2, 5, 3, 3)])
def test_ptc_reference_matches_loops_and_gradcheck(shape):
    torch.manual_seed(0)
    feats = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    lab = _random_labels(shape[0], *shape[2:], ignored=1).cpu()
    f = feats.flatten(2)
    cos = torch.cosine_similarity(f.unsqueeze(3), f.unsqueeze(2), dim=1, eps=1e-8)
    expected = _pair_loss_loops(cos, lab, torch.abs, True, True)
    torch.testing.assert_close(masked_cosine_affinity_loss_reference(feats, lab), expected)
    assert torch.autograd.gradcheck(lambda x: masked_cosine_affinity_loss_reference(x, lab), (feats,))


@pytest.mark.parametrize("diag", [False, True])
def test_sigmoid_reference_matches_loops_and_gradcheck(diag):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 6, dtype=torch.double, requires_grad=True)
    lab = _random_labels(2, 2, 3, ignored=1).cpu()
    expected = _pair_loss_loops(logits, lab, torch.sigmoid, diag, False)
    torch.testing.assert_close(masked_sigmoid_affinity_loss_reference(logits, lab, ignore_diagonal=diag), expected)
    assert torch.autograd.gradcheck(
        lambda x: masked_sigmoid_affinity_loss_reference(x, lab, ignore_diagonal=diag), (logits,))


def test_qk_reference_is_the_head_mean_of_scaled_logits():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 4, dtype=torch.double), torch.randn(2, 3, 6, 4, dtype=torch.double)
    per_head = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0  # scale 1/√dh
    torch.testing.assert_close(head_mean_logits(q, k), per_head.mean(1))
    # over the concatenated head dims: Q·Kᵀ / (Hd·√dh)
    qc, kc = q.transpose(1, 2).reshape(2, 6, 12), k.transpose(1, 2).reshape(2, 6, 12)
    torch.testing.assert_close(head_mean_logits(q, k), qc @ kc.transpose(1, 2) / (3 * 2.0))


# ---------------------------------------------------------------------------------------------- triton
@needs_triton
@pytest.mark.parametrize("B,D,h,w", [(2, 20, 5, 7), (1, 3, 1, 1), (3, 33, 9, 9)])
def test_cosine_triton_matches_reference(B, D, h, w):
    torch.manual_seed(0)
    feats = torch.randn(B, D, h, w, device=DEVICE, requires_grad=True)
    lab = _random_labels(B, h, w)
    out = masked_cosine_affinity_loss(feats, lab, impl="triton")
    ref = masked_cosine_affinity_loss_reference(feats, lab)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g_out, = torch.autograd.grad(out, feats)
    g_ref, = torch.autograd.grad(ref, feats)
    torch.testing.assert_close(g_out, g_ref, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("B,h,w", [(2, 5, 7), (1, 1, 1), (1, 13, 11)])  # 143 tokens: two 128-row tiles
def test_sigmoid_triton_matches_reference(B, h, w, diag):
    torch.manual_seed(0)
    N = h * w
    logits = (3 * torch.randn(B, N, N, device=DEVICE)).requires_grad_()
    lab = _random_labels(B, h, w)
    out = masked_sigmoid_affinity_loss(logits, lab, ignore_diagonal=diag, impl="triton")
    ref = masked_sigmoid_affinity_loss_reference(logits, lab, ignore_diagonal=diag)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    torch.testing.assert_close(torch.autograd.grad(out, logits)[0], torch.autograd.grad(ref, logits)[0], **FP32_TOL)


@needs_triton
def test_sigmoid_triton_non_contiguous_logits():
    torch.manual_seed(0)
    base = torch.randn(2, 12, 12, device=DEVICE, requires_grad=True)
    logits = base.transpose(1, 2)
    lab = _random_labels(2, 3, 4)
    out = masked_sigmoid_affinity_loss(logits, lab, impl="triton")
    ref = masked_sigmoid_affinity_loss_reference(logits, lab)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    torch.testing.assert_close(torch.autograd.grad(out, base)[0], torch.autograd.grad(ref, base)[0], **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("B,Hd,h,w,dh", [(2, 3, 5, 7, 8), (1, 2, 3, 3, 5)])
def test_qk_triton_equals_materialised(B, Hd, h, w, dh, diag):
    torch.manual_seed(0)
    q = torch.randn(B, Hd, h * w, dh, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hd, h * w, dh, device=DEVICE, requires_grad=True)
    lab = _random_labels(B, h, w)
    out = masked_sigmoid_affinity_loss_qk(q, k, lab, ignore_diagonal=diag, scale=0.3, impl="triton")
    ref = masked_sigmoid_affinity_loss(head_mean_logits(q, k, 0.3), lab, ignore_diagonal=diag, impl="reference")
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g_out = torch.autograd.grad(out, (q, k))
    g_ref = torch.autograd.grad(ref, (q, k))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


@needs_triton
def test_small_blocks_cover_multi_tile_loops(monkeypatch):
    # force 16-wide tiles so N, D and the backward's output columns each span several blocks
    fwd, bwd = affinity_module._dot_fwd_config, affinity_module._dot_bwd_config
    small = dict(BLOCK_I=16, BLOCK_J=16)
    monkeypatch.setattr(affinity_module, "_dot_fwd_config", lambda *a: dict(fwd(*a), **small, BLOCK_D=16))
    monkeypatch.setattr(affinity_module, "_dot_bwd_config", lambda *a: dict(bwd(*a), **small, BLOCK_DO=16))
    torch.manual_seed(0)
    q = torch.randn(1, 2, 35, 20, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 35, 20, device=DEVICE, requires_grad=True)
    lab = _random_labels(1, 5, 7)
    out = masked_sigmoid_affinity_loss_qk(q, k, lab, impl="triton")
    ref = masked_sigmoid_affinity_loss_qk_reference(q, k, lab)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for a, b in zip(torch.autograd.grad(out, (q, k)), torch.autograd.grad(ref, (q, k))):
        torch.testing.assert_close(a, b, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("dtype,tol,cos_tol", [(torch.bfloat16, 2e-2, 4e-3), (torch.float16, 2e-3, 5e-4)])
def test_half_inputs(dtype, tol, cos_tol):
    # half q, k and logits enter both paths unchanged (their products are exact in fp32), so those
    # losses agree to fp32 rounding; the ptc loss multiplies the fp32-normalised features rounded
    # to the input dtype (bf16 2^-9, fp16 2^-12 relative: cos_tol). Gradients are cast back to
    # the input dtype (bf16 8 / fp16 11 mantissa bits)
    torch.manual_seed(0)
    lab = _random_labels(2, 4, 5)
    feats = torch.randn(2, 16, 4, 5, device=DEVICE).to(dtype).requires_grad_()
    logits = torch.randn(2, 20, 20, device=DEVICE).to(dtype).requires_grad_()
    q = torch.randn(2, 2, 20, 8, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 20, 8, device=DEVICE).to(dtype).requires_grad_()
    cases = [
        (lambda impl: masked_cosine_affinity_loss(feats, lab, impl=impl), (feats,), cos_tol),
        (lambda impl: masked_sigmoid_affinity_loss(logits, lab, impl=impl), (logits,), 1e-5),
        (lambda impl: masked_sigmoid_affinity_loss_qk(q, k, lab, impl=impl), (q, k), 1e-5),
    ]
    for fn, inputs, loss_tol in cases:
        out, ref = fn("triton"), fn("reference")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=loss_tol, atol=loss_tol / 10)
        for a, b in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
            assert a.dtype == dtype
            scale = b.abs().max().float()
            torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 tensor-core dots need CUDA")
def test_tensor_core_dots_on_cuda():
    # the default CUDA path for fp32: TF32 operands (10-bit mantissa) with fp32 accumulation; the
    # losses average |cos| or σ over ~10⁵ pairs, so the rounding averages out to ~1e-4 relative
    torch.set_float32_matmul_precision("high")  # as wsss's tf32 config; the fixture restores it
    torch.manual_seed(0)
    lab = _random_labels(2, 14, 14, classes=4, ignored=20)
    feats = torch.randn(2, 96, 14, 14, device=DEVICE, requires_grad=True)
    q, k = (torch.randn(2, 6, 196, 64, device=DEVICE, requires_grad=True) for _ in range(2))
    for fn, inputs in [(lambda impl: masked_cosine_affinity_loss(feats, lab, impl=impl), (feats,)),
                       (lambda impl: masked_sigmoid_affinity_loss_qk(q, k, lab, impl=impl), (q, k))]:
        out, ref = fn("triton"), fn("reference")
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


@needs_triton
def test_gradcheck_triton_autograd_functions():
    # float64 end to end (the kernels accumulate in float64 for float64 inputs)
    torch.manual_seed(0)
    lab = _random_labels(1, 2, 3, ignored=1)
    feats = torch.randn(1, 3, 2, 3, dtype=torch.double, device=DEVICE, requires_grad=True)
    logits = torch.randn(1, 6, 6, dtype=torch.double, device=DEVICE, requires_grad=True)
    q = torch.randn(1, 2, 6, 2, dtype=torch.double, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 6, 2, dtype=torch.double, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: masked_cosine_affinity_loss(x, lab, impl="triton"), (feats,))
    assert torch.autograd.gradcheck(
        lambda x: masked_sigmoid_affinity_loss(x, lab, ignore_diagonal=True, impl="triton"), (logits,))
    assert torch.autograd.gradcheck(lambda a, b: masked_sigmoid_affinity_loss_qk(a, b, lab, impl="triton"), (q, k))


@needs_triton
def test_custom_ops_opcheck_and_compile():
    torch.manual_seed(0)
    lab = _random_labels(2, 2, 3)
    x = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(affinity_module._dot_loss_op,
                          (x, y, lab, affinity_module.MODE_SIGMOID, 255, False, 0.5, True, torch.float32))
    logits = torch.randn(2, 6, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(affinity_module._sigmoid_loss_op, (logits, lab, 255, True))
    compiled = torch.compile(lambda z: masked_sigmoid_affinity_loss(z, lab, impl="triton"), backend="aot_eager",
                             fullgraph=True)
    out = compiled(logits)
    out.backward()
    torch.testing.assert_close(out, masked_sigmoid_affinity_loss_reference(logits, lab), **FP32_TOL)
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------- edge cases
def _degenerate_labels(kind):
    if kind == "all_ignore":
        return torch.full((2, 3, 3), 255, device=DEVICE)
    if kind == "one_class":  # no negative pair
        return torch.ones(2, 3, 3, dtype=torch.long, device=DEVICE)
    return torch.arange(18, device=DEVICE).view(2, 3, 3)  # all different: no positive pair


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["all_ignore", "one_class", "all_different"])
def test_degenerate_batches_are_finite_and_connected(kind, impl):
    torch.manual_seed(0)
    lab = _degenerate_labels(kind)
    feats = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    logits = torch.randn(2, 9, 9, device=DEVICE, requires_grad=True)
    q = torch.randn(2, 2, 9, 4, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 9, 4, device=DEVICE, requires_grad=True)
    losses = [
        (masked_cosine_affinity_loss(feats, lab, impl=impl), (feats,)),
        (masked_sigmoid_affinity_loss(logits, lab, impl=impl), (logits,)),
        (masked_sigmoid_affinity_loss_qk(q, k, lab, impl=impl), (q, k)),
    ]
    for loss, inputs in losses:
        assert loss.requires_grad and torch.isfinite(loss)
        for g in torch.autograd.grad(loss, inputs):
            assert g is not None and torch.isfinite(g).all()
            if kind == "all_ignore":
                assert not g.any()
    if kind == "all_ignore":
        assert losses[0][0].item() == 0.5  # 0.5·(1 − 0) + 0.5·0
        assert losses[1][0].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_feature_vectors_give_finite_gradients(impl):
    feats = torch.zeros(1, 4, 2, 2, device=DEVICE, requires_grad=True)
    lab = torch.tensor([[[0, 0], [1, 1]]], device=DEVICE)
    loss = masked_cosine_affinity_loss(feats, lab, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_large_labels(impl):
    torch.manual_seed(0)
    lab = torch.tensor([[[-1, 0, 300], [300, 7, -1]]], device=DEVICE)
    logits = torch.randn(1, 6, 6, device=DEVICE)
    out = masked_sigmoid_affinity_loss(logits, lab, ignore_index=-1, impl=impl)
    expected = _pair_loss_loops(logits.cpu().double(), lab.cpu().masked_fill(lab.cpu() == -1, 255),
                                torch.sigmoid, False, False)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call, error, match", [
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 2, dtype=torch.long)),
     ValueError, "labels must be \\(B,h,w\\)"),
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3)), TypeError, "integer"),
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), -torch.ones(1, 3, 3, dtype=torch.long)),
     ValueError, "negative values \\[-1\\]"),
    (lambda: masked_cosine_affinity_loss(torch.randn(4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)),
     ValueError, "features must have 4 dims"),
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3).long(), torch.zeros(1, 3, 3, dtype=torch.long)),
     TypeError, "features must be floating point"),
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), impl="x"),
     ValueError, "impl must be one of"),
    (lambda: masked_sigmoid_affinity_loss(torch.randn(1, 9, 8), torch.zeros(1, 3, 3, dtype=torch.long)),
     ValueError, "logits must be a non-empty \\(B,N,N\\)"),
    (lambda: masked_sigmoid_affinity_loss(torch.randn(0, 4, 4), torch.zeros(0, 2, 2, dtype=torch.long)),
     ValueError, "non-empty"),
    (lambda: masked_cosine_affinity_loss(torch.randn(1, 0, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)),
     ValueError, "features must not be empty"),
    (lambda: masked_sigmoid_affinity_loss(torch.randn(1, 9, 9), torch.zeros(1, 2, 3, dtype=torch.long)),
     ValueError, "h·w=9"),
    (lambda: masked_sigmoid_affinity_loss(torch.randn(1, 9, 9), torch.zeros(1, 3, 3, dtype=torch.bool)),
     TypeError, "integer"),
    (lambda: masked_sigmoid_affinity_loss(torch.randn(1, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long),
                                          ignore_index=2.5), TypeError, "ignore_index must be an int"),
    (lambda: masked_sigmoid_affinity_loss_qk(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 5),
                                             torch.zeros(1, 3, 3, dtype=torch.long)), ValueError, "same"),
    (lambda: masked_sigmoid_affinity_loss_qk(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4).double(),
                                             torch.zeros(1, 3, 3, dtype=torch.long)), TypeError, "same dtype"),
    (lambda: masked_sigmoid_affinity_loss_qk(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4),
                                             torch.zeros(1, 3, 3, dtype=torch.long), scale=float("inf")),
     ValueError, "scale must be a finite number"),
    (lambda: affinity_labels(torch.zeros(2, 3)), ValueError, "labels must have 3 dims"),
])
def test_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()
