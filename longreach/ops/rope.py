"""Rotary position embeddings (RoPE): the angle tables and the rotation, shared by the
attention mixers and the ops that re-rotate keys (LM-Infinite)."""

from __future__ import annotations

import torch

from longreach.ops.backend import compute_dtype


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim // 2]`` for absolute ``positions`` (LongTensor ``[T]``).

    Angles are formed in float64: at millions of tokens ``pos * inv_freq`` in float32 is off
    by whole radians for the fast-rotating pairs.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` pairwise (first half with second half, as in GPT-NeoX / Llama),
    in float32 (float64 for float64 ``x``)."""
    x1, x2 = x.to(compute_dtype(x.dtype)).chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
