"""Generation caches for longreach models."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from longreach.cache.cca import CCACache, CCAState
from longreach.cache.gca import ChunkMemory, GCAState
from longreach.cache.sliding import AttentionKVState


class LongReachCache(Cache):
    """Per-layer generation state of a longreach model.

    Each mixer decides what it keeps (``mixer.init_cache()``): a growing KV cache for full
    attention, a bounded one for a sliding window, a recurrent state for recurrent mixers.
    The cache counts the tokens it has seen, which gives the next token's position.
    """

    def __init__(self, states: list, memory=None):
        super().__init__(layers=[])
        self.states = list(states)
        self.seen_tokens = 0
        self.memory = memory  # GCA models: the model-level GCAState (chunk memory, retrieval)

    @property
    def is_compileable(self) -> bool:  # the states change shape; generate must not compile
        return False

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int):
        return self.states[layer_idx]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in [*self.states, self.memory]:
            if hasattr(state, "reorder"):
                state.reorder(beam_idx)

    def nbytes(self) -> int:
        """Bytes of tensors the cache holds on the compute device (for memory checks and
        benchmarks). A GCA model's offloaded chunk memory is not counted: see
        ``memory.memory.offloaded_nbytes()``."""
        return sum(s.nbytes() for s in [*self.states, self.memory] if hasattr(s, "nbytes"))


__all__ = ["AttentionKVState", "CCACache", "CCAState", "ChunkMemory", "GCAState", "LongReachCache"]
