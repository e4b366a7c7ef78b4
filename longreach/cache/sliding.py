"""Key/value state of one attention layer during generation.

Full attention keeps every token. A sliding window keeps only what a future query can
see: the first ``sinks`` tokens and the last ``window - 1`` (the query itself supplies the
window's newest key), so memory is O(window + sinks), not O(T).
"""

from __future__ import annotations

import torch

from longreach.cache.base import State, reorder_rows, tensor_bytes


class AttentionKVState(State):
    """Keys/values (and their positions) of one attention layer; ``num_kv_heads`` and
    ``head_dim`` say how much each kept token costs."""

    def __init__(self, window: int | None = None, sinks: int = 0, *, num_kv_heads: int = 0,
                 head_dim: int = 0):
        self.window = window
        self.sinks = sinks
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.keys: torch.Tensor | None = None  # [B, S, H, D], RoPE already applied
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [S] absolute positions, ascending
        self.seen = 0  # tokens added so far

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Add the new tokens; return (keys, values, positions) the new queries attend to.

        ``positions`` continue the state's count (0, 1, 2, ... over the calls), as the model
        passes them; which tokens to keep is worked out from that count on the host, so an
        update never waits for the device.
        """
        if self.keys is None:
            keys, values, pos = k, v, positions
        else:
            keys = torch.cat([self.keys, k], dim=1)
            values = torch.cat([self.values, v], dim=1)
            pos = torch.cat([self.positions, positions])
        self.seen += k.shape[1]
        self.keys, self.values, self.positions = keys, values, pos
        if self.window is not None:
            # kept: positions [0, sinks) and [seen - window + 1, seen), the front and the back
            front = min(self.sinks, self.seen)
            back = min(self.window - 1, self.seen)
            held = keys.shape[1]
            if front + back < held:
                # clone so the long concatenation above can be freed
                self.keys = torch.cat([keys[:, :front], keys[:, held - back:]], dim=1).clone()
                self.values = torch.cat([values[:, :front], values[:, held - back:]], dim=1).clone()
                self.positions = torch.cat([pos[:front], pos[held - back:]]).clone()
        return keys, values, pos

    @property
    def num_tokens(self) -> int:
        """Tokens currently held (bounded by window - 1 + sinks for a sliding window)."""
        return 0 if self.keys is None else self.keys.shape[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.positions)

    def bytes_per_token(self, dtype: torch.dtype) -> float:
        if self.window is not None:
            return 0.0
        # a key and a value per key/value head, plus the token's int64 position
        return float(2 * self.num_kv_heads * self.head_dim * dtype.itemsize + 8)

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        self.keys, self.values = reorder_rows(self.keys, beam_idx), reorder_rows(self.values, beam_idx)
