"""LM-Infinite attention (Han et al., 2024), the specification: a Lambda-shaped mask with the
relative distance capped at the window.

Query i sees key j when j < sinks or i - j < window (and j <= i). The distance it uses is
min(i - j, window), so a far sink token is read as if it stood exactly ``window`` tokens back:
with RoPE, its query is rotated by (j + window) - i more than at its own position.
Dense scores (T x S): meant for evaluation baselines, not for very long inputs.
"""

from __future__ import annotations

import torch

from longreach.ops.backend import compute_dtype
from longreach.ops.rope import apply_rope


def lm_infinite_attention(q, k, v, q_pos, *, sinks: int, window: int, inv_freq=None, scale=None):
    """Attention of q [B, T, HQ, D] at positions ``q_pos`` [T] over k, v [B, S, H, D] at
    positions 0..S-1 (HQ a multiple of H), all rotated by RoPE at their own positions.

    ``inv_freq`` [D / 2] are the model's RoPE frequencies; they are needed only when a query
    reads a sink more than ``window`` tokens back (ValueError without them). ``scale`` defaults
    to D ** -0.5. Returns [B, T, HQ, D] in q's dtype; scores are float32 (float64 for float64).
    """
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype).reshape(B, T, H, HQ // H, D)
    scores = torch.einsum("bthgd,bshd->bhgts", qf, k.to(dtype))
    i, j = q_pos[:, None], torch.arange(S, device=q.device)[None, :]
    visible = (j <= i) & ((j < sinks) | (i - j < window))
    far = (j < sinks) & (i - j > window)
    if bool(far.any()):
        if inv_freq is None:
            raise ValueError("LM-Infinite needs the model's RoPE frequencies (inv_freq)")
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float64)
        for sink in range(min(sinks, S)):
            rows = far[:, sink]
            if not bool(rows.any()):
                continue
            angles = (sink + window - q_pos[rows]).to(torch.float64)[:, None] * inv_freq[None, :]
            q_far = apply_rope(q[:, rows].to(dtype), angles.cos().to(dtype), angles.sin().to(dtype))
            capped = torch.einsum(
                "bthgd,bhd->bhgt", q_far.reshape(B, -1, H, HQ // H, D), k[:, sink].to(dtype)
            )
            scores[..., rows, sink] = capped
    scores = (scores * scale).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgts,bshd->bthgd", probs, v.to(dtype))
    return out.reshape(B, T, HQ, D).to(q.dtype)
