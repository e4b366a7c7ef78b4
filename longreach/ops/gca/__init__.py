"""Grouped chunk attention (GCA): each query chunk attends to K retrieved memory chunks.

Every retrieved chunk gets its own non-causal softmax, and the K per-chunk outputs are summed
with fusion weights (which receive gradients, so a retriever can learn from the loss).
`gca_attention` validates its inputs once and dispatches: the Triton kernel
(`triton.gca_attention_triton`, chunks read in place) for CUDA tensors when Triton imports,
the blocked pure-PyTorch specification (`reference.gca_attention_reference`) otherwise.
`impl="triton"|"reference"`, or LONGREACH_KERNELS=triton|reference (or gca=... in a per-op
list; see `longreach.ops.backend`), forces either. `gca_decode` serves a few queries of one query chunk.
"""

from __future__ import annotations

import torch

from ..backend import kernel_path, triton_or_reference
from .reference import blocked_gca_attention, check_gca_inputs, gca_attention_reference

__all__ = ["check_gca_inputs", "gca_attention", "gca_attention_reference", "gca_decode"]


def _choose(impl: str | None, q, k, v, *, chunk_size: int, op: str) -> str:
    """'triton' or 'reference'. Sizes or dtypes the kernel does not take (e.g. float64, chunks
    over 128 tokens) run the reference, unless impl='triton' was asked for: a ValueError."""
    chosen = triton_or_reference(kernel_path("gca", impl), q, k, v, op=op)
    if chosen == "triton":
        from .triton import unsupported_reason

        reason = unsupported_reason(chunk_size, q.shape[-1], q.dtype)
        if reason is not None:
            if impl == "triton":
                raise ValueError(f"{op}: {reason}; use impl='reference'")
            chosen = "reference"
    return chosen


def gca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """GCA over q [B, T, HQ, D] and the chunk memory k, v [B, n_chunks * chunk_size, H, D].

    indices, weights: [B, ceil(T / chunk_size), 1 or H, K]; chunk ids (-1 = empty slot) and
    fusion weights per query chunk. Returns [B, T, HQ, D]. The math is defined in
    `reference.gca_attention_reference`. impl: None (LONGREACH_KERNELS or the default rule),
    "auto", "triton" or "reference".
    """
    scale = check_gca_inputs(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    if _choose(impl, q, k, v, chunk_size=chunk_size, op="gca_attention") == "triton":
        from .triton import gca_attention_triton

        return gca_attention_triton(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    return blocked_gca_attention(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)


def gca_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """GCA for a few queries q [B, Tq, HQ, D], Tq <= chunk_size, that all lie in ONE query
    chunk, whose retrieval is indices, weights [B, 1, 1 or H, K].

    The same as `gca_attention` on those queries (each query's softmaxes do not depend on
    its position inside the chunk). Returns [B, Tq, HQ, D]. The Triton path is forward only.
    """
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1:
            if q.shape[1] > chunk_size:
                raise ValueError(
                    f"gca_decode takes at most chunk_size={chunk_size} queries (one query "
                    f"chunk), got {q.shape[1]}; use gca_attention for more"
                )
    if isinstance(indices, torch.Tensor) and indices.dim() == 4 and indices.shape[1] != 1:
        raise ValueError(
            "gca_decode: indices and weights describe one query chunk and must have shape "
            f"[batch, 1, heads, slots], got {tuple(indices.shape)}"
        )
    scale = check_gca_inputs(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    if _choose(impl, q, k, v, chunk_size=chunk_size, op="gca_decode") == "triton":
        from .triton import gca_decode_triton

        return gca_decode_triton(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    return blocked_gca_attention(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
