"""Core-context aware attention (CCA): pooled core tokens for the far past, exact recent window.

`cca_attention` validates its inputs once and dispatches:
  - window >= T or group_size == 1: no group is ever pooled (or pooling one token is the
    token itself), so CCA is exactly causal attention: `longreach.ops.attention` (SDPA);
  - CUDA tensors with Triton installed: the fused Triton kernels (`triton.py`: pooling,
    forward, backward);
  - otherwise the blocked pure-PyTorch specification (`reference.cca_attention_reference`).
`impl="triton"` or `impl="reference"` (or LONGREACH_KERNELS=triton|reference, or cca=... in
a per-op list; see `longreach.ops.backend`) forces one of the two.

`cca_pool` (one core token per complete group) and `cca_decode` (new queries against a
generation cache, a split-K Triton kernel on CUDA) expose the two halves a cache needs;
`core_count` gives J(t).
"""

from __future__ import annotations

import torch

from ..attention import dispatch_attention
from ..backend import kernel_path, triton_or_reference
from .reference import (
    CORE_HEADS,
    blocked_cca_attention,
    blocked_cca_decode,
    cca_attention_reference,
    cca_pool,
    check_cca_decode_inputs,
    check_cca_inputs,
    core_count,
)
from .reference import cca_decode as cca_decode_reference
from .sdpa import sdpa_cca_decode

SDPA_MIN_QUERIES = 16  # on the CPU, fewer new queries run on the reference's blocks

__all__ = [
    "CORE_HEADS",
    "cca_attention",
    "cca_attention_reference",
    "cca_decode",
    "cca_decode_reference",
    "cca_pool",
    "check_cca_decode_inputs",
    "check_cca_inputs",
    "core_count",
]


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
    path = kernel_path("cca", impl)
    scale = check_cca_inputs(
        q, k, v, group_size=group_size, window=window, scale=scale, core_heads=core_heads
    )
    if path == "auto" and (window >= q.shape[1] or group_size == 1):
        positions = torch.arange(q.shape[1], device=q.device)
        return dispatch_attention(
            q, k, v, positions, positions, path=kernel_path("attention"), default_positions=True,
            causal=True, window=None, sinks=0, scale=scale, alibi_slopes=None,
        )
    options = dict(group_size=group_size, window=window, scale=scale, core_heads=core_heads)
    if triton_or_reference(path, q, k, v, op="cca_attention") == "reference":
        return blocked_cca_attention(q, k, v, **options)
    from .triton import cca_attention_triton

    return cca_attention_triton(q, k, v, **options)


def cca_decode(
    q: torch.Tensor,
    core_k: torch.Tensor | None,
    core_v: torch.Tensor | None,
    raw_k: torch.Tensor,
    raw_v: torch.Tensor,
    *,
    raw_start: int,
    group_size: int = 16,
    window: int = 1024,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """CCA for the newest queries against a generation cache: `reference.cca_decode`.

    On CUDA (or with impl="triton") a split-K Triton kernel reads the cache once per core head;
    many new queries at once (a prefill segment) run through SDPA, one call per block of
    queries over the keys it can see (`sdpa.sdpa_cca_decode`; on the CPU from
    SDPA_MIN_QUERIES new queries on, below which the reference's blocks are quicker), and
    impl="reference" keeps the reference's blocks.
    """
    path = kernel_path("cca", impl)
    core_k, core_v, raw_start, scale = check_cca_decode_inputs(
        q, core_k, core_v, raw_k, raw_v, raw_start=raw_start, group_size=group_size,
        window=window, scale=scale,
    )
    options = dict(raw_start=raw_start, group_size=group_size, window=window, scale=scale)
    if triton_or_reference(path, q, raw_k, raw_v, op="cca_decode") == "triton":
        from .triton import DECODE_MAX_ROWS, cca_decode_triton

        # rows of one program: the query heads reading one core head (one per key/value head
        # before anything is pooled) times the new queries
        core_heads = core_k.shape[2] if core_k.shape[1] else raw_k.shape[2]
        if (q.shape[2] // core_heads) * q.shape[1] <= DECODE_MAX_ROWS:
            return cca_decode_triton(q, core_k, core_v, raw_k, raw_v, **options)
    if path == "auto" and (q.is_cuda or q.shape[1] >= SDPA_MIN_QUERIES):
        return sdpa_cca_decode(q, core_k, core_v, raw_k, raw_v, **options)
    return blocked_cca_decode(q, core_k, core_v, raw_k, raw_v, **options)
