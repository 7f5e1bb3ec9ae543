"""The MoRe network (SPEC §2) and the single-stage baseline it extends.

``MoRe(gcr=False)`` is the single-stage baseline of the foundation: multi-token ViT,
classifier and auxiliary classifier with global max pooling, CAMs from both, and the
LargeFOV segmentation decoder. With ``gcr=True`` the class tokens are enhanced by the Graph
Category Representation module and give the localisation attention map (LAM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .gcr import GraphCategoryRepresentation
from .heads import LargeFOV, class_activation, conv_classifier, global_max_pool_logits
from .vit import build_backbone, load_pretrained_vit, tokens_to_map


@dataclass
class MoReOutput:
    cls_logits: torch.Tensor  # (B,C)
    aux_cls_logits: torch.Tensor  # (B,C)
    seg_logits: torch.Tensor  # (B,C+1,h,w)
    patch_features: torch.Tensor  # (B,D,h,w) final-normalised
    class_tokens: torch.Tensor  # (B,C,D), after GCR when on
    score_maps: Optional[torch.Tensor]  # (B,C,h,w) detached, from the last block's attention
    aux_features: torch.Tensor  # (B,D,h,w) un-normalised block `aux_layer`


class MoRe(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "vit_base_patch16_224", num_reg_tokens: int = 4,
                 aux_layer: int = -3, gcr: bool = True, pretrained: Optional[str] = None, embed_dim: int = 0,
                 depth: int = 0, num_heads: int = 0, patch_size: int = 0, img_size: int = 0,
                 drop_path_rate: float = 0.0, topk_ratio: float = 0.5, decoder_dim: int = 512):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = num_classes
        self.num_reg_tokens = num_reg_tokens
        self.aux_layer = aux_layer
        self.use_gcr = gcr
        self.backbone = build_backbone(backbone, num_tokens=num_reg_tokens + num_classes,
                                       num_reg_tokens=num_reg_tokens, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads, patch_size=patch_size, img_size=img_size,
                                       drop_path_rate=drop_path_rate)
        if not -self.backbone.depth <= aux_layer < self.backbone.depth:
            raise ValueError(f"aux_layer={aux_layer} outside a {self.backbone.depth}-block backbone")
        D = self.backbone.embed_dim
        self.classifier = conv_classifier(D, num_classes)
        self.aux_classifier = conv_classifier(D, num_classes)
        self.decoder = LargeFOV(D, num_classes + 1, mid_planes=decoder_dim)
        self.graph_layer = GraphCategoryRepresentation(D, topk_ratio) if gcr else None
        if pretrained:
            load_pretrained_vit(self.backbone, pretrained)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def param_groups(self):
        """Backbone non-norm, backbone norm, classifiers, GCR, decoder (SPEC §3.7)."""
        bb_norm, bb_other = [], []
        for name, p in self.backbone.named_parameters():
            (bb_norm if "norm" in name else bb_other).append(p)
        heads = list(self.classifier.parameters()) + list(self.aux_classifier.parameters())
        gcr = list(self.graph_layer.parameters()) if self.graph_layer is not None else []
        return [bb_other, bb_norm, heads, gcr, list(self.decoder.parameters())]

    def _encode(self, x, attn_layers=()):
        out = self.backbone(x, aux_layer=self.aux_layer, attn_layers=attn_layers)
        feats = tokens_to_map(out.patches, out.grid)
        aux = tokens_to_map(out.aux_patches, out.grid)
        class_tokens = out.tokens[:, self.num_reg_tokens:]
        return out, feats, aux, class_tokens

    def forward(self, x: torch.Tensor, with_score_maps: bool = True) -> MoReOutput:
        out, feats, aux, class_tokens = self._encode(x, attn_layers=(-1,) if with_score_maps else ())
        score_maps = None
        if with_score_maps:
            R, C = self.num_reg_tokens, self.num_classes
            logits = out.attn_logits[self.backbone.depth - 1]  # (B,Hd,T0+N,T0+N)
            cls_to_patch = logits[:, :, R:R + C, R + C:].sum(dim=1)  # heads summed (SPEC §2)
            h, w = out.grid
            score_maps = cls_to_patch.reshape(x.shape[0], C, h, w).detach()
        if self.graph_layer is not None:
            class_tokens = self.graph_layer(class_tokens, out.patches)
        return MoReOutput(
            cls_logits=global_max_pool_logits(self.classifier, feats),
            aux_cls_logits=global_max_pool_logits(self.aux_classifier, aux),
            seg_logits=self.decoder(feats),
            patch_features=feats,
            class_tokens=class_tokens,
            score_maps=score_maps,
            aux_features=aux,
        )

    @torch.no_grad()
    def cams(self, x: torch.Tensor):
        """(cam_aux, cam), each (B,C,h,w), raw (no ReLU)."""
        _, feats, aux, _ = self._encode(x)
        return class_activation(self.aux_classifier, aux), class_activation(self.classifier, feats)

    @torch.no_grad()
    def lam(self, x: torch.Tensor) -> torch.Tensor:
        """Localisation attention map F · class_tokens (after GCR when on), (B,C,h,w)."""
        out, feats, _, class_tokens = self._encode(x)
        if self.graph_layer is not None:
            class_tokens = self.graph_layer(class_tokens, out.patches)
        return torch.einsum("bdhw,bcd->bchw", feats, class_tokens)

    # --- official checkpoint layout (SPEC §2) -------------------------------------------------

    @classmethod
    def from_official_state_dict(cls, state_dict: dict, num_heads: int = 0, aux_layer: int = -3,
                                 **arch) -> "MoRe":
        """Build a MoRe from a state dict saved by the official code and load it.

        The architecture is read from the tensors (classes, tokens, width, depth, patch size,
        pretraining grid, GCR, decoder width); ``num_heads`` cannot be and defaults to
        ``embed_dim // 64`` (12 for ViT-B). ``arch`` may override any constructor argument.
        DDP's ``module.`` prefix is stripped; ``encoder.head.*`` (unused) is dropped.
        """
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        for key in ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "classifier.weight"):
            if key not in sd:
                raise ValueError(f"not an official MoRe state dict: missing {key!r}")
        C = sd["classifier.weight"].shape[0]
        T0, D = sd["encoder.cls_token"].shape[1:]
        P = sd["encoder.patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd["encoder.pos_embed"].shape[1] - T0) ** 0.5))
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
        inferred = dict(num_classes=C, num_reg_tokens=T0 - C, embed_dim=D, depth=depth,
                        num_heads=num_heads or D // 64, patch_size=P, img_size=grid * P, aux_layer=aux_layer,
                        gcr=any(k.startswith("graph_layer.") for k in sd), backbone="custom",
                        decoder_dim=sd["decoder.conv6.weight"].shape[0] if "decoder.conv6.weight" in sd else 512)
        inferred.update(arch)
        model = cls(**inferred)
        ours = {}
        for k, v in sd.items():
            if k.startswith("encoder.head."):
                continue
            ours["backbone." + k[len("encoder."):] if k.startswith("encoder.") else k] = v
        missing, unexpected = model.load_state_dict(ours, strict=False)
        if missing or unexpected:
            def official(keys):  # name keys as the official file does
                return [("encoder." + k[len("backbone."):] if k.startswith("backbone.") else k) for k in keys[:8]]

            raise ValueError(f"official state dict does not fit: missing {official(missing)}, "
                             f"unexpected {official(unexpected)}")
        return model

    def official_state_dict(self) -> dict:
        """The inverse of :meth:`from_official_state_dict`: keys as the official code saves them
        (``encoder.head`` and GCR's unused ``_fc1`` included as zeros so the official model loads it
        strictly)."""
        out = {}
        for k, v in self.state_dict().items():
            out["encoder." + k[len("backbone."):] if k.startswith("backbone.") else k] = v.detach().clone()
        T0, D = self.backbone.cls_token.shape[1:]
        out["encoder.head.weight"] = torch.zeros(T0, D)
        out["encoder.head.bias"] = torch.zeros(T0)
        if self.graph_layer is not None:
            out.update({f"graph_layer.{k}": v for k, v in self.graph_layer.official_extra_state().items()})
        return out
