"""Position encodings a mixer can choose: rotary (RoPE), ALiBi, or none."""

from __future__ import annotations

import functools
import math

import torch

from longreach.ops.rope import apply_rope, rope_angles

POSITION_KINDS = ("rope", "alibi", "none")

__all__ = ["POSITION_KINDS", "alibi_slopes", "alibi_slopes_on", "apply_rope", "rope_angles"]


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
