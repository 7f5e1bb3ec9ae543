"""DenseEnergyLoss (SPEC §6.1): value and gradient against the plain-PyTorch reference, the
gradient's exact relation to finite differences of the forward, degenerate inputs, AMP,
validation, and CUDA against CPU."""
import pytest
import torch

from wsss.crf import permutohedral_filter
from wsss.crf.energy import (IMAGENET_MEAN, IMAGENET_STD, DenseEnergyLoss, _DenseEnergyFunction, _prepare,
                             dense_energy_loss_reference)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def inputs(B=2, K=3, H=14, W=10, dtype=torch.float64, seed=0, ignore_rows=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g, dtype=dtype)
    logits = torch.randn(B, K, H, W, generator=g, dtype=dtype, requires_grad=True)
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[0, :ignore_rows] = 255
    return images, logits, label


@pytest.mark.parametrize("scale_factor", [0.5, 1.0])
@pytest.mark.parametrize("with_roi", [False, True])
def test_matches_reference(scale_factor, with_roi):
    images, logits, label = inputs(H=14 if scale_factor == 0.5 else 9)
    roi = None
    if with_roi:
        roi = torch.ones_like(label, dtype=torch.float64)
        roi[1, :, :3] = 0  # a crop box
    loss = DenseEnergyLoss(weight=1.0, scale_factor=scale_factor)(images, logits, label, roi)
    grad, = torch.autograd.grad(loss, logits)
    ref = dense_energy_loss_reference(images, logits, label, roi, weight=1.0, scale_factor=scale_factor)
    ref_grad, = torch.autograd.grad(ref, logits)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-14)
    # The module's `weight` scales value and gradient linearly.
    scaled = DenseEnergyLoss(weight=1e-7, scale_factor=scale_factor)(images, logits, label, roi)
    assert torch.allclose(scaled, 1e-7 * loss, rtol=1e-12)


def test_gradient_vs_finite_differences_with_frozen_gate():
    """The gradient is rloss's -2 (w/B) G ⊙ W S (SPEC §6.1 step 5), with the gate G a constant.

    Central differences of the forward f(S) = -(w/B) Σ S ⊙ G ⊙ (W S) with G frozen give the
    exact derivative -(w/B) [G ⊙ W S + Wᵀ (G ⊙ S)]. The two agree only when G is constant
    and W symmetric, and the lattice W is not symmetric (its blur passes do not commute). So the
    check is exact up to that known term, which the transposed lattice filter computes:
        fd = grad + (w/B) [G ⊙ W S - Wᵀ (G ⊙ S)],
    tested to 1e-7 relative in float64 with a non-constant gate (ignored pixels and a roi).
    """
    images, logits, label = inputs(B=2, K=2, H=8, W=10, seed=1)
    roi = torch.ones(2, 8, 10, dtype=torch.float64)
    roi[0, -2:] = 0
    seg, features, gate = _prepare(images, logits, label, roi, 15.0, 100.0, 0.5, 255, IMAGENET_MEAN, IMAGENET_STD)
    S = seg.detach().clone().requires_grad_(True)
    weight = 2.0
    loss = _DenseEnergyFunction.apply(S, features, gate, weight)
    grad, = torch.autograd.grad(loss, S)

    def f(s):
        return _DenseEnergyFunction.apply(s, features, gate, weight)

    eps = 1e-6
    flat = S.detach().reshape(-1)
    fd = torch.zeros_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        fd[i] = (f((flat + step).view_as(S)) - f((flat - step).view_as(S))) / (2 * eps)
    fd = fd.view_as(S)

    B, K, h, w = S.shape
    flat_s = S.detach().permute(0, 2, 3, 1).reshape(B, h * w, K)
    ws = permutohedral_filter(features, flat_s).reshape(B, h, w, K).permute(0, 3, 1, 2)
    gs = (gate.unsqueeze(1) * S.detach()).permute(0, 2, 3, 1).reshape(B, h * w, K)
    wt_gs = permutohedral_filter(features, gs, transpose=True).reshape(B, h, w, K).permute(0, 3, 1, 2)
    correction = (weight / B) * (gate.unsqueeze(1) * ws - wt_gs)
    assert torch.allclose(fd, grad + correction, rtol=1e-7, atol=1e-9)
    # The correction is well above the finite-difference error, so the check tells them apart.
    assert correction.norm() > 1e-3 * fd.norm()


