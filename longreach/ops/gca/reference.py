"""Grouped chunk attention in pure PyTorch: the specification of `longreach.ops.gca_attention`.

Runs on any device and is differentiable (autograd through the block loop). Query chunks are
processed in blocks; each block gathers only the K/V chunks its indices name, so memory is
O(T * K * chunk_size) per block and there is never a T x M score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longreach.ops.backend import compute_dtype, needs_value_check
from longreach.ops.validation import check_qkv

# Upper bound on the elements of one block's score matrix (B * HQ * K * chunk_size^2 per query
# chunk): 16 MB in fp32. Softmax and einsum make a few copies of it, so peak is a few times more.
_SCORE_BUDGET = 1 << 22


def check_gca_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
) -> float:
    """Validate the arguments of `gca_attention`; return the scale (default 1/sqrt(head_dim)).

    That the indices lie in [-1, n_chunks - 1] is checked when they are on the CPU or under
    LONGREACH_CHECKS=1 (the check reads them on the host); out-of-range ids on a GPU are
    undefined behaviour of the kernels.
    """
    check_qkv(q, k, v)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    B, T, HQ, D = q.shape
    M, H = k.shape[1], k.shape[2]
    if B == 0 or T == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if M % chunk_size != 0:
        raise ValueError(
            f"memory length {M} (k.shape[1]) must be a multiple of chunk_size {chunk_size}"
        )
    n_chunks = M // chunk_size

    if not isinstance(indices, torch.Tensor) or indices.dim() != 4:
        shape = (
            tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        )
        raise ValueError(
            f"indices must be a 4-D tensor [batch, query_chunks, heads, slots], got {shape}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must hold integer chunk ids, got {indices.dtype}")
    n_query_chunks = -(-T // chunk_size)
    if tuple(indices.shape[:2]) != (B, n_query_chunks):
        raise ValueError(
            f"indices must have shape [{B}, {n_query_chunks}, ...] (batch, ceil(T / chunk_size)"
            f" with T={T}, chunk_size={chunk_size}), got {tuple(indices.shape)}"
        )
    if indices.shape[2] not in (1, H):
        raise ValueError(
            f"indices.shape[2] must be 1 (shared retrieval) or {H} (one per key/value head), "
            f"got {indices.shape[2]}"
        )
    if not isinstance(weights, torch.Tensor) or weights.shape != indices.shape:
        shape = (
            tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        )
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, got {shape}"
        )
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    devices = {t.device for t in (q, k, v, indices, weights)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, indices, weights must be on one device, got {devices}")
    if indices.numel() and needs_value_check(indices):
        lo, hi = torch.stack([indices.min(), indices.max()]).tolist()
        if lo < -1 or hi >= n_chunks:
            raise ValueError(
                f"indices must lie in [-1, {n_chunks - 1}] (-1 = empty slot; the memory holds "
                f"{n_chunks} chunks), got values in [{lo}, {hi}]"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return float(scale)


def gca_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    chunks_per_block: int | None = None,
) -> torch.Tensor:
    r"""Grouped chunk attention: each query chunk attends to its retrieved memory chunks.

    q: [B, T, HQ, D]; k, v: [B, M, H, D], the chunk memory with M = n_chunks * chunk_size
    (chunk j is rows j*cs .. (j+1)*cs - 1, cs = chunk_size); indices, weights: [B, NQ, Hr, K]
    with NQ = ceil(T / cs), Hr = H (retrieval per key/value head) or 1 (shared by all heads).
    Query t lies in query chunk c = t // cs; query head h reads key/value head
    hk = h // (HQ // H) and retrieval row r = hk (Hr == H) or 0 (Hr == 1). Then

        o[b, t, h] = \sum_{kk: j >= 0} w[b, c, r, kk] * softmax(scale * q[b, t, h] . K_j^T) V_j

    with j = indices[b, c, r, kk], K_j = k[b, j*cs:(j+1)*cs, hk] and likewise V_j: one
    non-causal softmax per retrieved chunk, no positional term. Slots with j = -1 are empty
    (their weights are ignored); a query chunk with only empty slots returns zeros. Duplicate
    ids count once per slot. The softmax runs in float32 (float64 for float64 inputs); the
    output has q's dtype. dL/dweights[b, c, r, kk] = sum over heads and positions of
    <o_kk, dO>, with o_kk the softmax output of slot kk.

    `chunks_per_block` sets how many query chunks are processed together (default: as many
    as fit a fixed score-memory budget).
    """
    scale = check_gca_inputs(q, k, v, indices, weights, chunk_size=chunk_size, scale=scale)
    if chunks_per_block is not None and chunks_per_block < 1:
        raise ValueError(f"chunks_per_block must be >= 1, got {chunks_per_block}")
    return blocked_gca_attention(
        q, k, v, indices, weights, chunk_size=chunk_size, scale=scale,
        chunks_per_block=chunks_per_block,
    )


def blocked_gca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int,
    scale: float,
    chunks_per_block: int | None = None,
) -> torch.Tensor:
    """`gca_attention_reference` on inputs `check_gca_inputs` has validated (scale filled in)."""
    B, T, HQ, D = q.shape
    M, H = k.shape[1], k.shape[2]
    cs, G, K = chunk_size, HQ // H, indices.shape[3]
    n_query_chunks = indices.shape[1]
    dtype = compute_dtype(q.dtype)
    if chunks_per_block is None:
        chunks_per_block = max(1, _SCORE_BUDGET // max(1, B * HQ * K * cs * cs))

    # Chunk-major views [B, H, n_chunks, cs, D]. An empty memory gets one zero chunk so the
    # gather below has something to read; every slot is empty then and masked anyway.
    if M == 0:
        k = torch.cat([k, k.new_zeros(B, cs, H, D)], dim=1)
        v = torch.cat([v, v.new_zeros(B, cs, H, D)], dim=1)
    k_chunks = k.reshape(B, -1, cs, H, D).permute(0, 3, 1, 2, 4)
    v_chunks = v.reshape(B, -1, cs, H, D).permute(0, 3, 1, 2, 4)
    batch_ids = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    head_ids = torch.arange(H, device=q.device).view(1, 1, H, 1)

    outputs = []
    for c0 in range(0, n_query_chunks, chunks_per_block):
        c1 = min(c0 + chunks_per_block, n_query_chunks)
        nc = c1 - c0
        t0, t1 = c0 * cs, min(c1 * cs, T)
        # The last query chunk may be short: pad it to a whole chunk and drop the extra rows.
        q_blk = F.pad(q[:, t0:t1], (0, 0, 0, 0, 0, nc * cs - (t1 - t0)))
        q_blk = q_blk.to(dtype).reshape(B, nc, cs, H, G, D) * scale

        idx = indices[:, c0:c1].long()
        valid = idx >= 0
        # An Hr == 1 row broadcasts over the key/value heads in this gather: [B, nc, H, K, cs, D].
        k_sel = k_chunks[batch_ids, head_ids, idx.clamp_min(0)].to(dtype)
        v_sel = v_chunks[batch_ids, head_ids, idx.clamp_min(0)].to(dtype)
        # A slot's weight scales its whole output, so it can scale V_j instead of the (larger)
        # probabilities; empty slots get weight 0 (and no gradient).
        w = torch.where(valid, weights[:, c0:c1].to(dtype), 0.0)
        v_sel = v_sel * w[..., None, None]

        scores = torch.einsum("bcshgd,bchknd->bchgksn", q_blk, k_sel)
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bchgksn,bchknd->bcshgd", probs, v_sel)
        outputs.append(out.reshape(B, nc * cs, HQ, D)[:, : t1 - t0])
    return torch.cat(outputs, dim=1).to(q.dtype)
