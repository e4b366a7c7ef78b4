"""Core-context aware attention (CCA): pooled core tokens for the far past, exact recent window.

`cca_attention` validates its inputs once and dispatches:
  - window >= T or group_size == 1: no group is ever pooled (or pooling one token is the
    token itself), so CCA is exactly causal attention: `longreach.ops.attention` (SDPA);
  - otherwise the blocked pure-PyTorch specification (`reference.cca_attention_reference`).
`impl="reference"`, or the environment variable LONGREACH_KERNELS=reference, forces the
reference; other values of the variable name paths of other ops and mean "auto" here.

`cca_pool` (one core token per complete group) and `cca_decode` (new queries against a
generation cache) expose the two halves a cache needs; `core_count` gives J(t).
"""

from __future__ import annotations

import os

import torch

from ..attention import attention
from .reference import (
    CORE_HEADS,
    cca_attention_reference,
    cca_decode,
    cca_pool,
    check_cca_inputs,
    core_count,
)

__all__ = [
    "CORE_HEADS",
    "cca_attention",
    "cca_attention_reference",
    "cca_decode",
    "cca_pool",
    "check_cca_inputs",
    "core_count",
]

IMPLS = ("auto", "reference")


def cca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int = 16,
    window: int = 1024,
    scale: float | None = None,
    core_heads: str = "query",
    impl: str | None = None,
) -> torch.Tensor:
    """CCA over q [B, T, HQ, D] and k, v [B, T, H, D] (causal); returns [B, T, HQ, D].

    Query t sees the core tokens of groups 0..J-1, J = max(0, (t + 1 - window) // group_size),
    and the raw tokens J * group_size .. t, in one softmax. The math (pooling, GQA and
    `core_heads`) is defined in `reference.cca_attention_reference` and `reference.cca_pool`.
    """
    if impl is None:
        impl = "reference" if os.environ.get("LONGREACH_KERNELS") == "reference" else "auto"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    scale = check_cca_inputs(
        q, k, v, group_size=group_size, window=window, scale=scale, core_heads=core_heads
    )
    options = dict(group_size=group_size, window=window, scale=scale, core_heads=core_heads)
    if impl == "reference":
        return cca_attention_reference(q, k, v, **options)
    if window >= q.shape[1] or group_size == 1:
        return attention(q, k, v, causal=True, scale=scale)
    return cca_attention_reference(q, k, v, **options)
