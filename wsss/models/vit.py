"""Multi-token ViT backbone (SPEC §2) built from timm's layers.

A plain pre-norm ViT whose single class token is replaced by ``num_tokens`` learnable tokens
(regularisation tokens first, then class tokens). One position embedding per token plus the
pretraining patch grid, resized to the input's token grid at run time exactly as the public
MoRe/ToCo code does. Blocks use timm's fused attention (SDPA) except in the layers whose
pre-softmax attention logits the caller asks for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

# Named backbone shapes: (embed_dim, depth, num_heads, patch_size, pretraining img_size).
BACKBONES = {
    "vit_tiny_patch16_224": (192, 12, 3, 16, 224),
    "vit_small_patch16_224": (384, 12, 6, 16, 224),
    "deit_small_patch16_224": (384, 12, 6, 16, 224),
    "vit_base_patch16_224": (768, 12, 12, 16, 224),
    "deit_base_patch16_224": (768, 12, 12, 16, 224),
}


def backbone_shape(name: str, embed_dim=0, depth=0, num_heads=0, patch_size=0, img_size=0):
    """Resolve a named backbone, letting explicit non-zero values override it."""
    if name not in BACKBONES and not all((embed_dim, depth, num_heads, patch_size, img_size)):
        raise ValueError(f"backbone {name!r} is unknown; known: {', '.join(BACKBONES)} "
                         "(or give embed_dim, depth, num_heads, patch_size and img_size)")
    base = BACKBONES.get(name, (0, 0, 0, 0, 0))
    given = (embed_dim, depth, num_heads, patch_size, img_size)
    return tuple(g if g else b for g, b in zip(given, base))


@dataclass
class BackboneOutput:
    tokens: torch.Tensor  # (B,T0,D) final-normalised prepended tokens
    patches: torch.Tensor  # (B,N,D) final-normalised patch tokens
    aux_patches: torch.Tensor  # (B,N,D) un-normalised patch tokens after block `aux_layer`
    attn_logits: Dict[int, torch.Tensor]  # layer -> (B,Hd,T,T) q·kᵀ without the 1/√dh scale
    grid: tuple  # (h, w)
    qk: Dict[int, tuple] = field(default_factory=dict)  # layer -> (q, k), each (B,Hd,T,dh)


def _block_attention(block: Block, x: torch.Tensor, want_logits: bool):
    """Run a timm ``Block``, also returning its attention's ``q``, ``k`` (B,Hd,T,dh) and, with
    ``want_logits``, its logits ``q·kᵀ`` (B,Hd,T,T, without the 1/√dh scale).

    Same arithmetic as ``Block.forward``, so the output equals the fused path up to float
    rounding. Without ``want_logits`` the attention itself runs through SDPA and no T×T tensor
    is kept.
    """
    attn = block.attn
    B, T, _ = x.shape
    y = block.norm1(x)
    qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = None
    if want_logits:
        logits = q @ k.transpose(-2, -1)
        o = attn.attn_drop((logits * attn.scale).softmax(dim=-1)) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                           scale=attn.scale)
    o = o.transpose(1, 2).reshape(B, T, -1)
    o = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(o)))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, q, k, logits


def block_with_logits(block: Block, x: torch.Tensor):
    """Run a timm ``Block`` and also return its attention logits ``q·kᵀ`` (unscaled)."""
    x, _, _, logits = _block_attention(block, x, want_logits=True)
    return x, logits


class MultiTokenViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_tokens=1, num_reg_tokens=0, drop_path_rate=0.0):
        super().__init__()
        if not 0 <= num_reg_tokens <= num_tokens:
            raise ValueError(f"num_reg_tokens={num_reg_tokens} must be in [0, num_tokens={num_tokens}]")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.num_reg_tokens = num_reg_tokens
        self.pretrain_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + self.pretrain_grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth))
        self.norm = norm(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set:
        """timm's convention: parameters the optimizer leaves without weight decay."""
        return {"pos_embed", "cls_token"}

    def patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Patch position embeddings resized to (h,w) as the public code does (SPEC §2)."""
        pos = self.pos_embed[:, self.num_tokens:]
        g = self.pretrain_grid
        if h == g and w == g:
            return pos
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                             align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, aux_layer: int = -3, attn_layers: Iterable[int] = (),
                qk_layers: Iterable[int] = ()) -> BackboneOutput:
        """``attn_layers``: layers whose (B,Hd,T,T) logits are returned; ``qk_layers``: layers
        whose queries and keys are returned instead (their attention stays fused, no T×T)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
        h, w = H // P, W // P
        depth = self.depth
        aux_idx = aux_layer % depth
        want = {i % depth for i in attn_layers}
        want_qk = {i % depth for i in qk_layers}
        patches = self.patch_embed(x) + self.patch_pos_embed(h, w)
        tokens = self.cls_token.expand(x.shape[0], -1, -1) + self.pos_embed[:, :self.num_tokens]
        x = torch.cat([tokens, patches], dim=1)
        logits, qk, aux = {}, {}, None
        for i, blk in enumerate(self.blocks):
            if i in want or i in want_qk:
                x, q, k, lg = _block_attention(blk, x, want_logits=i in want)
                if i in want:
                    logits[i] = lg
                if i in want_qk:
                    qk[i] = (q, k)
            else:
                x = blk(x)
            if i == aux_idx:
                aux = x[:, self.num_tokens:]
        x = self.norm(x)
        return BackboneOutput(tokens=x[:, :self.num_tokens], patches=x[:, self.num_tokens:],
                              aux_patches=aux, attn_logits=logits, grid=(h, w), qk=qk)


