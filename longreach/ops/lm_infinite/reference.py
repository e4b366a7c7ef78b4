"""LM-Infinite attention (Han et al., 2024), the specification: a Lambda-shaped mask with the
relative distance capped at the window.

Query i sees key j when j < sinks or i - j < window (and j <= i). The distance it uses is
min(i - j, window), so a far sink token is read as if it stood exactly ``window`` tokens back:
with RoPE, its query is rotated by (j + window) - i more than at its own position.
``i`` and ``j`` are positions in the text (``q_pos``, ``k_pos``): a bounded cache that keeps
only the sinks and the last keys passes their positions, not their indices.

``lm_infinite_reference`` computes dense scores (T x S); ``lm_infinite_attention`` gives the
same result with the queries in blocks, each against the sinks and the keys its window can
reach, so memory grows with T x (2 window + sinks) instead of T x S.
"""

from __future__ import annotations

import torch

from longreach.ops.backend import compute_dtype
from longreach.ops.rope import apply_rope


def lm_infinite_reference(q, k, v, q_pos, *, sinks: int, window: int, inv_freq=None, scale=None,
                          k_pos=None):
    """Attention of q [B, T, HQ, D] at positions ``q_pos`` [T] over k, v [B, S, H, D] at
    positions ``k_pos`` [S] (default 0..S-1; ascending), HQ a multiple of H, all rotated by
    RoPE at their own positions.

    ``inv_freq`` [D / 2] are the model's RoPE frequencies; they are needed only when a query
    reads a sink more than ``window`` tokens back (ValueError without them). ``scale`` defaults
    to D ** -0.5. Returns [B, T, HQ, D] in q's dtype; scores are float32 (float64 for float64).
    """
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if k_pos is None:
        k_pos = torch.arange(S, device=q.device)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype).reshape(B, T, H, HQ // H, D)
    scores = torch.einsum("bthgd,bshd->bhgts", qf, k.to(dtype))
    i, j = q_pos[:, None], k_pos[None, :]
    visible = (j <= i) & ((j < sinks) | (i - j < window))
    far = (j < sinks) & (i - j > window)
    if bool(far.any()):
        if inv_freq is None:
            raise ValueError("LM-Infinite needs the model's RoPE frequencies (inv_freq)")
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float64)
        for index in torch.nonzero(far.any(0)).flatten().tolist():
            rows = far[:, index]
            sink = k_pos[index]
            angles = (sink + window - q_pos[rows]).to(torch.float64)[:, None] * inv_freq[None, :]
            q_far = apply_rope(q[:, rows].to(dtype), angles.cos().to(dtype), angles.sin().to(dtype))
            capped = torch.einsum(
                "bthgd,bhd->bhgt", q_far.reshape(B, -1, H, HQ // H, D), k[:, index].to(dtype)
            )
            scores[..., rows, index] = capped
    scores = (scores * scale).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgts,bshd->bthgd", probs, v.to(dtype))
    return out.reshape(B, T, HQ, D).to(q.dtype)


def blocked_lm_infinite(q, k, v, q_pos, *, sinks: int, window: int, inv_freq=None, scale=None,
                        k_pos=None, block_size: int | None = None):
    """``lm_infinite_reference``, computed for blocks of ``block_size`` queries (default: the
    window, at least 256) at a time: each block reads the sink keys and the keys from its
    first query's window start to its last query. The same arguments and result."""
    T, S = q.shape[1], k.shape[1]
    if k_pos is None:
        k_pos = torch.arange(S, device=q.device)
    block = max(256, window) if block_size is None else block_size
    if T <= block:
        return lm_infinite_reference(q, k, v, q_pos, sinks=sinks, window=window,
                                     inv_freq=inv_freq, scale=scale, k_pos=k_pos)
    q_host, k_host = q_pos.cpu(), k_pos.cpu()  # bounds once on the host, slices with ints
    n_sinks = int((k_host < sinks).sum())      # the sinks are a sorted prefix of the keys
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        lo = int(torch.searchsorted(k_host, q_host[start] - window + 1))
        hi = int(torch.searchsorted(k_host, q_host[end - 1], right=True))
        lo = max(lo, n_sinks)
        index = torch.cat([torch.arange(n_sinks), torch.arange(lo, hi)]).to(k.device)
        outs.append(lm_infinite_reference(
            q[:, start:end], k[:, index], v[:, index], q_pos[start:end], sinks=sinks,
            window=window, inv_freq=inv_freq, scale=scale, k_pos=k_pos[index],
        ))
    return torch.cat(outs, dim=1)
