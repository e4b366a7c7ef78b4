"""``longreach bench attention --suite lm-infinite``: LM-Infinite attention (sinks + window,
distance capped at the window) on each of its paths, beside StreamingLLM's mask (the same
keys without the cap) on FlexAttention: batch 2, T=8K, GQA 8/2, d=64, 4 sinks, window 1024
(the fine-tune shape of docs/cca.md's llama-small comparison), forward and forward+backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longreach.bench.floors import min_bytes, window_attention_flops
from longreach.bench.harness import free_memory, leaf, length_label, randn
from longreach.ops.attention import attention
from longreach.ops.lm_infinite import lm_infinite_attention

if TYPE_CHECKING:
    from longreach.bench.attention import AttentionBench


def run(bench: AttentionBench) -> None:
    B, T, HQ, H, D, sinks, window = 2, 8 * 1024, 8, 2, 64, 4, 1024
    if bench.tiny:
        B, T, HQ, H, D, sinks, window = 1, 256, 4, 2, 32, 2, 64
    shape = dict(batch=B, seq_len=T, q_heads=HQ, kv_heads=H, head_dim=D, sinks=sinks,
                 window=window)
    common = dict(suite="lm-infinite",
                  case=f"B={B} T={length_label(T)} GQA {HQ}/{H} d={D} {sinks}+{window}",
                  shape=shape)
    torch.manual_seed(0)
    q = randn(B, T, HQ, D, device=bench.device)
    k, v = (randn(B, T, H, D, device=bench.device) for _ in range(2))
    do = randn(B, T, HQ, D, device=bench.device)
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, device=bench.device, dtype=torch.float32) / D)
    pos = torch.arange(T, device=bench.device)

    def flops(bw):  # each query reads at most window + sinks keys
        return window_attention_flops(B, HQ, T, D, window=window + sinks, backward=bw)

    def nbytes(bw):
        return min_bytes(q_elems=B * T * HQ * D, kv_elems=B * T * H * D, backward=bw)

    def streaming(q, k, v):
        return attention(q, k, v, window=window, sinks=sinks, impl="flex")

    _pair(bench, common, "streaming", "streaming-llm flex (no distance cap)", streaming,
          (q, k, v), do, flops, nbytes, backward=bench.flex_backward,
          note="the same keys at their own positions")
    free_memory(bench.device)

    paths = ["reference", "sdpa", "flex"]
    for path in paths:
        def op(q, k, v, path=path):
            return lm_infinite_attention(q, k, v, pos, sinks=sinks, window=window,
                                         inv_freq=inv_freq, impl=path)
        _pair(bench, common, path, f"lm-infinite {path}", op, (q, k, v), do, flops, nbytes,
              backward=path != "flex" or bench.flex_backward,
              note={"reference": "blocked dense scores (the specification)",
                    "sdpa": "augmented heads, dense mask",
                    "flex": "augmented heads, block-sparse mask"}[path])
        free_memory(bench.device)


def _pair(bench, common, kind, impl, op, qkv, do, flops, nbytes, *, backward, note) -> None:
    leaves = [leaf(t) for t in qkv]
    bench.pair(
        common, kind, impl,
        lambda: op(*qkv),
        (lambda: op(*leaves).backward(do)) if backward else None,
        leaves, flops, nbytes, note=note,
    )
