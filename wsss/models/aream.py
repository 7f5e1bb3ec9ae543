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
import math
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

    def no_weight_decay(self) -> set:
        """Parameter names without weight decay besides biases and 1-D weights (timm's
        ``create_optimizer_v2`` reads this): the position embeddings and the class tokens, as the
        official model's ``no_weight_decay()`` (SPEC §5)."""
        return {"backbone." + name for name in self.backbone.no_weight_decay()}

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
            raise ValueError(f"entropy mode (aream.entropy) must be offline, online or none, got {mode!r}")
        if not getattr(self, "_entropy_known", False):  # read the counter once, not every step
            if int(self.entropy_updates) == 0:
                raise RuntimeError(f"entropy mode {mode!r} but the model holds no layer entropies yet "
                                   "(offline: aream.entropy_file; online: estimated from the first affinity step)")
            self._entropy_known = True
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
        # the first estimate is taken as it is, later ones folded in (decided on the device: no sync)
        running = self.layer_entropy * momentum + estimate * (1.0 - momentum)
        self.layer_entropy.copy_(torch.where(self.entropy_updates == 0, estimate, running))
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._entropy_known = False  # a loaded counter may be 0: check it again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- official checkpoint layout (SPEC §5, MCTformer-V2) -------------------------------------

    # The official model's final LayerNorm, inherited from timm's base class, which MCTformer-V2's
    # forward never calls (see the module doc). In the split layout the base class's single-token
    # ``pos_embed`` (1,1+N,D) is unused too; it is dropped with the position entries.
    OFFICIAL_UNUSED = ("norm.weight", "norm.bias")
    # Buffers of this module that official checkpoints do not have (entropies come from a file).
    _LOCAL_BUFFERS = ("layer_entropy", "entropy_updates")

    @classmethod
    def from_official_state_dict(cls, state_dict: dict, num_heads: int = 0, **arch) -> "AReAM":
        """Build an AReAM from a state dict saved by the official AReAM / MCTformer-V2 code
        (``deit_small_MCTformerV2_patch16_224``, the ``model`` entry of its checkpoint) and load it.

        Two position-embedding layouts exist. *Joint* (AReAM's ``networks/mctformer.py`` and
        MCTformer's ``models.py``): ``pos_embed`` (1,C+N,D) = [class positions; patch positions],
        exactly this backbone's. *Split* (later MCTformer-family code): ``pos_embed_cls`` (1,C,D) and
        ``pos_embed_pat`` (1,N,D), beside timm's unused ``pos_embed`` (1,1+N,D). Both give
        ``backbone.pos_embed`` = [class; patch] positions. ``cls_token`` (1,C,D) ->
        ``backbone.cls_token``; ``patch_embed.*``, ``blocks.*`` -> ``backbone.*``; ``head`` (the
        3×3 conv D->C) -> ``head``; ``norm.*`` (never used by MCTformer-V2's forward) is dropped.

        The forward then equals the official one: tokens ``[cls_token + class pos; patches +
        patch pos]``, the same pre-norm blocks (LayerNorm ε 1e-6, scale 1/√dh), no final norm,
        ``class_logits = mean_D(class tokens)``, ``head`` on the patch grid, average pooling. Patch
        positions are resized to other grids with ``scale_factor = (h+0.1)/√N`` bicubic, as the
        joint-layout code does; split-layout code may scale by ``h/√N`` (no +0.1) and in training
        mode adds ``pos_embed_pat`` unresized, so its outputs at sizes other than the pretraining
        grid differ slightly (identical at it). Attention runs fused unless logits are asked for:
        equal up to float rounding.

        The architecture is read from the tensors (classes, width, depth, patch size, pretraining
        grid); ``num_heads`` cannot be and defaults to ``embed_dim // 64`` (6 for DeiT-S). ``arch``
        may override any constructor argument. DDP's ``module.`` prefix is stripped.
        """
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        split = "pos_embed_cls" in sd or "pos_embed_pat" in sd
        required = ["cls_token", "patch_embed.proj.weight", "head.weight"]
        required += ["pos_embed_cls", "pos_embed_pat"] if split else ["pos_embed"]
        absent = [k for k in required if k not in sd]
        if absent:
            raise ValueError(f"not an official AReAM / MCTformer-V2 state dict: missing {absent}")
        head, cls_token = sd["head.weight"], sd["cls_token"]
        if head.dim() != 4 or cls_token.dim() != 3:
            raise ValueError(f"head.weight must be a conv (C,D,3,3) and cls_token (1,C,D), got "
                             f"{tuple(head.shape)} and {tuple(cls_token.shape)}")
        C, D = head.shape[:2]
        if tuple(cls_token.shape) != (1, C, D):
            raise ValueError(f"class count: head.weight {tuple(head.shape)} has {C} classes of width {D}, "
                             f"cls_token {tuple(cls_token.shape)} has {cls_token.shape[1]} tokens of width "
                             f"{cls_token.shape[2]}")
        if split:
            class_pos, patch_pos = sd["pos_embed_cls"], sd["pos_embed_pat"]
            if class_pos.shape[1] != C:
                raise ValueError(f"class count: pos_embed_cls {tuple(class_pos.shape)} holds {class_pos.shape[1]} "
                                 f"class positions, head.weight has {C} classes")
        else:
            class_pos, patch_pos = sd["pos_embed"][:, :C], sd["pos_embed"][:, C:]
        grid = math.isqrt(patch_pos.shape[1])
        if grid * grid != patch_pos.shape[1] or grid == 0:
            source = "pos_embed_pat" if split else f"pos_embed after its {C} class positions"
            raise ValueError(f"{source}: {patch_pos.shape[1]} patch positions do not form a square grid")
        P = sd["patch_embed.proj.weight"].shape[-1]
        blocks = [int(k.split(".")[1]) for k in sd if k.startswith("blocks.")]
        inferred = dict(num_classes=C, backbone="custom", embed_dim=D, depth=1 + max(blocks, default=-1),
                        num_heads=num_heads or D // 64, patch_size=P, img_size=grid * P)
        inferred.update(arch)
        if not inferred["num_heads"] or D % inferred["num_heads"]:
            raise ValueError(f"num_heads={inferred['num_heads']} does not divide the width {D}; pass num_heads")
        model = cls(**inferred)
        positions = {"pos_embed", "pos_embed_cls", "pos_embed_pat"} if split else {"pos_embed"}
        unused = set(cls.OFFICIAL_UNUSED) | positions  # positions are handled below
        ours, names = {}, {}
        for k, v in sd.items():
            if k in unused:
                continue
            key = "backbone." + k if k == "cls_token" or k.startswith(("patch_embed.", "blocks.")) else k
            ours[key], names[key] = v, k
        ours["backbone.pos_embed"] = torch.cat([class_pos, patch_pos], dim=1)
        names["backbone.pos_embed"] = "pos_embed_cls/pos_embed_pat" if split else "pos_embed"
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [m for m in missing if m not in cls._LOCAL_BUFFERS]
        if missing or unexpected:
            official = [m[len("backbone."):] if m.startswith("backbone.") else m for m in missing]
            raise ValueError(f"official AReAM state dict does not fit: missing {official[:8]}, "
                             f"unexpected {[names.get(u, u) for u in unexpected][:8]}")
        return model

    def official_state_dict(self, layout: str = "joint") -> dict:
        """The inverse of :meth:`from_official_state_dict`: keys as the official code saves them
        (its ``model`` entry). ``layout="joint"`` (AReAM's code) or ``"split"``; the unused
        entries (``norm``, and the split layout's base ``pos_embed``) are written as an identity
        LayerNorm and zeros so the official model loads the dict strictly."""
        if layout not in ("joint", "split"):
            raise ValueError(f"layout must be 'joint' or 'split', got {layout!r}")
        bb, C = self.backbone, self.num_classes
        D = bb.embed_dim
        out = {}
        for k, v in bb.state_dict().items():
            if k == "pos_embed" and layout == "split":
                out["pos_embed_cls"] = v[:, :C].detach().clone()
                out["pos_embed_pat"] = v[:, C:].detach().clone()
                out["pos_embed"] = torch.zeros(1, 1 + v.shape[1] - C, D, dtype=v.dtype)
            elif not k.startswith("norm."):
                out[k] = v.detach().clone()
        out["norm.weight"], out["norm.bias"] = torch.ones(D), torch.zeros(D)
        out.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return out

