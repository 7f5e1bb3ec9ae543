"""Models: the multi-token ViT backbone, heads, GCR and the MoRe network."""
from .aream import AReAM, AReAMOutput
from .gcr import GraphCategoryRepresentation
from .more import MoRe, MoReOutput
from .vit import MultiTokenViT, build_backbone, load_pretrained_vit

__all__ = ["AReAM", "AReAMOutput", "GraphCategoryRepresentation", "MoRe", "MoReOutput", "MultiTokenViT", "build_backbone",
           "load_pretrained_vit", "build_model"]


def build_model(model_cfg, num_classes: int):
    """Build the network a ``ModelConfig`` describes (its method decides how, ``wsss.methods``)."""
    from wsss.methods import get_method  # methods sit above models; imported on use

    return get_method(model_cfg.method).build_model(model_cfg, num_classes)
