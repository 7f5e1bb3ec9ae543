"""wsss.kernels.costs: the work counts behind the FLOP/byte claims of the kernel docstrings and
benchmarks/results/triton-kernels.md, on small shapes where they can be written out."""
import pytest
import torch

import wsss.kernels as K
from wsss.kernels import costs

needs_triton = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips


def test_counts_a_plain_matmul():
    c = costs.count(lambda dev: (torch.randn(3, 8, 5, device=dev), torch.randn(3, 5, 7, device=dev)),
                    lambda a, b: a @ b)
    assert c.flops == 2 * 3 * 8 * 5 * 7
    assert c.bytes == 4 * 3 * (8 * 5 + 5 * 7 + 8 * 7)  # both inputs read, the product written once
    assert c.peak == 4 * 3 * 8 * 7


@needs_triton
def test_affinity_losses_multiply_no_more_than_their_references():
    B, D, h, w = 2, 16, 4, 5
    N = h * w
    unit = 2 * B * N * N * D  # one product of the (B,N,D) features with themselves

    def feats(dev):
        return torch.randn(B, D, h, w, device=dev, requires_grad=True), torch.randint(0, 3, (B, h, w), device=dev)

    c = costs.compare(feats, lambda impl: (lambda f, lab: K.masked_cosine_affinity_loss(f, lab, impl=impl)),
                      backward=True)
    # fused: forward product + dx (s symmetric: dy = dx); reference: forward + both bmm gradients
    assert (c["triton"].flops, c["reference"].flops) == (2 * unit, 3 * unit)
    assert c["triton"].bytes < c["reference"].bytes

    Hd, dh = 2, 8

    def qk(dev):
        q, k = (torch.randn(B, Hd, N, dh, device=dev, requires_grad=True) for _ in range(2))
        return q, k, torch.randint(0, 3, (B, h, w), device=dev)

    c = costs.compare(qk, lambda impl: (lambda q, k, lab: K.masked_sigmoid_affinity_loss_qk(q, k, lab, impl=impl)),
                      backward=True)
    unit = 2 * B * N * N * Hd * dh
    assert c["triton"].flops == c["reference"].flops == 3 * unit
    assert c["triton"].peak < c["reference"].peak  # no per-head logits


@needs_triton
def test_propagation_counts_its_padded_tiles():
    L, B, Hd, Cc, N, dh = 2, 1, 3, 20, 12, 8
    T = Cc + N

    def inputs(dev):
        return (torch.rand(B, Cc, N, 1, device=dev), torch.randn(L, B, Hd, T, dh, device=dev),
                torch.randn(L, B, Hd, T, dh, device=dev))

    c = costs.compare(inputs, lambda impl: (lambda cam, q, k: K.propagate_cam_qk(cam, q, k, Cc, impl=impl)))
    # one 32-wide class tile: q·k (dh padded to 16) and p·cam (32) for every (layer, head, row, column)
    assert c["triton"].flops == 2 * L * Hd * B * N * T * (16 + 32)
    assert c["reference"].flops == 2 * L * B * Hd * T * T * dh + 2 * B * Cc * N * N
    assert c["triton"].peak < c["reference"].peak
