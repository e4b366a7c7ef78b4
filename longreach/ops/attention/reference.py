"""Blocked softmax attention in pure PyTorch: the specification of `longreach.ops.attention`.

Runs on any device and is differentiable (autograd through the block loop). Queries are
processed in blocks, and each block gathers only the keys it can see, so windowed attention
needs O(T * (window + sinks + block)) memory and never a T x S score or mask matrix.
"""

from __future__ import annotations

import math

import torch

from longreach.ops.backend import compute_dtype, needs_value_check
from longreach.ops.validation import check_qkv

# Upper bound on the elements of one block's score matrix (B * HQ * block * keys): 64 MB in fp32.
_SCORE_BUDGET = 1 << 24
_MAX_BLOCK = 1024


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    sinks: int = 0,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate the arguments of `attention`; return (q_pos, k_pos, scale) with defaults filled.

    Default positions: k_pos = arange(S) and q_pos = arange(S - T, S), i.e. the queries are
    the last T tokens, as when decoding with a KV cache (the plain case when T == S). That
    k_pos is sorted is checked when it is on the CPU or under LONGREACH_CHECKS=1 (the check
    reads it on the host).
    """
    check_qkv(q, k, v)
    B, T, HQ, D = q.shape
    S = k.shape[1]
    if T == 0 or S == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    if k_pos is None:
        k_pos = torch.arange(S, device=q.device)
    else:
        given = k_pos
        k_pos = _check_positions("k_pos", k_pos, S, q.device)
        if S > 1 and needs_value_check(given) and not bool((k_pos[1:] >= k_pos[:-1]).all()):
            raise ValueError("k_pos must be sorted ascending")
    if q_pos is None:
        q_pos = torch.arange(S - T, S, device=q.device)
    else:
        q_pos = _check_positions("q_pos", q_pos, T, q.device)

    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) != (HQ,):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else None
            raise ValueError(
                f"alibi_slopes must have shape [{HQ}] (one per query head), got {shape}"
            )
    return q_pos, k_pos, float(scale)


def _check_positions(
    name: str, pos: torch.Tensor, length: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.shape[0] != length:
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got {shape}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer positions, got {pos.dtype}")
    return pos.to(device=device, dtype=torch.long)


def key_visible(
    p: torch.Tensor, j: torch.Tensor, *, causal: bool, window: int | None, sinks: int
) -> torch.Tensor:
    """True where a query at position p sees a key at position j (elementwise, broadcasting)."""
    dist = p - j
    if window is None:
        near = torch.ones_like(dist, dtype=torch.bool)
    else:
        near = ((dist if causal else dist.abs()) < window) | (j < sinks)
    return near & (dist >= 0) if causal else near


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: int = 0,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    r"""Softmax attention with causal / sliding-window / sink masks, GQA and ALiBi.

    q: [B, T, HQ, D]; k, v: [B, S, H, D] with HQ a multiple of H; query head h reads key/value
    head h // (HQ // H). Query t sits at position p = q_pos[t], key s at j = k_pos[s] (k_pos
    sorted ascending). For each query head h:

        o_t = \sum_s softmax_s(scale * q_t . k_s - m_h * d(p, j) + M(p, j)) v_s

    with the mask M(p, j) = 0 where the key is visible and -inf elsewhere:
      causal:     visible iff j <= p  and (window is None or p - j < window or j < sinks)
      not causal: visible iff window is None or |p - j| < window or j < sinks
    and the ALiBi distance d(p, j) = p - j (|p - j| when not causal), m = alibi_slopes (0 if
    None). Default scale 1/sqrt(D). A query that sees no key returns zeros. The softmax runs
    in float32 (float64 for float64 inputs); the output has q's dtype.
    """
    q_pos, k_pos, scale = check_attention_inputs(
        q, k, v, window=window, sinks=sinks, scale=scale, q_pos=q_pos, k_pos=k_pos,
        alibi_slopes=alibi_slopes,
    )
    return blocked_attention(
        q, k, v, q_pos, k_pos, causal=causal, window=window, sinks=sinks, scale=scale,
        alibi_slopes=alibi_slopes, block_size=block_size,
    )


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    sinks: int,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    block_size: int | None = None,
) -> torch.Tensor:
    """`attention_reference` on inputs `check_attention_inputs` has validated and filled in."""
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    dtype = compute_dtype(q.dtype)
    q = q.reshape(B, T, H, G, D)  # query head h*G + g reads key/value head h: no K/V copies
    slopes = None if alibi_slopes is None else alibi_slopes.to(q.device, dtype).view(H, G, 1, 1)

    # Index bounds on the host once (one copy per position tensor; no further device reads),
    # so the loop slices with plain ints.
    q_pos_host, k_pos_host = q_pos.cpu(), k_pos.cpu()
    # Without a window, sinks change nothing: every key at j <= p is already visible.
    n_sinks = int((k_pos_host < sinks).sum()) if window is not None else 0  # a sorted prefix
    if block_size is None:
        # A block about as long as the window keeps the wasted (masked) part of its scores small.
        block_size = _MAX_BLOCK if window is None else min(_MAX_BLOCK, max(128, window))
        span = S if window is None else min(S, (1 if causal else 2) * window + n_sinks + block_size)
        block_size = max(1, min(block_size, _SCORE_BUDGET // (B * HQ * span)))

    outputs = []
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        p_min, p_max = int(q_pos_host[t0:t1].min()), int(q_pos_host[t0:t1].max())
        # Visible keys: the sink prefix plus the contiguous index run [lo, hi) whose positions lie
        # in [p_min - window + 1, p_max] (causal) or [p_min - window + 1, p_max + window - 1].
        lo, hi = 0, S
        if window is not None:
            lo = int(torch.searchsorted(k_pos_host, p_min - window + 1))
        if causal:
            hi = int(torch.searchsorted(k_pos_host, p_max, right=True))
        elif window is not None:
            hi = int(torch.searchsorted(k_pos_host, p_max + window - 1, right=True))
        lo = max(lo, n_sinks)
        hi = max(hi, lo)
        k_blk, v_blk, kp_blk = k[:, lo:hi], v[:, lo:hi], k_pos[lo:hi]
        if n_sinks:
            k_blk = torch.cat([k[:, :n_sinks], k_blk], dim=1)
            v_blk = torch.cat([v[:, :n_sinks], v_blk], dim=1)
            kp_blk = torch.cat([k_pos[:n_sinks], kp_blk])
        qp_blk = q_pos[t0:t1]

        q_blk = q[:, t0:t1].to(dtype) * scale
        scores = torch.einsum("bthgd,bshd->bhgts", q_blk, k_blk.to(dtype))
        if slopes is not None:
            dist = (qp_blk[:, None] - kp_blk[None, :]).to(dtype)
            scores = scores - slopes * (dist if causal else dist.abs())
        visible = key_visible(qp_blk[:, None], kp_blk[None, :], causal=causal, window=window,
                              sinks=sinks)
        has_key = visible.any(dim=-1)
        # A query that sees no key attends to all keys here (no NaN, even in backward), and its
        # output is zeroed below.
        scores = scores.masked_fill(~(visible | ~has_key[:, None]), float("-inf"))
        out = torch.einsum("bhgts,bshd->bthgd", torch.softmax(scores, dim=-1), v_blk.to(dtype))
        out = out.masked_fill(~has_key[:, None, None, None], 0.0)
        outputs.append(out.reshape(B, t1 - t0, HQ, D))
    return torch.cat(outputs, dim=1).to(q.dtype)
