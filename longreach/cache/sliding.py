"""Key/value state of one attention layer during generation.

Full attention keeps every token. A sliding window keeps only what a future query can
see: the first ``sinks`` tokens and the last ``window - 1`` (the query itself supplies the
window's newest key), so memory is O(window + sinks), not O(T).
"""

from __future__ import annotations

import torch


class AttentionKVState:
    def __init__(self, window: int | None = None, sinks: int = 0):
        self.window = window
        self.sinks = sinks
        self.keys: torch.Tensor | None = None  # [B, S, H, D], RoPE already applied
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [S] absolute positions, ascending

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Add the new tokens; return (keys, values, positions) the new queries attend to."""
        if self.keys is None:
            keys, values, pos = k, v, positions
        else:
            keys = torch.cat([self.keys, k], dim=1)
            values = torch.cat([self.values, v], dim=1)
            pos = torch.cat([self.positions, positions])
        if self.window is None:
            self.keys, self.values, self.positions = keys, values, pos
        else:
            keep = (pos < self.sinks) | (pos > pos[-1] - self.window + 1)
            if bool(keep.all()):
                self.keys, self.values, self.positions = keys, values, pos
            else:
                idx = keep.nonzero().squeeze(1)
                # clone so the long concatenation above can be freed
                self.keys = keys.index_select(1, idx).clone()
                self.values = values.index_select(1, idx).clone()
                self.positions = pos.index_select(0, idx).clone()
        return keys, values, pos

    @property
    def num_tokens(self) -> int:
        """Tokens currently held (bounded by window - 1 + sinks for a sliding window)."""
        return 0 if self.keys is None else self.keys.shape[1]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))
