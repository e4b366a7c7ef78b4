"""The ``"cca"`` mixer: core-context aware attention (``longreach.ops.cca``) with GQA and RoPE.

Like ``Attention`` but the far past is read through one pooled core token per group of
``group_size`` tokens, and only the last ``window`` (to ``window + group_size - 1``) tokens are
exact. RoPE is applied before pooling, so core keys keep their tokens' original rotation. Core
tokens are pooled per key/value head (``core_heads="kv"``), which keeps the generation state at
most ``T / group_size + window + group_size`` tokens per key/value head.
"""

from __future__ import annotations

import torch
from torch import nn

from longreach.cache.cca import CCAState
from longreach.layers.positions import apply_rope, rope_angles
from longreach.layers.registry import register_mixer
from longreach.ops.cca import CORE_HEADS, cca_attention

CCA_POSITIONS = ("rope", "none")


@register_mixer("cca", group_size=16, window=1024, position="rope")
class CCAAttention(nn.Module):
    def __init__(
        self,
        config,
        layer_idx: int,
        *,
        group_size: int = 16,
        window: int = 1024,
        position: str = "rope",
        rope_theta: float | None = None,
        core_heads: str = "kv",
    ):
        super().__init__()
        for name, value in (("group_size", group_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layer {layer_idx}: {name} must be a positive integer, got {value!r}")
        if position not in CCA_POSITIONS:
            raise ValueError(f"layer {layer_idx}: cca position must be one of {CCA_POSITIONS}, got {position!r}")
        if core_heads not in CORE_HEADS:
            raise ValueError(f"layer {layer_idx}: core_heads must be one of {CORE_HEADS}, got {core_heads!r}")
        self.layer_idx = layer_idx
        self.group_size, self.window, self.position, self.core_heads = group_size, window, position, core_heads
        self.rope_theta = float(rope_theta if rope_theta is not None else config.rope_theta)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def init_cache(self) -> CCAState:
        return CCAState(group_size=self.group_size, window=self.window, core_heads=self.core_heads)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: CCAState | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.position == "rope":
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            o = cache.step(q, k, v)
        else:
            o = cca_attention(
                q, k, v, group_size=self.group_size, window=self.window, core_heads=self.core_heads
            )
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
