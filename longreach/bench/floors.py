"""FLOP and byte floors of the benchmarked ops: what a row's time is compared with.

A row's floors are its matmul FLOPs and the minimum bytes it must move; `floor_ms` is the time
the two allow on a chip with a given dense rate and memory bandwidth (``x floor`` = measured /
that time). Attention counts (query, key) pairs, 4 D FLOPs per pair (QK^T and PV); the
recurrence counts the products of the chunked algorithm.
"""

from __future__ import annotations

import torch

from longreach.ops.cca import core_count

# Flash-attention convention: the backward pass does 2.5x the forward's matmul FLOPs.
BACKWARD_FACTOR = 2.5
CHUNK = 64  # the chunk length the recurrence's FLOP count assumes (fla-core's and the reference's)


# ---------------------------------------------------------------- attention


def causal_pairs(seq_len: int) -> int:
    """(query, key) pairs causal attention computes: T (T + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def window_pairs(seq_len: int, window: int) -> int:
    """Pairs of causal sliding-window attention (query t sees keys t - window + 1 .. t)."""
    if seq_len <= window:
        return causal_pairs(seq_len)
    return causal_pairs(window) + (seq_len - window) * window


def cca_pairs(seq_len: int, *, group_size: int, window: int) -> int:
    """Keys CCA's queries see, summed over t: J(t) core tokens + the raw tokens J(t) g .. t."""
    t = torch.arange(seq_len, dtype=torch.int64)
    J = core_count(t, group_size=group_size, window=window)
    return int((J + t + 1 - J * group_size).sum())


def attention_flops(pairs: int, *, batch: int, q_heads: int, head_dim: int,
                    backward: bool = False) -> int:
    """Matmul FLOPs of attention over `pairs` (query, key) pairs per head: QK^T and PV, 2 FLOPs
    per multiply-add each, so 4 D per pair; forward+backward is 3.5x that."""
    flops = 4 * batch * q_heads * head_dim * pairs
    return round(flops * (1 + BACKWARD_FACTOR)) if backward else flops


def causal_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                           backward: bool = False) -> int:
    """Causal self-attention: 4 B HQ D T (T + 1) / 2 forward (x3.5 with the backward)."""
    return attention_flops(causal_pairs(seq_len), batch=batch, q_heads=q_heads,
                           head_dim=head_dim, backward=backward)


def window_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                           window: int, backward: bool = False) -> int:
    """Causal sliding-window attention: 4 B HQ D sum_t min(t + 1, window)."""
    return attention_flops(window_pairs(seq_len, window), batch=batch, q_heads=q_heads,
                           head_dim=head_dim, backward=backward)


def cca_pool_flops(batch: int, pool_heads: int, seq_len: int, head_dim: int, *, group_size: int,
                   window: int, backward: bool = False) -> int:
    """Pooling the groups some query sees (J(T - 1) of them), per pooling head: the scores of
    the group's last query against its g keys and the weighted sums of keys and values, 3
    matvecs of 2 g D FLOPs. pool_heads: HQ (core_heads="query") or H ("kv"). Backward: 2x."""
    groups = core_count(seq_len - 1, group_size=group_size, window=window)
    flops = 6 * batch * pool_heads * groups * group_size * head_dim
    return 3 * flops if backward else flops


def cca_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                        group_size: int, window: int, pool_heads: int | None = None,
                        backward: bool = False) -> int:
    """CCA: 4 B HQ D sum_t (J(t) + t + 1 - J(t) g), plus the pooling when pool_heads is given
    (None: core tokens are inputs, as for FlexAttention with the CCA mask)."""
    flops = attention_flops(
        cca_pairs(seq_len, group_size=group_size, window=window), batch=batch,
        q_heads=q_heads, head_dim=head_dim, backward=backward,
    )
    if pool_heads is not None:
        flops += cca_pool_flops(batch, pool_heads, seq_len, head_dim, group_size=group_size,
                                window=window, backward=backward)
    return flops


def gca_attention_flops(indices: torch.Tensor, *, q_heads: int, kv_heads: int, seq_len: int,
                        chunk_size: int, head_dim: int, backward: bool = False) -> int:
    """GCA: every query of chunk c attends to the chunk_size keys of each non-empty slot of
    its row; 4 D per pair as for attention (the K-way weighted sum, 2 FLOPs per output
    element and slot, is left out). With every slot full: 4 B HQ T K cs D.

    indices: [B, ceil(T / cs), 1 or H, K] (-1 = empty), as `gca_attention` takes them.
    """
    n_chunks = indices.shape[1]
    queries = torch.full((n_chunks,), chunk_size, dtype=torch.int64)
    queries[-1] = seq_len - (n_chunks - 1) * chunk_size  # a partial last chunk
    full_slots = (indices >= 0).sum(dim=3).cpu().to(torch.int64)  # [B, NQ, Hr]
    heads_per_row = q_heads if indices.shape[2] == 1 else q_heads // kv_heads
    pairs = int((full_slots * queries[None, :, None]).sum()) * chunk_size * heads_per_row
    return attention_flops(pairs, batch=1, q_heads=1, head_dim=head_dim, backward=backward)


def min_bytes(*, q_elems: int, kv_elems: int, elem_bytes: int = 2, extra: int = 0,
              backward: bool = False) -> int:
    """Minimum bytes moved: read q, k, v once and write o (q-sized); forward+backward adds
    reading do and writing dq, dk, dv (twice the forward). kv_elems: elements of k (= of v),
    core tokens included where they are read; `extra` bytes (indices, weights) are added as
    they are (twice with the backward: dweights)."""
    fwd = (2 * q_elems + 2 * kv_elems) * elem_bytes + extra
    return 2 * fwd if backward else fwd


def floor_ms(flops: int, nbytes: int, *, peak_flops: float, peak_bytes_per_s: float) -> float:
    """The time the two floors allow: max(flops / peak FLOP/s, bytes / peak bandwidth), in ms."""
    return 1e3 * max(flops / peak_flops, nbytes / peak_bytes_per_s)


# ---------------------------------------------------------------- linear recurrence


def recurrence_flops(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, *,
                     backward: bool = False, chunk: int = CHUNK) -> int:
    """Matmul FLOPs of the chunked recurrence: per token and head, the intra-chunk scores and
    values (2*chunk*(K+V)), the read of the carried state and its update (4*K*V); the
    backward counted as twice the forward."""
    fwd = batch * seq_len * heads * (2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim)
    return 3 * fwd if backward else fwd


def recurrence_bytes(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, *,
                     per_key: bool, backward: bool = False, elem: int = 2) -> int:
    """Minimum bytes: q, k, v read and o written once (elem bytes each), the float32 decays
    read, the float32 initial state read and final state written; with the backward also do
    read, dq/dk/dv written, dg and d(initial state) written, and the inputs read again."""
    tokens = batch * seq_len * heads
    inputs = tokens * (2 * key_dim + value_dim) * elem  # q, k, v (and dq, dk, dv)
    outputs = tokens * value_dim * elem  # o (and do)
    decay = tokens * (key_dim if per_key else 1) * 4  # g (and dg), float32
    state = batch * heads * key_dim * value_dim * 4  # one float32 state
    fwd = inputs + outputs + decay + 2 * state  # ... + initial state in, final state out
    if not backward:
        return fwd
    # reads q, k, v, do, g, the initial state and d(final state); writes dq, dk, dv, dg, d(initial)
    bwd = 2 * inputs + outputs + 2 * decay + 3 * state
    return fwd + bwd
