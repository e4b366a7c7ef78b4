"""Position encodings a mixer can choose: rotary (RoPE), ALiBi, or none."""

from __future__ import annotations

import functools
import math

import torch

POSITION_KINDS = ("rope", "alibi", "none")


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
    """Rotate ``x`` ``[B, T, H, D]`` pairwise (first half with second half, as in GPT-NeoX / Llama)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@functools.cache
def _alibi_slopes_on(num_heads: int, device: torch.device) -> torch.Tensor:
    return alibi_slopes(num_heads).to(device)


def alibi_slopes_on(num_heads: int, device: torch.device) -> torch.Tensor:
    """``alibi_slopes(num_heads)`` on ``device``, copied there once per process (a copy per
    call would make every forward wait for the host)."""
    return _alibi_slopes_on(num_heads, torch.device(device))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi head slopes (Press et al.): a geometric sequence, interleaved when the head
    count is not a power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
