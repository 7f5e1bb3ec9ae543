"""Graph Category Representation (MoRe, SPEC §2)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GraphCategoryRepresentation(nn.Module):
    """Enhances class tokens with a top-k neighbour graph over class and (detached) patch tokens.

    Parameter names follow the official module so its ``graph_layer.*`` checkpoint entries
    load directly. The official module also holds ``_fc1`` (Linear + LeakyReLU) that its forward
    never calls. It is not a parameter here: a parameter that can never receive a gradient stops
    DDP at the second iteration (and AdamW would decay it for nothing). Official state dicts
    that contain ``_fc1.*`` still load: the entries are dropped on load, and
    :meth:`official_extra_state` writes them back (zeros) for the official code's strict load.
    """

    UNUSED_OFFICIAL_KEYS = ("_fc1.0.weight", "_fc1.0.bias")

    def __init__(self, dim: int, topk_ratio: float = 0.5, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.topk_ratio = topk_ratio
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self.UNUSED_OFFICIAL_KEYS:  # the official, never-called ``_fc1`` (see class doc)
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def official_extra_state(self) -> dict:
        """The official module's unused ``_fc1`` entries (zeros), keyed as in its state dict."""
        D = self.dim
        return {"_fc1.0.weight": torch.zeros(D, D), "_fc1.0.bias": torch.zeros(D)}

    def forward(self, class_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        if class_tokens.dim() != 3 or patch_tokens.dim() != 3 or class_tokens.shape[-1] != patch_tokens.shape[-1]:
            raise ValueError(f"class_tokens (B,C,D) and patch_tokens (B,N,D) expected, got "
                             f"{tuple(class_tokens.shape)} and {tuple(patch_tokens.shape)}")
        c = class_tokens
        B, C, D = c.shape
        v = torch.cat([c, patch_tokens.detach()], dim=1)
        e_h = self.head_proj(c)  # (B,C,D)
        e_t = self.tail_proj(v)  # (B,C+N,D)
        s = (e_h * D ** -0.5) @ e_t.transpose(1, 2)  # (B,C,C+N) edge logits
        k = max(1, math.floor(self.topk_ratio * C))
        s_k, idx = s.topk(k, dim=-1)
        n = torch.gather(e_t.unsqueeze(1).expand(B, C, -1, D), 2, idx.unsqueeze(-1).expand(B, C, k, D))
        pi = s_k.softmax(dim=-1).unsqueeze(-1)  # (B,C,k,1)
        head = e_h.unsqueeze(2)
        r = (1 - pi) * head + pi * n  # relation-aware heads
        g = torch.tanh(head + r)
        # The official einsum multiplies the two sums over D (not a dot product); SPEC §2 step 5.
        a = n.sum(-1) * g.sum(-1)  # (B,C,k)
        beta = a.softmax(dim=-1).unsqueeze(-1)
        e_n = (beta * n).sum(dim=2)  # (B,C,D)
        u1 = F.leaky_relu(self.linear1(0.1 * (e_h + e_n) + c), 0.01)
        u2 = F.leaky_relu(self.linear2(0.1 * (e_h * e_n) + c), 0.01)
        return self.norm(self.dropout(u1 + u2))
