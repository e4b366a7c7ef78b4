"""``longreach bench attention --suite decode``: one decode step at 128K context, GQA 32/8,
batch 1 and 8: SDPA over the full cache vs `cca_decode` over a CCA cache of the same context
(core tokens per query or per key/value head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longreach.bench.baselines import fused_sdpa
from longreach.bench.floors import attention_flops, min_bytes
from longreach.bench.harness import free_memory, length_label, randn
from longreach.ops.cca import core_count

if TYPE_CHECKING:
    from longreach.bench.attention import AttentionBench


def run(bench: AttentionBench) -> None:
    context, HQ, H, D, g, s, batches = 128 * 1024, 32, 8, 128, 16, 1024, (1, 8)
    if bench.tiny:
        context, HQ, H, D, g, s, batches = 300, 4, 1, 64, 8, 32, (1, 2)
    p = context - 1  # the new token's position: the cache holds the context before it
    n_core = core_count(p, group_size=g, window=s)
    for B in batches:
        shape = dict(batch=B, context=context, q_heads=HQ, kv_heads=H, head_dim=D,
                     group_size=g, window=s, core_tokens=n_core,
                     raw_tokens=context - n_core * g)
        common = dict(suite="decode", case=f"ctx={length_label(context)} B={B} GQA {HQ}/{H}",
                      shape=shape, pass_="decode")
        torch.manual_seed(0)
        q = randn(B, 1, HQ, D, device=bench.device)
        full_bytes = _full(bench, common, q)
        free_memory(bench.device)  # the row's tensors died with its function
        for core_heads in ("query", "kv"):
            _cca(bench, common, q, core_heads, full_bytes)
            free_memory(bench.device)


def _full(bench: AttentionBench, common: dict, q) -> int:
    """SDPA of the new query over the whole cache ([B, H, S, D], as HF caches hold it)."""
    B, S, HQ, H, D = (common["shape"][k] for k in ("batch", "context", "q_heads", "kv_heads",
                                                    "head_dim"))
    k, v = (randn(B, H, S, D, device=bench.device) for _ in range(2))
    qt = q.transpose(1, 2)
    with torch.inference_mode(), fused_sdpa(bench.device):
        ms = bench.time(lambda: F.scaled_dot_product_attention(qt, k, v, enable_gqa=True))
    nbytes = min_bytes(q_elems=B * HQ * D, kv_elems=B * S * H * D)
    bench.add(**common, kind="sdpa", impl="sdpa full cache", ms=ms, bytes=nbytes,
              flops=attention_flops(S, batch=B, q_heads=HQ, head_dim=D),
              note=f"reads {nbytes / 2**20:.4g} MiB")
    return nbytes


def _cca(bench: AttentionBench, common: dict, q, core_heads: str, full_bytes: int) -> None:
    """cca_decode over the cache a CCA model holds at this point: the core tokens of groups
    0 .. J(p) - 1 and the raw K/V from J(p) g to p (the docstring of cca_decode)."""
    shape = common["shape"]
    B, HQ, H, D = (shape[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
    N, R, g = shape["core_tokens"], shape["raw_tokens"], shape["group_size"]
    Hc = HQ if core_heads == "query" else H
    core_k, core_v = (randn(B, N, Hc, D, device=bench.device) for _ in range(2))
    raw_k, raw_v = (randn(B, R, H, D, device=bench.device) for _ in range(2))
    with torch.inference_mode():
        ms = bench.time(lambda: bench.cca_decode(
            q, core_k, core_v, raw_k, raw_v, raw_start=N * g, group_size=g,
            window=shape["window"]))
    nbytes = min_bytes(q_elems=B * HQ * D, kv_elems=B * (N * Hc + R * H) * D)
    bench.add(**common, kind=f"cca-{core_heads}",
              impl=f"cca_decode {bench.impl} core={core_heads}", ms=ms, bytes=nbytes,
              flops=attention_flops(N + R, batch=B, q_heads=HQ, head_dim=D),
              note=f"reads {nbytes / 2**20:.4g} MiB, {full_bytes / nbytes:.1f}x less than full")
