"""Dispatch and validation shared by the ops of wsss.kernels."""
IMPLS = ("auto", "reference", "triton")
