"""Softmax attention mixers: ``"full"`` (causal) and ``"swa"`` (sliding window, optional sinks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longreach.cache.sliding import AttentionKVState
from longreach.layers.base import Mixer, MixerOptions, check_choice, check_int
from longreach.layers.positions import POSITION_KINDS, alibi_slopes_on
from longreach.layers.projections import HeadProjections
from longreach.layers.registry import register_mixer
from longreach.ops import attention


@dataclass(frozen=True)
class AttentionOptions(MixerOptions):
    """``window``: a query sees the last ``window`` tokens (itself included), None = all;
    ``sinks``: the first ``sinks`` tokens stay visible to every query (StreamingLLM's
    attention sinks); ``position``: rope | alibi | none; ``rope_theta``: None = the model's."""

    window: int | None = None
    sinks: int = 0
    position: str = "rope"
    rope_theta: float | None = None

    def validate(self) -> None:
        if self.window is not None:
            check_int("window", self.window, 1)
        check_int("sinks", self.sinks, 0)
        check_choice("position", self.position, POSITION_KINDS)


@dataclass(frozen=True)
class SlidingWindowOptions(AttentionOptions):
    window: int | None = 512


@register_mixer("full", AttentionOptions)
@register_mixer("swa", SlidingWindowOptions)
class Attention(HeadProjections, Mixer):
    """Multi-head causal attention with GQA, optionally windowed and with sinks."""

    Options = AttentionOptions

    def __init__(self, config, layer_idx: int, options: AttentionOptions):
        Mixer.__init__(self, config, layer_idx, options)
        self.init_projections(config, position=options.position, rope_theta=options.rope_theta)
        self.window, self.sinks = options.window, options.sinks

    def init_state(self) -> AttentionKVState:
        return AttentionKVState(window=self.window, sinks=self.sinks,
                                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: AttentionKVState | None = None):
        q, k, v = self.project(x, positions)
        q_pos = k_pos = None  # without a state, positions are 0..T-1: the op's default
        if state is not None:
            k, v, k_pos = state.update(k, v, positions)
            q_pos = positions
        slopes = alibi_slopes_on(self.num_heads, x.device) if self.position == "alibi" else None
        o = attention(
            q, k, v, causal=True, window=self.window, sinks=self.sinks,
            q_pos=q_pos, k_pos=k_pos, alibi_slopes=slopes,
        )
        return self.merge(o)
