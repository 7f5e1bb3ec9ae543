"""Hot-path ops of wsss: PAR, the masked affinity losses, attention aggregation / CAM propagation.

Each op has a PyTorch ``*_reference`` (the specification in code) and takes
``impl="auto"|"reference"|"triton"``: ``auto`` runs the Triton kernels on CUDA tensors and the
reference elsewhere; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``. Importing this
package does not need triton.

Every kernel is launched through ``_common.launch`` (under its tensors' device) with a
configuration that is a pure function of (shape, dtype, device type); ``wsss.kernels.aot``
compiles those configurations for sm_80/sm_90 without a GPU and ``wsss.kernels.costs`` counts
the work of both paths (benchmarks/triton_report.py writes both to
benchmarks/results/triton-kernels.md).
"""
from ._common import HAS_TRITON
from .affinity import (affinity_labels, head_mean_logits, masked_cosine_affinity_loss,
                       masked_cosine_affinity_loss_reference, masked_sigmoid_affinity_loss,
                       masked_sigmoid_affinity_loss_qk, masked_sigmoid_affinity_loss_qk_reference,
                       masked_sigmoid_affinity_loss_reference)
from .attention import (aggregate_attention, aggregate_attention_reference, attention_logits_from_qk, propagate_cam,
                        propagate_cam_qk, propagate_cam_qk_reference, propagate_cam_reference)
from .par import par_affinity_reference, par_refine, par_refine_reference

__all__ = [
    "HAS_TRITON",
    "affinity_labels",
    "aggregate_attention", "aggregate_attention_reference",
    "attention_logits_from_qk", "head_mean_logits",
    "masked_cosine_affinity_loss", "masked_cosine_affinity_loss_reference",
    "masked_sigmoid_affinity_loss", "masked_sigmoid_affinity_loss_reference",
    "masked_sigmoid_affinity_loss_qk", "masked_sigmoid_affinity_loss_qk_reference",
    "par_affinity_reference", "par_refine", "par_refine_reference",
    "propagate_cam", "propagate_cam_reference", "propagate_cam_qk", "propagate_cam_qk_reference",
]
