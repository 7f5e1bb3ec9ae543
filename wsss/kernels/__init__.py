"""Hot-path ops. Each takes ``impl="auto"|"reference"|"triton"``."""
from .affinity import affinity_labels, masked_cosine_affinity_loss, masked_cosine_affinity_loss_reference
from .par import par_refine, par_refine_reference

__all__ = ["affinity_labels", "masked_cosine_affinity_loss", "masked_cosine_affinity_loss_reference", "par_refine",
           "par_refine_reference"]
