"""Core-context aware attention (CCA) in pure PyTorch: the specification of `longreach.ops.cca`.

CCA (Chen et al., "Core Context Aware Transformers for Long Context Language Modeling", ICML
2025) replaces the far past by one pooled "core token" per group of `group_size` tokens and
keeps the last `window` (or a few more) tokens exact; a query runs ONE softmax over
[its visible core tokens ; its raw tokens].

Groups are aligned from position 0: group m holds positions m*g .. m*g + g - 1 (g = group_size,
s = window). For a query at 0-indexed position t

    J(t) = max(0, floor((t + 1 - s) / g))        (`core_count`)

it sees the core tokens of groups 0 .. J-1 and the raw tokens J*g .. t. The two sets tile the
prefix 0..t exactly (no gap, no token seen twice); the raw part holds s + ((t + 1 - s) mod g)
tokens once t + 1 >= s, and the whole causal prefix before that. A group is pooled for query t
exactly when its last token lies at least s tokens before t: (m + 1) * g - 1 <= t - s.

Core token of group m, per query head h (see `cca_pool`): with q_last the query of the group's
last token, a_j = softmax_j(scale * q_last . k_j) over the group's g keys, and
core_k = sum_j a_j k_j, core_v = sum_j a_j v_j. Keys and queries are taken as given
(post-RoPE); core keys are never re-rotated. Gradients flow through a.

Everything here runs on any device and is differentiable (autograd through the block loop).
Queries are processed in blocks that gather only what they can see, so memory stays
O(T * (T / g + s)) and no T x T score or mask matrix is ever built.
"""

from __future__ import annotations

import math
import operator

import torch

from longreach.ops.backend import compute_dtype
from longreach.ops.validation import check_4d, check_qkv

# Upper bound on the elements of one block's score matrix (B * HQ * block * keys): 64 MB in fp32.
_SCORE_BUDGET = 1 << 24
_MAX_BLOCK = 1024
CORE_HEADS = ("query", "kv")


def core_count(t, *, group_size: int, window: int):
    """J(t): how many leading groups a query at 0-indexed position t sees as core tokens.

    Works elementwise on an int or an integer tensor. The numerator is clamped at 0 before the
    floor division, so no rounding mode can let a query just past the window see a group whose
    tokens are still in its raw window (the published Triton kernel truncated toward zero and
    gave queries t = s .. s+g-2 core token 0 on top of its raw tokens).
    """
    if isinstance(t, torch.Tensor):
        return (t + 1 - window).clamp_min(0) // group_size
    return max(0, t + 1 - window) // group_size


