"""Generation caches for longreach models."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from longreach.cache.base import State
from longreach.cache.cca import CCACache, CCAState
from longreach.cache.recurrent import RecurrentState
from longreach.cache.sliding import AttentionKVState


class LongReachCache(Cache):
    """Per-layer generation state of a longreach model.

    Each mixer decides what it keeps (``mixer.init_state()``, a ``longreach.cache.base.State``):
    a growing KV cache for full attention, a bounded one for a sliding window, a recurrent
    state for recurrent mixers; None for a layer that keeps nothing. The cache counts the
    tokens it has seen, which gives the next token's position.
    """

    def __init__(self, states: list):
        super().__init__(layers=[])
        self.states = list(states)
        self.seen_tokens = 0

    @property
    def is_compileable(self) -> bool:  # the states change shape; generate must not compile
        return False

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int):
        return self.states[layer_idx]

    def all_states(self) -> list[State]:
        """Every state the cache holds (families add model-level ones)."""
        return [s for s in self.states if s is not None]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in self.all_states():
            state.reorder(beam_idx)

    def nbytes(self) -> int:
        """Bytes of tensors the cache holds on the compute device (for memory checks and
        benchmarks); memory a state keeps off the device is not counted."""
        return sum(s.nbytes() for s in self.all_states())

    def bytes_per_token(self, dtype: torch.dtype) -> float:
        """Device bytes the cache grows by per further token (0 when every state is bounded)."""
        return sum(s.bytes_per_token(dtype) for s in self.all_states())


__all__ = ["AttentionKVState", "CCACache", "CCAState", "LongReachCache", "RecurrentState", "State"]
