"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the
interpreter switch must be set before any wsss.kernels module is imported: on a machine
without CUDA the Triton kernels run under TRITON_INTERPRET=1 against the references.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_triton: the test runs a Triton kernel; without triton it fails")


def pytest_runtest_setup(item):
    """Triton is a requirement of the suite (requirements.txt): its absence fails, never skips."""
    if item.get_closest_marker("needs_triton"):
        from wsss.kernels import HAS_TRITON

        if not HAS_TRITON:
            pytest.fail("triton is not installed; the test suite requires it (pip install -r requirements.txt)")


@pytest.fixture
def ieee_fp32_dots():
    """fp32 products in IEEE fp32 on CUDA too (the kernels follow torch's matmul precision), so
    fp32 tolerances hold there whatever an earlier test set; TF32 is tested on its own."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)
