"""Softmax attention mixers: ``"full"`` (causal) and ``"swa"`` (sliding window, optional sinks)."""

from __future__ import annotations

import torch
from torch import nn

from longreach.cache.sliding import AttentionKVState
from longreach.layers.positions import POSITION_KINDS, alibi_slopes, apply_rope, rope_angles
from longreach.layers.registry import register_mixer
from longreach.ops import attention


@register_mixer("full", position="rope")
@register_mixer("swa", window=512, sinks=0, position="rope")
class Attention(nn.Module):
    """Multi-head causal attention with GQA.

    ``window``: a query sees the last ``window`` tokens (itself included); ``sinks``: the first
    ``sinks`` tokens stay visible to every query (StreamingLLM's attention sinks).
    """

    def __init__(
        self,
        config,
        layer_idx: int,
        *,
        window: int | None = None,
        sinks: int = 0,
        position: str = "rope",
        rope_theta: float | None = None,
    ):
        super().__init__()
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"layer {layer_idx}: window must be a positive integer or None, got {window!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"layer {layer_idx}: sinks must be a non-negative integer, got {sinks!r}")
        if position not in POSITION_KINDS:
            raise ValueError(f"layer {layer_idx}: position must be one of {POSITION_KINDS}, got {position!r}")
        self.layer_idx = layer_idx
        self.window, self.sinks, self.position = window, sinks, position
        self.rope_theta = float(rope_theta if rope_theta is not None else config.rope_theta)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def init_cache(self) -> AttentionKVState:
        return AttentionKVState(window=self.window, sinks=self.sinks)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: AttentionKVState | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.position == "rope":
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_pos = k_pos = None  # without a cache, positions are 0..T-1: the op's default
        if cache is not None:
            k, v, k_pos = cache.update(k, v, positions)
            q_pos = positions
        # slopes are rebuilt per call (tiny): a buffer would not survive meta-device loading
        slopes = alibi_slopes(self.num_heads).to(x.device) if self.position == "alibi" else None
        o = attention(
            q, k, v, causal=True, window=self.window, sinks=self.sinks,
            q_pos=q_pos, k_pos=k_pos, alibi_slopes=slopes,
        )
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
