"""Softmax attention mixers: ``"full"`` (causal) and ``"swa"`` (sliding window, optional sinks)."""

from __future__ import annotations

import torch

from longreach.cache.sliding import AttentionKVState
from longreach.layers.positions import POSITION_KINDS, alibi_slopes
from longreach.layers.projections import HeadProjections
from longreach.layers.registry import register_mixer
from longreach.ops import attention


@register_mixer("full", position="rope")
@register_mixer("swa", window=512, sinks=0, position="rope")
class Attention(HeadProjections):
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
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"layer {layer_idx}: window must be a positive integer or None, got {window!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"layer {layer_idx}: sinks must be a non-negative integer, got {sinks!r}")
        if position not in POSITION_KINDS:
            raise ValueError(f"layer {layer_idx}: position must be one of {POSITION_KINDS}, got {position!r}")
        super().__init__(config, position=position, rope_theta=rope_theta)
        self.layer_idx = layer_idx
        self.window, self.sinks = window, sinks

    def init_cache(self) -> AttentionKVState:
        return AttentionKVState(window=self.window, sinks=self.sinks)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: AttentionKVState | None = None):
        q, k, v = self.project(x, positions)
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
        return self.merge(o)
