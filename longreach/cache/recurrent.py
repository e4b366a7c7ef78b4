"""Generation state of one recurrent layer (``"mamba2"``, ``"gla"``).

A recurrent mixer needs two things to continue a sequence exactly where it stopped: the
recurrent state S ([batch, heads, key_dim, value_dim], float32) and, when it has a short causal
convolution, the last ``conv_size - 1`` inputs of that convolution. Memory is O(1) in the
sequence length.
"""

from __future__ import annotations

import torch


class RecurrentState:
    def __init__(self):
        self.state: torch.Tensor | None = None  # [B, H, K, V]; None means zeros
        self.conv_state: torch.Tensor | None = None  # [B, conv_size - 1, channels]; None means zeros
        self.num_tokens = 0  # tokens folded into the state so far

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.conv_state) if t is not None)

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
        if self.conv_state is not None:
            self.conv_state = self.conv_state.index_select(0, beam_idx.to(self.conv_state.device))
