"""The ``"cca"`` mixer: core-context aware attention (``longreach.ops.cca``) with GQA and RoPE.

Like ``Attention`` but the far past is read through one pooled core token per group of
``group_size`` tokens, and only the last ``window`` (to ``window + group_size - 1``) tokens are
exact. RoPE is applied before pooling, so core keys keep their tokens' original rotation. Core
tokens are pooled per key/value head (``core_heads="kv"``), which keeps the generation state at
most ``T / group_size + window + group_size`` tokens per key/value head.
"""

from __future__ import annotations

import torch

from longreach.cache.cca import CCAState
from longreach.layers.projections import HeadProjections
from longreach.layers.registry import register_mixer
from longreach.ops.cca import CORE_HEADS, cca_attention

CCA_POSITIONS = ("rope", "none")


@register_mixer("cca", group_size=16, window=1024, position="rope")
class CCAAttention(HeadProjections):
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
        for name, value in (("group_size", group_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layer {layer_idx}: {name} must be a positive integer, got {value!r}")
        if position not in CCA_POSITIONS:
            raise ValueError(f"layer {layer_idx}: cca position must be one of {CCA_POSITIONS}, got {position!r}")
        if core_heads not in CORE_HEADS:
            raise ValueError(f"layer {layer_idx}: core_heads must be one of {CORE_HEADS}, got {core_heads!r}")
        super().__init__(config, position=position, rope_theta=rope_theta)
        self.layer_idx = layer_idx
        self.group_size, self.window, self.core_heads = group_size, window, core_heads

    def init_cache(self) -> CCAState:
        return CCAState(group_size=self.group_size, window=self.window, core_heads=self.core_heads)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: CCAState | None = None):
        q, k, v = self.project(x, positions)
        if cache is not None:
            o = cache.step(q, k, v)
        else:
            o = cca_attention(
                q, k, v, group_size=self.group_size, window=self.window, core_heads=self.core_heads
            )
        return self.merge(o)
