"""``longreach bench attention --suite cca``: CCA (pooling included) vs SDPA causal (flash) vs
FlexAttention with the exact CCA mask over [core tokens ; raw tokens] (its core tokens pooled
beforehand, not timed), forward and forward+backward, batch 1, 32 query heads, d=128, 32 (MHA)
or 8 (GQA) key/value heads, g=16, window=1024, T in --lengths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longreach.bench.baselines import cca_mask_mod
from longreach.bench.floors import causal_attention_flops, cca_attention_flops, min_bytes
from longreach.bench.harness import free_memory, leaf, length_label, parse_lengths, randn
from longreach.ops.cca import cca_pool, core_count

if TYPE_CHECKING:
    from longreach.bench.attention import AttentionBench


def run(bench: AttentionBench) -> None:
    B, HQ, D, g, s = 1, 32, 128, 16, 1024
    lengths = parse_lengths(bench.args.lengths)
    if bench.tiny:
        HQ, D, g, s, lengths = 4, 64, 8, 32, [160]
    dev = bench.device
    for T in lengths:
        for label, H in (("MHA", HQ), ("GQA", HQ // 4)):
            case = f"T={length_label(T)} {label} {HQ}/{H}"
            shape = dict(batch=B, seq_len=T, q_heads=HQ, kv_heads=H, head_dim=D,
                         group_size=g, window=s)
            _case(bench, case, shape)
            free_memory(dev)


def _case(bench: AttentionBench, case: str, shape: dict) -> None:
    B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
    torch.manual_seed(0)
    qkv = tuple(randn(B, T, h, D, device=bench.device) for h in (HQ, H, H))
    do = randn(B, T, HQ, D, device=bench.device)
    common = dict(suite="cca", case=case, shape=shape)
    # one function per row pair: its tensors die when it returns, then memory is released
    _sdpa(bench, common, qkv, do)
    free_memory(bench.device)
    _flex(bench, common, qkv, do)
    free_memory(bench.device)
    for core_heads in ("query", "kv") if HQ != H else ("query",):
        _op(bench, common, qkv, do, core_heads)
        free_memory(bench.device)


def _bytes(shape: dict, keys: int | None = None):
    B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
    return lambda bw: min_bytes(q_elems=B * T * HQ * D, kv_elems=B * (keys or T) * H * D,
                                backward=bw)


def _sdpa(bench: AttentionBench, common: dict, qkv, do) -> None:
    """SDPA causal (flash) on [B, H, T, D] views of the [B, T, H, D] tensors."""
    shape = common["shape"]
    B, T, HQ, D, gqa = shape["batch"], shape["seq_len"], shape["q_heads"], shape["head_dim"], (
        shape["q_heads"] != shape["kv_heads"])
    views = [t.transpose(1, 2) for t in qkv]
    leaves = [leaf(t) for t in qkv]
    do_view = do.transpose(1, 2)
    bench.pair(
        common, "sdpa", "sdpa causal",
        lambda: F.scaled_dot_product_attention(*views, is_causal=True, enable_gqa=gqa),
        lambda: F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in leaves), is_causal=True, enable_gqa=gqa,
        ).backward(do_view),
        leaves,
        lambda bw: causal_attention_flops(B, HQ, T, D, backward=bw),
        _bytes(shape),
    )


def _flex(bench: AttentionBench, common: dict, qkv, do) -> None:
    """FlexAttention over [core ; raw] keys with the exact CCA mask; its core tokens (one per
    kv head, so it can use GQA) are pooled beforehand and are leaf inputs."""
    shape = common["shape"]
    B, T, HQ, D = shape["batch"], shape["seq_len"], shape["q_heads"], shape["head_dim"]
    g, s, gqa = shape["group_size"], shape["window"], HQ != shape["kv_heads"]
    q, k, v = qkv
    n_core = core_count(T - 1, group_size=g, window=s)
    flex, make_mask = bench.flex()
    with torch.no_grad():
        core_k, core_v = cca_pool(q[:, : n_core * g], k[:, : n_core * g],
                                  v[:, : n_core * g], group_size=g, core_heads="kv")
        inputs = [q.transpose(1, 2).contiguous(),
                  torch.cat([core_k, k], dim=1).transpose(1, 2).contiguous(),
                  torch.cat([core_v, v], dim=1).transpose(1, 2).contiguous()]
        do_flex = do.transpose(1, 2).contiguous()
    mask = make_mask(cca_mask_mod(n_core, group_size=g, window=s), None, None, T,
                     n_core + T, device=bench.device)
    leaves = [leaf(t) for t in inputs]
    bench.pair(
        common, "flex", "flex cca-mask",
        lambda: flex(*inputs, block_mask=mask, enable_gqa=gqa),
        (lambda: flex(*leaves, block_mask=mask, enable_gqa=gqa).backward(do_flex))
        if bench.flex_backward else None,
        leaves,
        lambda bw: cca_attention_flops(B, HQ, T, D, group_size=g, window=s, backward=bw),
        _bytes(shape, keys=n_core + T),
        note="core tokens (per kv head) given: pooling not timed",
    )


def _op(bench: AttentionBench, common: dict, qkv, do, core_heads: str) -> None:
    """The CCA op, pooling included."""
    shape = common["shape"]
    B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
    opts = dict(group_size=shape["group_size"], window=shape["window"], core_heads=core_heads)
    leaves = [leaf(t) for t in qkv]
    bench.pair(
        common, f"cca-{core_heads}", f"cca {bench.impl} core={core_heads}",
        lambda: bench.cca(*qkv, **opts),
        lambda: bench.cca(*leaves, **opts).backward(do),
        leaves,
        lambda bw: cca_attention_flops(
            B, HQ, T, D, group_size=opts["group_size"], window=opts["window"],
            pool_heads=HQ if core_heads == "query" else H, backward=bw),
        _bytes(shape),
        note="pooling included",
    )
