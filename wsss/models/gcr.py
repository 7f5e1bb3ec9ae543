"""Graph Category Representation (MoRe, SPEC §2)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GraphCategoryRepresentation(nn.Module):
    """Enhances class tokens with a top-k neighbour graph over class and (detached) patch tokens.

    Parameter names follow the official module so its ``graph_layer.*`` checkpoint entries
    load directly (``_fc1`` is unused there too and kept only for that).
    """

    def __init__(self, dim: int, topk_ratio: float = 0.5, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.topk_ratio = topk_ratio
        self._fc1 = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU())
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

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
