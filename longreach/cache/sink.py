"""Bounded generation state for StreamingLLM (Xiao et al., 2024) and LM-Infinite (Han et al.,
2024) attention: the first ``sinks`` tokens and the last ``window - 1`` ones of every layer,
which is every key a later query can attend to.

``SinkWindowCache`` is a transformers ``Cache`` for HF models switched to either
(``longreach.integrations.hf.enable_streaming`` / ``enable_lm_infinite``); it counts the tokens
it has seen, from which LM-Infinite reads the positions of the keys it kept.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longreach.cache.base import tensor_bytes


class SinkWindowLayer(CacheLayerMixin):
    """One layer's StreamingLLM state: the first ``sinks`` keys/values and the last
    ``window - 1`` ones, which is every key a later query can attend to.

    The kept keys are contiguous up to the newest token, so index distances between the new
    queries and the window keys equal position distances (what the plug-in's mask uses);
    keys carry their RoPE rotation from their original positions.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, *, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window = sinks, window
        self.seen = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        keep = self.sinks + self.window - 1
        if keys.shape[-2] > keep:
            tail = keys.shape[-2] - (self.window - 1)
            self.keys = torch.cat([keys[..., : self.sinks, :], keys[..., tail:, :]], dim=-2)
            self.values = torch.cat([values[..., : self.sinks, :], values[..., tail:, :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # older signatures pass cache_position
            query_length = query_length.shape[0]
        held = 0 if self.keys is None else self.keys.shape[-2]
        return held + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen  # new tokens get positions after every token seen, not just the kept

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def offload(self):
        return None

    def prefetch(self):
        return None


class SinkWindowCache(Cache):
    """A transformers ``Cache`` of :class:`SinkWindowLayer`: bounded memory for a model
    switched to StreamingLLM or LM-Infinite attention."""

    def __init__(self, num_layers: int, *, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        super().__init__(layers=[SinkWindowLayer(sinks=sinks, window=window)
                                 for _ in range(num_layers)])

    @property
    def is_compileable(self) -> bool:
        return False

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0, *args) -> int:
        return self.layers[layer_idx or 0].seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args):
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def crop(self, max_length: int):
        raise ValueError("a SinkWindowCache cannot be cropped: dropped tokens are gone")

    def num_tokens(self) -> list[int]:
        """Keys held per layer (at most sinks + window - 1 between forward calls)."""
        return [0 if layer.keys is None else layer.keys.shape[-2] for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the keys and values held, all layers."""
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.layers)


__all__ = ["SinkWindowCache", "SinkWindowLayer"]
