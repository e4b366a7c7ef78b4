"""Generation state of one recurrent layer (``"mamba2"``, ``"gla"``).

A recurrent mixer needs two things to continue a sequence exactly where it stopped: the
recurrent state S ([batch, heads, key_dim, value_dim], float32) and, when it has a short causal
convolution, the last ``conv_size - 1`` inputs of that convolution. Memory is O(1) in the
sequence length.
"""

from __future__ import annotations

import torch

from longreach.cache.base import State, reorder_rows, tensor_bytes


class RecurrentState(State):
    """``heads``, ``key_dim``, ``value_dim``: the recurrent state's shape per row;
    ``conv_size``, ``conv_channels``: the short convolution's (``conv_size`` 0: none)."""

    def __init__(self, heads: int, key_dim: int, value_dim: int, *, conv_size: int = 0,
                 conv_channels: int = 0):
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.conv_size, self.conv_channels = conv_size, conv_channels
        self.state: torch.Tensor | None = None  # [B, H, K, V]; None means zeros
        self.conv_state: torch.Tensor | None = None  # [B, conv_size - 1, channels]; None means zeros
        self.num_tokens = 0  # tokens folded into the state so far

    @property
    def shape(self) -> dict[str, tuple[int, ...]]:
        shapes = {"state": (self.heads, self.key_dim, self.value_dim)}
        if self.conv_size > 1:
            shapes["conv_state"] = (self.conv_size - 1, self.conv_channels)
        return shapes

    def nbytes(self) -> int:
        return tensor_bytes(self.state, self.conv_state)

    def reorder(self, beam_idx: torch.LongTensor) -> None:
        self.state = reorder_rows(self.state, beam_idx)
        self.conv_state = reorder_rows(self.conv_state, beam_idx)
