"""The AReAM network (SPEC §5): an MCTformer-V2-style multi-class-token ViT.

C class tokens (no regularisation tokens) in front of the patch tokens; class scores are the
mean over D of the last block's class tokens, patch scores the average-pooled output of a 3×3
conv head on the last block's patch tokens, and the CAM is that head's output after ReLU. As in
MCTformer-V2 there is no final LayerNorm: the mean over D of a LayerNorm output is its bias
mean whatever the input, so the class scores read the residual stream itself. ``forward`` can return
the queries and keys of chosen layers, from which the affinity loss and the CAM re-activation
are computed without a T×T attention matrix (``wsss.kernels``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .vit import build_backbone, load_pretrained_vit, tokens_to_map


@dataclass
class AReAMOutput:
    cls_logits: torch.Tensor  # (B,C) mean over D of the final class tokens
    patch_logits: torch.Tensor  # (B,C) average-pooled patch head
    cam: torch.Tensor  # (B,C,h,w) patch head output, raw (no ReLU)
    qk: Dict[int, tuple] = field(default_factory=dict)  # layer -> (q, k) (B,Hd,C+N,dh)


class AReAM(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "deit_small_patch16_224", pretrained: Optional[str] = None,
                 embed_dim: int = 0, depth: int = 0, num_heads: int = 0, patch_size: int = 0, img_size: int = 0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, num_tokens=num_classes, num_reg_tokens=0, embed_dim=embed_dim,
                                       depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size,
                                       drop_path_rate=drop_path_rate)
        self.backbone.norm = nn.Identity()
        D = self.backbone.embed_dim
        self.head = nn.Conv2d(D, num_classes, 3, padding=1)  # PyTorch's default init, as MCTformer
        # Per-layer attention entropies in bits (SPEC §5), the raw values before min-max
        # normalisation; `entropy_updates` counts the estimates folded in (0 = none yet).
        self.register_buffer("layer_entropy", torch.zeros(self.backbone.depth))
        self.register_buffer("entropy_updates", torch.zeros((), dtype=torch.long))
        if pretrained:
            load_pretrained_vit(self.backbone, pretrained)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def depth(self) -> int:
        return self.backbone.depth

    @property
    def attn_scale(self) -> float:
        return self.backbone.blocks[0].attn.scale

    def param_groups(self):
        """Backbone non-norm, backbone norm, patch head."""
        bb_norm, bb_other = [], []
        for name, p in self.backbone.named_parameters():
            (bb_norm if "norm" in name else bb_other).append(p)
        return [bb_other, bb_norm, list(self.head.parameters())]

    def forward(self, x: torch.Tensor, qk_layers: Iterable[int] = ()) -> AReAMOutput:
        out = self.backbone(x, aux_layer=-1, qk_layers=qk_layers)
        cam = self.head(tokens_to_map(out.patches, out.grid))
        return AReAMOutput(cls_logits=out.tokens.mean(dim=-1), patch_logits=F.adaptive_avg_pool2d(cam, 1).flatten(1),
                           cam=cam, qk=out.qk)

    @torch.no_grad()
    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) raw CAM of the patch head."""
        return self.forward(x).cam

    @torch.no_grad()
    def cam_and_qk(self, x: torch.Tensor):
        """(ReLU CAM (B,C,h,w), q, k (L,B,Hd,C+N,dh)) with every layer's queries and keys."""
        out = self.forward(x, qk_layers=range(self.depth))
        q = torch.stack([out.qk[i][0] for i in range(self.depth)])
        k = torch.stack([out.qk[i][1] for i in range(self.depth)])
        return F.relu(out.cam), q, k

    # --- layer entropies (SPEC §5) -------------------------------------------------------------

    def layer_weights(self, mode: str):
        """(refinement weights, loss weights), each (L,): ``1 − ê`` and ``ê`` with ``ê`` the
        min-max normalised entropies; ones for ``mode="none"``."""
        if mode == "none":
            ones = torch.ones(self.depth, device=self.layer_entropy.device)
            return ones, ones
        if mode not in ("offline", "online"):
            raise ValueError(f"entropy mode must be offline, online or none, got {mode!r}")
        if int(self.entropy_updates) == 0:
            raise RuntimeError(f"entropy mode {mode!r} but the model holds no layer entropies yet "
                               "(offline: aream.entropy_file; online: estimated from the first affinity step)")
        from wsss.cam import normalize_entropy

        e = normalize_entropy(self.layer_entropy)
        return 1.0 - e, e

    @torch.no_grad()
    def update_layer_entropy(self, estimate: torch.Tensor, momentum: float) -> None:
        """Fold a per-layer estimate (L,) in bits into the running mean (averaged over DDP ranks)."""
        estimate = estimate.detach().float().to(self.layer_entropy.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        if int(self.entropy_updates) == 0:
            self.layer_entropy.copy_(estimate)
        else:
            self.layer_entropy.mul_(momentum).add_(estimate, alpha=1.0 - momentum)
        self.entropy_updates += 1

    def load_layer_entropy(self, path) -> None:
        """Load the per-layer entropies written by ``python -m wsss.tools.layer_entropy``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aream.entropy_file not found: {path} (write it with "
                                    "python -m wsss.tools.layer_entropy --cfg ... --ckpt ...)")
        try:
            values = json.loads(path.read_text())["entropy_bits"]
            values = torch.tensor([float(v) for v in values])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a layer-entropy file ({e})") from None
        if values.numel() != self.depth or not torch.isfinite(values).all():
            raise ValueError(f"{path}: expected {self.depth} finite per-layer entropies, got {values.tolist()}")
        self.layer_entropy.copy_(values)
        self.entropy_updates.fill_(1)