def tokens_to_map(tokens: torch.Tensor, grid) -> torch.Tensor:
    """(B,N,D) tokens -> (B,D,h,w) feature map."""
    B, N, D = tokens.shape
    h, w = grid
    return tokens.transpose(1, 2).reshape(B, D, h, w)


def pretrain_grid_from_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> int:
    n = pos_embed.shape[1] - num_tokens
    g = int(math.isqrt(n))
    if g * g != n:
        raise ValueError(f"pos_embed with {pos_embed.shape[1]} positions and {num_tokens} tokens "
                         "does not hold a square patch grid")
    return g


def build_backbone(name="vit_base_patch16_224", num_tokens=1, num_reg_tokens=0, embed_dim=0, depth=0,
                   num_heads=0, patch_size=0, img_size=0, drop_path_rate=0.0) -> MultiTokenViT:
    D, L, Hd, P, S = backbone_shape(name, embed_dim, depth, num_heads, patch_size, img_size)
    return MultiTokenViT(img_size=S, patch_size=P, embed_dim=D, depth=L, num_heads=Hd, num_tokens=num_tokens,
                         num_reg_tokens=num_reg_tokens, drop_path_rate=drop_path_rate)


def _unwrap_state_dict(obj) -> dict:
    """The state dict inside a loaded checkpoint object (see ``wsss.models.checkpoints``)."""
    from .checkpoints import unwrap_state_dict

    return unwrap_state_dict(obj)[0]


def read_checkpoint_file(path) -> dict:
    """The state dict of an ImageNet ViT file (.pth/.pt/.bin or .safetensors) for
    ``model.pretrained``; trained wsss/MoRe/AReAM files are refused with where they belong
    (``wsss.models.checkpoints.read_pretrained_vit_state_dict``)."""
    from .checkpoints import read_pretrained_vit_state_dict

    return read_pretrained_vit_state_dict(path)


def load_pretrained_vit(model, path, init_reg_pos: bool = True) -> None:
    """Load a timm / DeiT / ViT ImageNet checkpoint into a :class:`MultiTokenViT`.

    ``model`` is the backbone or any module with a ``backbone`` attribute. The single class
    token and its position embedding are replicated to all prepended tokens; with
    ``init_reg_pos`` the position embeddings of the regularisation tokens are re-initialised
    with ``trunc_normal_`` at timm's defaults (std 1), as the official MoRe code does (SPEC §2).
    The patch position embeddings are resampled to the model's pretraining grid if it differs.
    Distillation tokens and classification heads are dropped.
    """
    vit = getattr(model, "backbone", model)
    if not isinstance(vit, MultiTokenViT):
        raise TypeError(f"model must be a MultiTokenViT or hold one as .backbone, got {type(model).__name__}")
    sd = read_checkpoint_file(path)
    if "cls_token" not in sd or "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: not a ViT checkpoint (needs cls_token, pos_embed, patch_embed.proj.weight)")
    D = vit.embed_dim
    if sd["cls_token"].shape[-1] != D:
        raise ValueError(f"{path}: embedding width {sd['cls_token'].shape[-1]} != model's {D}")
    n_prefix = sd["cls_token"].shape[1] + (sd["dist_token"].shape[1] if "dist_token" in sd else 0)
    pos = sd["pos_embed"]
    cls_pos, patch_pos = pos[:, :1], pos[:, n_prefix:]
    try:
        g_ckpt = pretrain_grid_from_pos_embed(pos, n_prefix)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    g = vit.pretrain_grid
    if g_ckpt != g:
        grid = patch_pos.reshape(1, g_ckpt, g_ckpt, D).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, g * g, D).to(pos.dtype)
    T0 = vit.num_tokens
    token_pos = cls_pos.expand(1, T0, D).clone()
    if init_reg_pos and vit.num_reg_tokens:
        trunc_normal_(token_pos[:, :vit.num_reg_tokens])
    # a backbone without a final norm (AReAM's, nn.Identity) takes none from the checkpoint
    keep = ("patch_embed.", "blocks.", "norm.") if list(vit.norm.parameters()) else ("patch_embed.", "blocks.")
    new_sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    new_sd["cls_token"] = sd["cls_token"][:, :1].expand(1, T0, D).clone()
    new_sd["pos_embed"] = torch.cat([token_pos, patch_pos], dim=1)
    missing, unexpected = vit.load_state_dict(new_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the backbone; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
