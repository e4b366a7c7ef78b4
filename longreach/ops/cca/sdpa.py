"""`cca_decode` for many new queries at once (a prefill segment) through fused SDPA.

The queries of a block see the core tokens of groups 0 .. J(p_last) - 1 and the raw tokens
from J(p_first) * g to p_last, so each block of queries runs one
`scaled_dot_product_attention` over [those core tokens ; those raw tokens] with the boolean
mask of `reference.decode_visible`. Only the keys a block can see are passed (the reference scores
every key in the cache), and the scores are never materialised in float32 on a GPU backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import core_count, decode_visible

BLOCK_QUERIES = 2048


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, h, D] -> [B, heads, S, D], each head repeated for the query heads reading it."""
    x = x.transpose(1, 2)
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def sdpa_cca_decode(q, core_k, core_v, raw_k, raw_v, *, raw_start, group_size, window, scale,
                    block_queries: int = BLOCK_QUERIES):
    """`cca_decode` on inputs `check_cca_decode_inputs` has validated and filled in."""
    g = group_size
    B, Tq, HQ, D = q.shape
    end = raw_start + raw_k.shape[1]
    p_first = end - Tq
    outputs = []
    for t0 in range(0, Tq, block_queries):
        t1 = min(t0 + block_queries, Tq)
        pos = torch.arange(p_first + t0, p_first + t1, device=q.device)
        n = core_count(p_first + t1 - 1, group_size=g, window=window)  # cores this block reads
        lo = core_count(p_first + t0, group_size=g, window=window) * g - raw_start
        hi = p_first + t1 - raw_start  # raw rows lo .. hi - 1
        k = torch.cat([_heads(core_k[:, :n], HQ), _heads(raw_k[:, lo:hi], HQ)], dim=2)
        v = torch.cat([_heads(core_v[:, :n], HQ), _heads(raw_v[:, lo:hi], HQ)], dim=2)
        mask = decode_visible(pos, n, raw_start + lo, hi - lo, group_size=g, window=window)
        out = F.scaled_dot_product_attention(q[:, t0:t1].transpose(1, 2), k, v,
                                             attn_mask=mask, scale=scale)
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, dim=1)