def _check_size(name: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_core_heads(core_heads: str) -> None:
    if core_heads not in CORE_HEADS:
        raise ValueError(f"core_heads must be one of {CORE_HEADS}, got {core_heads!r}")


def check_cca_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    window: int,
    scale: float | None = None,
    core_heads: str = "query",
) -> float:
    """Validate the arguments of `cca_attention`; return the scale (default 1/sqrt(head_dim))."""
    check_qkv(q, k, v)
    T, S = q.shape[1], k.shape[1]
    if T != S:
        raise ValueError(
            f"q and k/v must cover the same tokens (self-attention), got {T} and {S} tokens; "
            "use cca_decode for new queries against a cache"
        )
    if T == 0:
        raise ValueError("empty sequence: q, k, v have 0 tokens")
    _check_size("group_size", group_size)
    _check_size("window", window)
    _check_core_heads(core_heads)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def cca_pool(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int = 16,
    scale: float | None = None,
    core_heads: str = "query",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool each complete group of k, v into one core key and value.

    k, v: [B, S, H, D], tokens aligned so that group m is k[:, m*g : (m+1)*g]; the
    N = S // group_size complete groups are pooled and a trailing partial group is ignored.
    q: either [B, S, HQ, D] (the queries of the same tokens; only each group's last query,
    q[:, m*g + g - 1], is read) or [B, N, HQ, D] (just those last queries, what a generation
    cache keeps). Both readings agree when group_size == 1.

    core_heads="query" (the published method): one core token per QUERY head, pooled with that
    head's own q_last; returns core_k, core_v [B, N, HQ, D]. Under GQA (HQ = G * H) the query
    heads sharing a key/value head pool the same keys with different weights, so the core cache
    is G times larger than one per key/value head: per layer N * HQ + (window + g) * H head
    vectors instead of (N + window + g) * H.
    core_heads="kv": one core token per key/value head, pooled with the mean of the G last
    queries that share it (the mean of their logits); returns [B, N, H, D]. Identical to
    "query" when HQ == H, and keeps the core cache as small as the raw one per token.

    Pooling runs in float32 (float64 for float64 inputs); the result has k's dtype.
    """
    check_qkv(q, k, v)
    group_size = _check_size("group_size", group_size)
    _check_core_heads(core_heads)
    S, N = k.shape[1], k.shape[1] // group_size
    if q.shape[1] not in (S, N):
        raise ValueError(
            f"q must hold the queries of all {S} tokens or the {N} group-last queries "
            f"(group_size {group_size}), got {q.shape[1]}"
        )
    scale = 1.0 / math.sqrt(k.shape[-1]) if scale is None else float(scale)
    return _pool(q, k, v, group_size=group_size, scale=scale, core_heads=core_heads)


def _pool(q, k, v, *, group_size, scale, core_heads):
    """`cca_pool` on checked inputs (scale filled in)."""
    g = group_size
    B, S, H, D = k.shape
    HQ = q.shape[2]
    N = S // g
    q_last = q[:, g - 1 : N * g : g] if q.shape[1] == S else q
    dtype = compute_dtype(k.dtype)
    k_grp = k[:, : N * g].to(dtype).reshape(B, N, g, H, D)
    v_grp = v[:, : N * g].to(dtype).reshape(B, N, g, H, D)
    q_pool = q_last.to(dtype).reshape(B, N, H, HQ // H, D)
    if core_heads == "kv":
        q_pool = q_pool.mean(dim=3, keepdim=True)
    weights = torch.softmax(torch.einsum("bnhgd,bnjhd->bnhgj", q_pool * scale, k_grp), dim=-1)
    core_k = torch.einsum("bnhgj,bnjhd->bnhgd", weights, k_grp)
    core_v = torch.einsum("bnhgj,bnjhd->bnhgd", weights, v_grp)
    heads = q_pool.shape[2] * q_pool.shape[3]
    return core_k.reshape(B, N, heads, D).to(k.dtype), core_v.reshape(B, N, heads, D).to(v.dtype)


def decode_visible(q_pos, n: int, raw_start: int, r: int, *, group_size: int, window: int):
    """[len(q_pos), n + r] bool: which of core tokens 0..n-1 and raw tokens at positions
    raw_start .. raw_start + r - 1 each query (at absolute positions ``q_pos``) sees."""
    J = core_count(q_pos, group_size=group_size, window=window)[:, None]
    core_visible = torch.arange(n, device=q_pos.device)[None, :] < J
    j = torch.arange(raw_start, raw_start + r, device=q_pos.device)[None, :]
    raw_visible = (j >= J * group_size) & (j <= q_pos[:, None])
    return torch.cat([core_visible, raw_visible], dim=1)


def _attend(q, q_pos, core_k, core_v, raw_k, raw_v, raw_start, *, group_size, window, scale):
    """One joint softmax over [core tokens ; raw tokens] for a block of queries.

    q: [B, b, HQ, D] at absolute positions q_pos [b]; core_k/v: [B, n, Hc, D] for groups
    0..n-1; raw_k/v: [B, r, H, D] at positions raw_start .. raw_start + r - 1. Entries a query
    must not see (by J(t)) are masked, so callers may pass a superset of what it needs.
    """
    B, b, HQ, D = q.shape
    n, Hc = core_k.shape[1], core_k.shape[2]
    r, H = raw_k.shape[1], raw_k.shape[2]
    dtype = compute_dtype(q.dtype)
    q = q.to(dtype) * scale
    # Query head h reads core head h // (HQ // Hc) and raw head h // (HQ // H): no K/V copies.
    core_scores = torch.einsum(
        "bthgd,bnhd->bhgtn", q.reshape(B, b, Hc, HQ // Hc, D), core_k.to(dtype)
    ).reshape(B, HQ, b, n)
    raw_scores = torch.einsum(
        "bthgd,bshd->bhgts", q.reshape(B, b, H, HQ // H, D), raw_k.to(dtype)
    ).reshape(B, HQ, b, r)

    visible = decode_visible(q_pos, n, raw_start, r, group_size=group_size, window=window)
    scores = torch.cat([core_scores, raw_scores], dim=-1).masked_fill(~visible, float("-inf"))
    # Every query sees at least its own raw token, so no row is all -inf.
    probs = torch.softmax(scores, dim=-1)
    core_probs, raw_probs = probs.split([n, r], dim=-1)
    out = torch.einsum(
        "bhgtn,bnhd->bthgd", core_probs.reshape(B, Hc, HQ // Hc, b, n), core_v.to(dtype)
    ).reshape(B, b, HQ, D)
    return out + torch.einsum(
        "bhgts,bshd->bthgd", raw_probs.reshape(B, H, HQ // H, b, r), raw_v.to(dtype)
    ).reshape(B, b, HQ, D)


def _block_size(B, HQ, keys_per_query, block_size, window):
    if block_size is not None:
        return _check_size("block_size", block_size)
    # A block about as long as the window keeps the wasted (masked) part of its scores small.
    block = min(_MAX_BLOCK, max(128, window))
    return max(1, min(block, _SCORE_BUDGET // (B * HQ * (keys_per_query + block))))


def cca_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int = 16,
    window: int = 1024,
    scale: float | None = None,
    core_heads: str = "query",
    block_size: int | None = None,
) -> torch.Tensor:
    """CCA over q [B, T, HQ, D] and k, v [B, T, H, D] (causal self-attention); returns [B, T, HQ, D].

    The math is in this module's docstring: query t runs one softmax over the core tokens of
    groups 0..J(t)-1 (`cca_pool`, with `core_heads` as there) and the raw tokens J(t)*g .. t.
    GQA: query head h reads key/value head h // (HQ // H). Default scale 1/sqrt(D), used both
    for pooling and for attention. window >= T, or group_size == 1, is exactly causal attention.
    The softmax runs in float32 (float64 for float64 inputs); core tokens are rounded to k's
    dtype (as a cache stores them); the output has q's dtype.
    """
    scale = check_cca_inputs(
        q, k, v, group_size=group_size, window=window, scale=scale, core_heads=core_heads
    )
    return blocked_cca_attention(
        q, k, v, group_size=group_size, window=window, scale=scale, core_heads=core_heads,
        block_size=block_size,
    )


def blocked_cca_attention(q, k, v, *, group_size, window, scale, core_heads, block_size=None):
    """`cca_attention_reference` on inputs `check_cca_inputs` has validated (scale filled in)."""
    g = group_size
    B, T, HQ, _ = q.shape
    # Only groups some query sees are pooled: J(T - 1) of them.
    n_core = core_count(T - 1, group_size=g, window=window)
    core_k, core_v = _pool(
        q[:, : n_core * g], k[:, : n_core * g], v[:, : n_core * g], group_size=g, scale=scale,
        core_heads=core_heads,
    )
    block_size = _block_size(B, HQ, n_core + window + g, block_size, window)
    positions = torch.arange(T, device=q.device)
    outputs = []
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        # The block's queries need core groups < J(t1 - 1) and raw tokens from J(t0) * g.
        n = core_count(t1 - 1, group_size=g, window=window)
        lo = core_count(t0, group_size=g, window=window) * g
        outputs.append(_attend(
            q[:, t0:t1], positions[t0:t1], core_k[:, :n], core_v[:, :n], k[:, lo:t1],
            v[:, lo:t1], lo, group_size=g, window=window, scale=scale,
        ))
    return torch.cat(outputs, dim=1).to(q.dtype)


def check_cca_decode_inputs(q, core_k, core_v, raw_k, raw_v, *, raw_start, group_size, window,
                            scale):
    """Validate the arguments of `cca_decode`; return (core_k, core_v, raw_start, scale)."""
    check_qkv(q, raw_k, raw_v)
    g = _check_size("group_size", group_size)
    window = _check_size("window", window)
    B, Tq, HQ, D = q.shape
    R = raw_k.shape[1]
    try:
        if isinstance(raw_start, bool):
            raise TypeError
        raw_start = operator.index(raw_start)
    except TypeError:
        raise ValueError(f"raw_start must be an integer, got {raw_start!r}") from None
    if raw_start < 0:
        raise ValueError(f"raw_start must be >= 0, got {raw_start}")
    if Tq == 0:
        raise ValueError("q has no queries")
    if R < Tq:
        raise ValueError(
            f"raw_k/raw_v must end with the {Tq} new tokens, but hold only {R} tokens"
        )
    if (core_k is None) != (core_v is None):
        raise ValueError("core_k and core_v must both be tensors or both be None")
    if core_k is None:
        core_k = core_v = raw_k.new_zeros(B, 0, raw_k.shape[2], D)
    check_4d(core_k=core_k, core_v=core_v)
    if core_k.shape != core_v.shape:
        raise ValueError(
            f"core_k and core_v must have the same shape, got {tuple(core_k.shape)} and "
            f"{tuple(core_v.shape)}"
        )
    N, Hc = core_k.shape[1], core_k.shape[2]
    if core_k.shape[0] != B or core_k.shape[3] != D or Hc == 0 or HQ % Hc != 0:
        raise ValueError(
            f"core_k/core_v must be [{B}, N, Hc, {D}] with {HQ} a multiple of Hc, got "
            f"{tuple(core_k.shape)}"
        )
    if core_k.dtype != q.dtype or core_k.device != q.device or core_v.dtype != q.dtype:
        raise ValueError(
            f"core_k/core_v must match q's dtype and device ({q.dtype}, {q.device}), got "
            f"{core_k.dtype}, {core_k.device}"
        )
    end = raw_start + R  # tokens in the sequence so far
    if N * g > end:
        raise ValueError(
            f"core_k holds {N} groups ({N * g} tokens) but the sequence has only {end} tokens"
        )
    p_first, p_last = end - Tq, end - 1
    need_core = core_count(p_last, group_size=g, window=window)
    if N < need_core:
        raise ValueError(
            f"the query at position {p_last} needs {need_core} core tokens, the cache has {N}: "
            "pool the groups that left the window first"
        )
    need_raw = core_count(p_first, group_size=g, window=window) * g
    if raw_start > need_raw:
        raise ValueError(
            f"the query at position {p_first} needs raw tokens from position {need_raw}, "
            f"the cache starts at {raw_start}"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return core_k, core_v, raw_start, scale


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
) -> torch.Tensor:
    """CCA for the newest Tq tokens against a generation cache; returns [B, Tq, HQ, D].

    q: [B, Tq, HQ, D], the queries of the last Tq tokens of the sequence so far.
    core_k, core_v: [B, N, Hc, D], the core tokens of groups 0..N-1 as `cca_pool` returns
        them (Hc = HQ for core_heads="query", H for "kv"; query head h reads core head
        h // (HQ // Hc)); None when nothing is pooled yet.
    raw_k, raw_v: [B, R, H, D], the raw keys/values of positions raw_start .. raw_start + R - 1,
        ending with the Tq new tokens (R >= Tq).
    Query i sits at position p_i = raw_start + R - Tq + i and sees exactly what it sees in
    `cca_attention` over the whole sequence. The cache must hold what the queries need: the
    core tokens of groups 0 .. J(p_last) - 1 (N >= J(p_last)) and the raw tokens from
    J(p_first) * g on (raw_start <= J(p_first) * g); extra core or raw entries are masked.
    scale (default 1/sqrt(D)) must be the one the core tokens were pooled with.

    A cache that calls this per step keeps: the core tokens so far; the raw K/V from
    J(p) * g of the last query p (at most window + group_size - 1 tokens, plus the new ones); and
    the query of each complete group's last token until that group is pooled. Before a step
    whose queries end at p_last, pool every group m < J(p_last) not yet pooled
    (cca_pool(q_last, k_group, v_group)) and append it; after the step, drop raw tokens before
    J(p_last) * g.
    """
    core_k, core_v, raw_start, scale = check_cca_decode_inputs(
        q, core_k, core_v, raw_k, raw_v, raw_start=raw_start, group_size=group_size,
        window=window, scale=scale,
    )
    return blocked_cca_decode(
        q, core_k, core_v, raw_k, raw_v, raw_start=raw_start, group_size=group_size,
        window=window, scale=scale,
    )


def blocked_cca_decode(q, core_k, core_v, raw_k, raw_v, *, raw_start, group_size, window, scale):
    """`cca_decode` on inputs `check_cca_decode_inputs` has validated and filled in."""
    g = group_size
    B, Tq, HQ, D = q.shape
    N, R = core_k.shape[1], raw_k.shape[1]
    end = raw_start + R
    p_first = end - Tq
    positions = torch.arange(p_first, end, device=q.device)
    block_size = _block_size(B, HQ, N + R, None, window)
    outputs = []
    for t0 in range(0, Tq, block_size):
        t1 = min(t0 + block_size, Tq)
        outputs.append(_attend(
            q[:, t0:t1], positions[t0:t1], core_k, core_v, raw_k, raw_v, raw_start,
            group_size=g, window=window, scale=scale,
        ))
    return torch.cat(outputs, dim=1).to(q.dtype)
