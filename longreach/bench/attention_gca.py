"""``longreach bench attention --suite gca``: GCA vs gather-then-SDPA in PyTorch vs
FlexAttention sliding-window-512, batch 4, T=16K, 12 heads, d=64, top-8 of 64-token chunks,
forward and forward+backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from longreach.bench.baselines import gca_gather_sdpa, random_gca_indices, window_mask_mod
from longreach.bench.floors import gca_attention_flops, min_bytes, window_attention_flops
from longreach.bench.harness import free_memory, leaf, length_label, randn

if TYPE_CHECKING:
    from longreach.bench.attention import AttentionBench


def run(bench: AttentionBench) -> None:
    B, T, H, D, cs, K = 4, 16 * 1024, 12, 64, 64, 8
    if bench.tiny:
        B, T, H, D, cs, K = 2, 256, 2, 64, 32, 4
    NQ = T // cs
    shape = dict(batch=B, seq_len=T, heads=H, head_dim=D, chunk_size=cs, top_k=K,
                 memory_chunks=NQ, window=K * cs)
    common = dict(suite="gca", case=f"B={B} T={length_label(T)} {H} heads d={D} top-{K}x{cs}",
                  shape=shape)
    torch.manual_seed(0)
    qkv = tuple(randn(B, T, H, D, device=bench.device) for _ in range(3))
    do = randn(B, T, H, D, device=bench.device)
    indices = random_gca_indices(B, NQ, K, device=bench.device,
                                 generator=torch.Generator().manual_seed(0))
    # fusion weights as the model makes them: a float32 softmax over the filled slots
    valid = indices >= 0
    weights = torch.softmax(
        torch.randn(B, NQ, 1, K, device=bench.device).masked_fill(~valid, float("-inf")), -1)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    extra = indices.numel() * (indices.element_size() + weights.element_size())
    el = B * T * H * D

    def flops(bw):
        return gca_attention_flops(indices, q_heads=H, kv_heads=H, seq_len=T, chunk_size=cs,
                                   head_dim=D, backward=bw)

    def nbytes(bw):
        return min_bytes(q_elems=el, kv_elems=el, extra=extra, backward=bw)

    _op(bench, common, "gather", "gather + sdpa (PyTorch)", gca_gather_sdpa, qkv, do, indices,
        weights, flops, nbytes, note="K-times copy of the chunks")
    free_memory(bench.device)
    _flex(bench, common, qkv, do)
    free_memory(bench.device)
    _op(bench, common, "gca", f"gca {bench.impl}", bench.gca, qkv, do, indices, weights, flops,
        nbytes)
    free_memory(bench.device)


def _op(bench: AttentionBench, common, kind, impl, op, qkv, do, indices, weights, flops, nbytes,
        note="") -> None:
    cs = common["shape"]["chunk_size"]
    leaves = [leaf(t) for t in (*qkv, weights)]
    bench.pair(
        common, kind, impl,
        lambda: op(*qkv, indices, weights, chunk_size=cs),
        lambda: op(*leaves[:3], indices, leaves[3], chunk_size=cs).backward(do),
        leaves, flops, nbytes, note=note,
    )


def _flex(bench: AttentionBench, common: dict, qkv, do) -> None:
    """FlexAttention causal sliding window of top_k * chunk_size keys at the same shape."""
    shape = common["shape"]
    B, T, H, D, window = (shape[k] for k in ("batch", "seq_len", "heads", "head_dim",
                                             "window"))
    flex, make_mask = bench.flex()
    inputs = [t.transpose(1, 2).contiguous() for t in qkv]
    do_flex = do.transpose(1, 2).contiguous()
    mask = make_mask(window_mask_mod(window), None, None, T, T, device=bench.device)
    leaves = [leaf(t) for t in inputs]
    el = B * T * H * D
    bench.pair(
        common, "flex", f"flex sliding-window-{window}",
        lambda: flex(*inputs, block_mask=mask),
        (lambda: flex(*leaves, block_mask=mask).backward(do_flex))
        if bench.flex_backward else None,
        leaves,
        lambda bw: window_attention_flops(B, H, T, D, window=window, backward=bw),
        lambda bw: min_bytes(q_elems=el, kv_elems=el, backward=bw),
        note=f"causal, window {window} = top-{shape['top_k']} x {shape['chunk_size']}",
    )
