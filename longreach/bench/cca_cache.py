"""``longreach bench cca-cache``: KV-cache bytes of a Llama-2-7B-shaped model (full vs CCA) and op time on CPU.

    longreach bench cca-cache [--lengths 4096,...,131072] [--out cca.json]

Cache bytes are measured, not computed: a transformers LlamaForCausalLM with random weights
and one decoder layer is prefilled with the context in segments, once with a DynamicCache
(full attention, SDPA) and once after `enable_cca(group_size=16, window=1024)` with its
CCACache; the bytes of the tensors each cache holds for that layer are summed and multiplied
by the 32 layers of Llama-2-7B. Storage is float32 (bf16 matmuls are slower on this CPU);
bf16 bytes are half of it (the same elements at 2 bytes), which is what the table reports.

Two shapes are measured:
  check  the 7B attention shape (hidden 4096, 32 query heads, head_dim 128, 32 or 8 (GQA)
         key/value heads) at --check-length tokens;
  scan   one query and one key/value head of head_dim 128 (hidden 128) at every length.
Both caches store keys/values per key/value head (CCA pools per key/value head), so the 7B
figures are the scan's bytes times the key/value heads; the check shows that the scaled scan
equals the real shape's bytes exactly. Full prefill is quadratic: above --full-max tokens the
full cache is its measured per-token size times the length (marked "per-token").

Op time: `longreach.ops.cca_attention(impl="reference")` vs torch SDPA (is_causal) on one
layer's attention scaled down (batch 1, --op-heads heads, head_dim 128, float32), forward only,
median of --repeats runs.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from longreach.integrations import hf
from longreach.models.compat import cache_kwargs
from longreach.ops.cca import cca_attention
from longreach.runtime import versions, write_atomic

LAYERS_7B = 32
GIB = 2**30
HEAD_DIM = 128


def build_model(*, hidden: int, heads: int, kv_heads: int, cca: bool, group_size: int, window: int):
    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM, intermediate_size=64, vocab_size=256, num_hidden_layers=1,
        max_position_embeddings=262144,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if cca:
        hf.enable_cca(model, group_size=group_size, window=window)
    else:
        model.set_attn_implementation("sdpa")
    return model


def cache_layer_bytes(cache) -> int:
    """Bytes of the tensors the cache holds for its (single) layer."""
    if isinstance(cache, DynamicCache):
        layer = cache.layers[0]
        tensors = (layer.keys, layer.values)
    else:
        state = cache.state(0)
        tensors = (state.core_k, state.core_v, state.raw_k, state.raw_v)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def prefill(model, length: int, segment: int, *, cca: bool) -> tuple[int, int, float]:
    """Prefill `length` random tokens in segments; returns (layer bytes, tokens held, seconds)."""
    cache = hf.new_cache(model) if cca else DynamicCache()
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, length, segment):
            model.model(input_ids=ids[:, s : s + segment], **cache_kwargs(model.model, cache),
                        use_cache=True)
    seconds = time.perf_counter() - start
    held = cache.num_tokens()[0] if cca else cache.get_seq_length()
    return cache_layer_bytes(cache), held, seconds


def bf16_gib_7b(layer_bytes_fp32: float, kv_heads: int) -> float:
    """A scan (one key/value head, fp32) measurement as GiB for 32 layers, kv_heads, bf16."""
    return layer_bytes_fp32 / 2 * kv_heads * LAYERS_7B / GIB


def cache_benchmark(args) -> dict:
    opts = dict(group_size=args.group_size, window=args.window)
    rows, checks = [], []
    # the real 7B attention shape at one length: the scan scaled by kv heads must equal it
    scan_check = {}
    for cca in () if args.skip_check else (False, True):
        model = build_model(hidden=HEAD_DIM, heads=1, kv_heads=1, cca=cca, **opts)
        scan_check[cca] = prefill(model, args.check_length, args.segment, cca=cca)[0]
    for kv_heads in () if args.skip_check else (32, 8):
        for cca in (False, True):
            model = build_model(hidden=4096, heads=32, kv_heads=kv_heads, cca=cca, **opts)
            measured, held, seconds = prefill(model, args.check_length, args.segment, cca=cca)
            checks.append({
                "kv_heads": kv_heads, "cache": "cca" if cca else "full",
                "length": args.check_length, "layer_bytes_fp32": measured,
                "scan_bytes_times_kv_heads": scan_check[cca] * kv_heads,
                "equal": measured == scan_check[cca] * kv_heads, "seconds": round(seconds, 2),
            })
            print(f"check kv_heads={kv_heads} {'cca' if cca else 'full'} {args.check_length}: "
                  f"{measured} B/layer fp32, scan x kv_heads = {scan_check[cca] * kv_heads} "
                  f"({seconds:.1f} s)", flush=True)
    full_model = build_model(hidden=HEAD_DIM, heads=1, kv_heads=1, cca=False, **opts)
    cca_model = build_model(hidden=HEAD_DIM, heads=1, kv_heads=1, cca=True, **opts)
    per_token = None
    for length in args.lengths:
        if length <= args.full_max:
            full_bytes, full_held, full_s = prefill(full_model, length, args.segment, cca=False)
            per_token = full_bytes / length
            full_how = "measured"
        else:
            if per_token is None:
                raise ValueError("--full-max is below every length: nothing to take a per-token size from")
            full_bytes, full_held, full_s, full_how = per_token * length, length, None, "per-token"
        cca_bytes, cca_held, cca_s = prefill(cca_model, length, args.segment, cca=True)
        row = {
            "length": length, "full_how": full_how,
            "full_layer_bytes_fp32_per_kv_head": full_bytes, "full_tokens_held": full_held,
            "cca_layer_bytes_fp32_per_kv_head": cca_bytes, "cca_tokens_held": cca_held,
            "full_seconds": None if full_s is None else round(full_s, 2),
            "cca_seconds": round(cca_s, 2),
            "reduction_pct": round(100 * (1 - cca_bytes / full_bytes), 2),
        }
        for kv_heads in (32, 8):
            row[f"full_gib_bf16_32layers_kv{kv_heads}"] = round(bf16_gib_7b(full_bytes, kv_heads), 4)
            row[f"cca_gib_bf16_32layers_kv{kv_heads}"] = round(bf16_gib_7b(cca_bytes, kv_heads), 4)
        rows.append(row)
        print(f"{length}: full {full_held} tokens ({full_how}), cca {cca_held} tokens, "
              f"-{row['reduction_pct']}% ({cca_s:.1f} s)", flush=True)
    return {"checks": checks, "rows": rows}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_benchmark(args) -> list[dict]:
    rows = []
    for length in args.op_lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, length, args.op_heads, HEAD_DIM, generator=g) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA wants [B, H, T, D]
        run_cca = functools.partial(
            cca_attention, q, k, v, group_size=args.group_size, window=args.window,
            impl="reference",
        )
        run_sdpa = functools.partial(
            torch.nn.functional.scaled_dot_product_attention, qt, kt, vt, is_causal=True
        )
        with torch.no_grad():
            run_cca(), run_sdpa()  # warm up
            cca_s = median_time(run_cca, args.repeats)
            sdpa_s = median_time(run_sdpa, args.repeats)
        rows.append({"length": length, "cca_reference_s": round(cca_s, 4),
                     "sdpa_s": round(sdpa_s, 4), "cca_over_sdpa": round(cca_s / sdpa_s, 2)})
        print(f"op {length}: cca reference {cca_s:.3f} s, sdpa {sdpa_s:.3f} s, "
              f"ratio {cca_s / sdpa_s:.2f}", flush=True)
    return rows


def print_tables(result: dict) -> None:
    print("\nKV cache, Llama-2-7B shape, 32 layers, bf16 (GiB):")
    print(f"{'tokens':>8} {'full kv32':>10} {'CCA kv32':>9} {'full kv8':>9} {'CCA kv8':>8} "
          f"{'less':>7}  full")
    for r in result["cache"]["rows"]:
        print(f"{r['length']:>8} {r['full_gib_bf16_32layers_kv32']:>10.3f} "
              f"{r['cca_gib_bf16_32layers_kv32']:>9.3f} {r['full_gib_bf16_32layers_kv8']:>9.3f} "
              f"{r['cca_gib_bf16_32layers_kv8']:>8.3f} {r['reduction_pct']:>6.1f}%  {r['full_how']}")
    print("\nOp time (forward, CPU):")
    print(f"{'tokens':>8} {'CCA ref (s)':>12} {'SDPA (s)':>9} {'ratio':>6}")
    for r in result["op"]:
        print(f"{r['length']:>8} {r['cca_reference_s']:>12.3f} {r['sdpa_s']:>9.3f} "
              f"{r['cca_over_sdpa']:>6.2f}")


def run(args) -> int:
    """Measure the caches (and the op unless --skip-op), print the tables, write the JSON."""
    start = time.perf_counter()
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    **versions()},
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("out", "func", "command", "bench_command", "command_line")},
        "cache": cache_benchmark(args),
        "op": [] if args.skip_op else op_benchmark(args),
    }
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print_tables(result)
    print(f"\ntotal {result['total_seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2))
    return 0
