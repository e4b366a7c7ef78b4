"""The ``"cca"`` mixer: core-context aware attention (``longreach.ops.cca``) with GQA and RoPE.

Like ``Attention`` but the far past is read through one pooled core token per group of
``group_size`` tokens, and only the last ``window`` (to ``window + group_size - 1``) tokens are
exact. RoPE is applied before pooling, so core keys keep their tokens' original rotation. Core
tokens are pooled per key/value head (``core_heads="kv"``), which keeps the generation state at
most ``T / group_size + window + group_size`` tokens per key/value head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longreach.cache.cca import CCAState
from longreach.layers.base import Mixer, MixerOptions, check_choice, check_int
from longreach.layers.projections import HeadProjections
from longreach.layers.registry import register_mixer
from longreach.ops.cca import CORE_HEADS, cca_attention

CCA_POSITIONS = ("rope", "none")


@dataclass(frozen=True)
class CCAOptions(MixerOptions):
    """``group_size`` tokens pool into one core token; the last ``window`` tokens are exact;
    ``core_heads``: pool per key/value head (kv) or per query head (query)."""

    group_size: int = 16
    window: int = 1024
    position: str = "rope"
    rope_theta: float | None = None
    core_heads: str = "kv"

    def validate(self) -> None:
        check_int("group_size", self.group_size, 1)
        check_int("window", self.window, 1)
        if self.position not in CCA_POSITIONS:
            raise ValueError(f"cca position must be one of {CCA_POSITIONS}, got {self.position!r}")
        check_choice("core_heads", self.core_heads, CORE_HEADS)


@register_mixer("cca")
class CCAAttention(HeadProjections, Mixer):
    Options = CCAOptions

    def __init__(self, config, layer_idx: int, options: CCAOptions):
        Mixer.__init__(self, config, layer_idx, options)
        self.init_projections(config, position=options.position, rope_theta=options.rope_theta)
        self.group_size, self.window, self.core_heads = options.group_size, options.window, options.core_heads

    def init_state(self) -> CCAState:
        core = self.num_kv_heads if self.core_heads == "kv" else self.num_heads
        return CCAState(group_size=self.group_size, window=self.window, core_heads=self.core_heads,
                        num_core_heads=core, head_dim=self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: CCAState | None = None):
        q, k, v = self.project(x, positions)
        if state is not None:
            o = state.step(q, k, v)
        else:
            o = cca_attention(
                q, k, v, group_size=self.group_size, window=self.window, core_heads=self.core_heads
            )
        return self.merge(o)
