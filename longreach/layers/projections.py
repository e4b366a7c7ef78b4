"""What softmax-attention mixers share: GQA projections and rotary positions."""

from __future__ import annotations

import torch
from torch import nn

from longreach.layers.positions import apply_rope, rope_angles


class HeadProjections:
    """q/k/v/o projections for ``num_attention_heads`` query heads and ``num_key_value_heads``
    key/value heads; RoPE on q and k when ``position == "rope"``. A mixin for ``nn.Module``s:
    attention mixers call ``init_projections`` in their ``__init__`` and add their own
    attention between ``project`` and ``merge``."""

    def init_projections(self, config, *, position: str, rope_theta: float | None) -> None:
        self.position = position
        self.rope_theta = float(rope_theta if rope_theta is not None else config.rope_theta)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """``x`` [B, T, hidden] -> q [B, T, HQ, D], k and v [B, T, H, D] (RoPE applied)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.position == "rope":
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output [B, T, HQ, D] -> [B, T, hidden]."""
        return self.o_proj(o.reshape(*o.shape[:2], self.num_heads * self.head_dim))


class Projections(HeadProjections, nn.Module):
    """The projections as a module of their own (the GCA chunk encoder's attention)."""

    def __init__(self, config, *, position: str, rope_theta: float | None):
        nn.Module.__init__(self)
        self.init_projections(config, position=position, rope_theta=rope_theta)
