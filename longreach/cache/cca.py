"""Bounded generation state for CCA attention (``longreach.ops.cca``).

Per layer and key/value head the state keeps the core tokens pooled so far (one per complete
group), and the raw keys/values from ``J(p) * g`` on, where ``p`` is the newest position: at most
``T / g + window + g`` tokens instead of ``T``. A group is pooled as soon as its last token
arrives, because that token's query is the one pooling needs; its core token stays masked until
the group leaves the raw window (``cca_decode`` masks what a query must not see), so no query
has to be stored.

``CCAState`` works on ``[batch, time, heads, head_dim]`` tensors (the longreach mixer uses it
directly); ``CCACache`` wraps one per layer as a transformers ``Cache`` for HF models.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longreach.cache.base import State, reorder_rows, tensor_bytes
from longreach.ops.cca import cca_decode, cca_pool, core_count


class CCAState(State):
    """One layer's CCA state. ``step(q, k, v)`` adds new tokens and returns their attention.

    ``num_core_heads`` and ``head_dim`` (when known) size the growth: one pooled key and value
    per core head for every ``group_size`` tokens."""

    def __init__(self, *, group_size: int, window: int, core_heads: str = "kv", scale=None,
                 num_core_heads: int = 0, head_dim: int = 0):
        self.group_size, self.window = group_size, window
        self.core_heads, self.scale = core_heads, scale
        self.num_core_heads, self.head_dim = num_core_heads, head_dim
        self.core_k: torch.Tensor | None = None  # [B, N, Hc, D], groups 0..N-1
        self.core_v: torch.Tensor | None = None
        self.raw_k: torch.Tensor | None = None  # [B, R, H, D], positions raw_start..
        self.raw_v: torch.Tensor | None = None
        self.raw_start = 0
        self.seen = 0  # tokens of the sequence so far

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Tq, HQ, D] and k, v [B, Tq, H, D] of the next Tq tokens (post-RoPE)."""
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"q and k must cover the same new tokens, got {q.shape[1]} and {k.shape[1]}")
        if self.raw_k is None:
            raw_k, raw_v = k, v
        else:
            if k.shape[0] != self.raw_k.shape[0]:
                raise ValueError(f"batch size changed from {self.raw_k.shape[0]} to {k.shape[0]}")
            raw_k, raw_v = torch.cat([self.raw_k, k], dim=1), torch.cat([self.raw_v, v], dim=1)
        g, start, end = self.group_size, self.seen, self.seen + q.shape[1]
        # pool every group completed by the new tokens, with its last token's query
        first, last = start // g, end // g  # groups first..last-1 end inside the new tokens
        if last > first:
            lo = first * g - self.raw_start
            hi = last * g - self.raw_start
            # the last query of each group: rows m * g + g - 1 - start, a strided slice
            q_last = q[:, first * g + g - 1 - start : last * g - start : g]
            ck, cv = cca_pool(
                q_last, raw_k[:, lo:hi], raw_v[:, lo:hi], group_size=g, scale=self.scale,
                core_heads=self.core_heads,
            )
            if self.core_k is not None:
                ck, cv = torch.cat([self.core_k, ck], dim=1), torch.cat([self.core_v, cv], dim=1)
            self.core_k, self.core_v = ck, cv
        out = cca_decode(
            q, self.core_k, self.core_v, raw_k, raw_v, raw_start=self.raw_start, group_size=g,
            window=self.window, scale=self.scale,
        )
        # later queries never see raw tokens before J(end - 1) * g: drop them (clone frees the rest)
        keep_from = core_count(end - 1, group_size=g, window=self.window) * g
        if keep_from > self.raw_start:
            cut = keep_from - self.raw_start
            raw_k, raw_v = raw_k[:, cut:].clone(), raw_v[:, cut:].clone()
            self.raw_start = keep_from
        self.raw_k, self.raw_v, self.seen = raw_k, raw_v, end
        return out

    @property
    def num_core(self) -> int:
        return 0 if self.core_k is None else self.core_k.shape[1]

    @property
    def num_raw(self) -> int:
        return 0 if self.raw_k is None else self.raw_k.shape[1]

    @property
    def num_tokens(self) -> int:
        """Tokens held per key/value head (core + raw): at most seen / g + window + g."""
        return self.num_core + self.num_raw

    def nbytes(self) -> int:
        return tensor_bytes(self.core_k, self.core_v, self.raw_k, self.raw_v)

    def bytes_per_token(self, dtype: torch.dtype) -> float:
        return 2 * self.num_core_heads * self.head_dim * dtype.itemsize / self.group_size

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        for name in ("core_k", "core_v", "raw_k", "raw_v"):
            setattr(self, name, reorder_rows(getattr(self, name), beam_idx))


class CCACacheLayer(CacheLayerMixin):
    """One HF decoder layer's CCA state.

    ``update`` (called by the model's attention before the attention function) only hands the
    new keys/values through: the ``longreach`` attention function adds them with their queries
    in ``state.step``, which is what pooling needs.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, *, group_size: int, window: int, core_heads: str = "kv"):
        super().__init__()
        self.state = CCAState(group_size=group_size, window=window, core_heads=core_heads)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # older signatures pass cache_position
            query_length = query_length.shape[0]
        return self.state.seen + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.state.seen

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def reset(self) -> None:
        s = self.state
        self.state = CCAState(group_size=s.group_size, window=s.window, core_heads=s.core_heads)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.reorder(beam_idx)

    def offload(self):
        return None

    def prefetch(self):
        return None


class CCACache(Cache):
    """A transformers ``Cache`` holding one ``CCAState`` per decoder layer (bounded memory)."""

    def __init__(self, num_layers: int, *, group_size: int, window: int, core_heads: str = "kv"):
        self.group_size, self.window, self.core_heads = group_size, window, core_heads
        layers = [
            CCACacheLayer(group_size=group_size, window=window, core_heads=core_heads)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)

    @property
    def is_compileable(self) -> bool:  # states change shape every step
        return False

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return key_states, value_states

    def state(self, layer_idx: int) -> CCAState:
        return self.layers[layer_idx].state

    def get_seq_length(self, layer_idx: int | None = 0, *args) -> int:
        return self.layers[layer_idx or 0].state.seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args):
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.state.reorder(beam_idx)

    def crop(self, max_length: int):
        raise ValueError("a CCACache cannot be cropped: pooled core tokens cannot be split again")

    def num_tokens(self) -> list[int]:
        """Tokens held per layer and key/value head."""
        return [layer.state.num_tokens for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.state.nbytes() for layer in self.layers)
