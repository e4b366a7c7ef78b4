"""Grouped chunk attention (GCA): each query chunk attends to K retrieved memory chunks.

Every retrieved chunk gets its own non-causal softmax, and the K per-chunk outputs are summed
with fusion weights (which receive gradients, so a retriever can learn from the loss).
`gca_attention` validates its inputs once and dispatches; today the only path is the
blocked pure-PyTorch specification (`reference.gca_attention_reference`).
"""

from __future__ import annotations

import torch

from .reference import check_gca_inputs, gca_attention_reference

__all__ = ["check_gca_inputs", "gca_attention", "gca_attention_reference"]


def gca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """GCA over q [B, T, HQ, D] and the chunk memory k, v [B, n_chunks * chunk_size, H, D].

    indices, weights: [B, ceil(T / chunk_size), 1 or H, K]; chunk ids (-1 = empty slot) and
    fusion weights per query chunk. Returns [B, T, HQ, D]. The math is defined in
    `reference.gca_attention_reference`.
    """
    scale = check_gca_inputs(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    return gca_attention_reference(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
