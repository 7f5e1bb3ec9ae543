"""Models: the multi-token ViT backbone, heads, GCR and the MoRe network."""
from .aream import AReAM, AReAMOutput
from .gcr import GraphCategoryRepresentation
from .more import MoRe, MoReOutput
from .vit import MultiTokenViT, build_backbone, load_pretrained_vit

__all__ = ["AReAM", "AReAMOutput", "GraphCategoryRepresentation", "MoRe", "MoReOutput", "MultiTokenViT", "build_backbone",
           "load_pretrained_vit", "build_model"]


def build_model(model_cfg, num_classes: int):
    """Build the network a ``ModelConfig`` describes."""
    if model_cfg.method in ("more", "baseline"):
        return MoRe(num_classes, backbone=model_cfg.backbone, num_reg_tokens=model_cfg.num_reg_tokens,
                    aux_layer=model_cfg.aux_layer, gcr=model_cfg.gcr and model_cfg.method == "more",
                    pretrained=model_cfg.pretrained or None, embed_dim=model_cfg.embed_dim,
                    depth=model_cfg.depth, num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size,
                    img_size=model_cfg.img_size, drop_path_rate=model_cfg.drop_path,
                    decoder_dim=model_cfg.decoder_dim)
    if model_cfg.method == "aream":
        return AReAM(num_classes, backbone=model_cfg.backbone, pretrained=model_cfg.pretrained or None,
                     embed_dim=model_cfg.embed_dim, depth=model_cfg.depth, num_heads=model_cfg.num_heads,
                     patch_size=model_cfg.patch_size, img_size=model_cfg.img_size,
                     drop_path_rate=model_cfg.drop_path)
    raise ValueError(f"model.method={model_cfg.method!r} is not built yet by this version of wsss")
