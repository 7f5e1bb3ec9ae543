"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the
interpreter switch must be set before any wsss.kernels module is imported: on a machine
without CUDA the Triton kernels run under TRITON_INTERPRET=1 against the references.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