def test_gradient_is_nearly_exact_with_constant_gate():
    # With G ≡ 1 (all pixels ignored) only the lattice asymmetry remains: a few percent.
    images, logits, label = inputs(B=1, K=3, H=8, W=10, seed=2)
    label[:] = 255
    seg, features, gate = _prepare(images, logits, label, None, 15.0, 100.0, 0.5, 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(gate, torch.ones_like(gate))
    S = seg.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(_DenseEnergyFunction.apply(S, features, gate, 1.0), S)
    B, K, h, w = S.shape
    flat_s = S.detach().permute(0, 2, 3, 1).reshape(B, h * w, K)
    exact = -(permutohedral_filter(features, flat_s) + permutohedral_filter(features, flat_s, transpose=True))
    exact = exact.reshape(B, h, w, K).permute(0, 3, 1, 2)
    assert (grad - exact).norm() <= 0.06 * exact.norm()


def test_gradcheck_where_the_rloss_gradient_is_exact():
    """torch.autograd.gradcheck of the whole module w.r.t. the logits (softmax, downscale, roi,
    the autograd function) in the configuration where the rloss gradient is the true one: gate
    constant (all pixels ignored) and W symmetric — a constant-colour image with sigma_xy so
    large that every pixel lands in the same simplex, which makes W a constant matrix."""
    images = torch.full((1, 3, 8, 6), 0.3, dtype=torch.float64)
    logits = torch.randn(1, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    label = torch.full((1, 8, 6), 255)
    roi = torch.ones(1, 8, 6, dtype=torch.float64)
    roi[0, :, :2] = 0
    module = DenseEnergyLoss(weight=1.0, sigma_xy=1e6)
    assert torch.autograd.gradcheck(lambda x: module(images, x, label, roi), (logits,), eps=1e-6, atol=1e-8)


def test_degenerate_inputs_are_finite():
    images, logits, label = inputs(dtype=torch.float32)
    module = DenseEnergyLoss()
    all_ignore = torch.full_like(label, 255)
    loss = module(images, logits, all_ignore)
    grad, = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and loss < 0
    zero_roi = torch.zeros_like(label, dtype=torch.float32)
    loss = module(images, logits, label, zero_roi)
    grad, = torch.autograd.grad(loss, logits)
    assert loss == 0 and (grad == 0).all()
    one_class = torch.randn(2, 1, 14, 10, requires_grad=True)  # K = 1: softmax is 1, gate R - 1 = 0
    loss = module(images, one_class, label.clamp(max=0))
    assert loss == 0 and torch.isfinite(torch.autograd.grad(loss, one_class)[0]).all()


def test_autocast_computes_in_float32():
    images, logits, label = inputs(dtype=torch.float32)
    expected = DenseEnergyLoss()(images, logits, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DenseEnergyLoss()(images.bfloat16(), logits.bfloat16(), label)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=0.05)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_validation():
    images, logits, label = inputs(dtype=torch.float32)
    module = DenseEnergyLoss()
    with pytest.raises(ValueError, match="images"):
        module(images[:, :2], logits, label)
    with pytest.raises(ValueError, match="seg_logits"):
        module(images, logits[..., :5], label)
    with pytest.raises(ValueError, match="label"):
        module(images, logits, label[:, :5])
    with pytest.raises(ValueError, match="roi"):
        module(images, logits, label, torch.ones(2, 3, 3))
    with pytest.raises(TypeError, match="floating"):
        module(images.long(), logits, label)
    with pytest.raises(TypeError, match="label"):
        module(images, logits, label.bool())
    with pytest.raises(TypeError, match="tensor"):
        module(images, logits, label.numpy())
    with pytest.raises(ValueError, match="sigma_xy"):
        DenseEnergyLoss(sigma_xy=0)


@requires_cuda
def test_cuda_matches_cpu():
    images, logits, label = inputs(B=2, K=21, H=64, W=48, dtype=torch.float32)
    module = DenseEnergyLoss()
    loss = module(images, logits, label)
    grad, = torch.autograd.grad(loss, logits)
    logits_cuda = logits.detach().cuda().requires_grad_(True)
    loss_cuda = module(images.cuda(), logits_cuda, label.cuda())
    grad_cuda, = torch.autograd.grad(loss_cuda, logits_cuda)
    assert loss_cuda.device.type == "cuda"
    assert torch.allclose(loss_cuda.cpu(), loss, rtol=1e-4)
    assert torch.allclose(grad_cuda.cpu(), grad, rtol=1e-3, atol=1e-12)


def test_preparation_follows_spec_steps_1_to_3_independently():
    """SPEC §6.1 steps 1-3 written out here without the module's code: de-normalise with the
    literal ImageNet constants ×255; downscale by 0.5 (image, roi, label nearest = every second
    pixel; S bilinear without corners = the 2×2 mean); σ_xy 100 → 50; features
    (x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb) with x the column; gate R − max_k S, 1 where
    ignored, clamped at 0; S·R."""
    images, logits, label = inputs(B=2, K=3, H=8, W=10, seed=3)
    roi = torch.ones(2, 8, 10, dtype=torch.float64)
    roi[1, :, :4] = 0
    seg, features, gate = _prepare(images, logits, label, roi, 15.0, 100.0, 0.5, 255, IMAGENET_MEAN, IMAGENET_STD)

    mean = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float64).view(1, 3, 1, 1)
    rgb = (images * std + mean)[:, :, ::2, ::2]  # nearest at 0.5: source pixel 2i
    S_full = torch.softmax(logits.detach(), dim=1)
    S = S_full.reshape(2, 3, 4, 2, 5, 2).mean(dim=(3, 5))  # 2×2 means
    R = roi[:, ::2, ::2]
    lab = label[:, ::2, ::2]
    G = R - S.max(dim=1).values
    G[lab == 255] = 1.0
    G = G.clamp_min(0)
    h, w = 4, 5
    feats = torch.zeros(2, h, w, 5, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            feats[:, y, x, 0] = x / 50.0
            feats[:, y, x, 1] = y / 50.0
            feats[:, y, x, 2:] = rgb[:, :, y, x] / 15.0
    torch.testing.assert_close(features, feats.reshape(2, h * w, 5))
    torch.testing.assert_close(gate, G)
    torch.testing.assert_close(seg.detach(), S * R[:, None])
    assert (gate[0][lab[0] == 255] == 1).all() and (gate[1][:, :2] == 0).all()
