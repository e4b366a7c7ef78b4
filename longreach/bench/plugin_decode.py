"""``longreach bench plugin-decode``: a pretrained transformers Llama / Qwen2 / Mistral folder
with its own attention and with each plug-in, side by side: prefill time, the generation
cache's bytes, and decoding tokens/s at each context length.

    longreach bench plugin-decode --model runs/llama-small/final --lengths 8k,64k,128k \\
        --out benchmarks/results/plugin_decode.json

The context is random token ids (speed and memory do not depend on the text), prefilled in
--segment-token pieces through the cache the method decodes with: a DynamicCache for full
attention (every key), enable_cca's CCACache, and the SinkWindowCache of StreamingLLM and
LM-Infinite (sinks + window). Then --new-tokens tokens are decoded greedily, one forward per
token; tokens/s is their count over the wall time (CUDA synchronized). Each length runs
--repeats times and reports its fastest prefill and decode (the first run of a length also
meets its shapes for the first time: kernel autotuning, allocator growth). Cache bytes are the
tensors the cache holds after the prefill, summed over layers. Lengths past the model's
max_position_embeddings are extrapolated positions: fine for speed and memory, not quality.

A method may name kernel paths after an ``@`` (what LONGREACH_KERNELS takes, with ``;``
between several op=path), so two paths of one method are timed side by side in one run:
``--methods full,cca,cca@cca=reference``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from longreach.bench.harness import length_label, parse_lengths
from longreach.cache.base import tensor_bytes
from longreach.integrations import hf
from longreach.models.compat import cache_kwargs, output_cache
from longreach.ops.backend import parse_kernels, use_kernels
from longreach.runtime import resolve_device, resolve_dtype, versions, write_atomic

METHODS = ("full", "cca", "streaming", "lm-infinite")


def cache_bytes(cache) -> int:
    """Bytes of the tensors a generation cache holds (all layers): longreach's caches count
    their own; a transformers DynamicCache holds keys and values per layer."""
    if isinstance(cache, DynamicCache):
        return sum(tensor_bytes(layer.keys, layer.values) for layer in cache.layers)
    return int(cache.nbytes())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(model, length: int, device) -> torch.Tensor:
    """[1, length] random token ids (seed 0): the context of the speed and memory runs."""
    return torch.randint(0, model.config.vocab_size, (1, length),
                         generator=torch.Generator().manual_seed(0)).to(device)


def prefill(model, ids: torch.Tensor, segment: int):
    """Feed ``ids`` in pieces of ``segment`` through a new cache of the kind the model's
    attention decodes with; (the greedy next token, the cache). Call under
    ``torch.inference_mode()``."""
    cache = hf.generation_cache(model) or DynamicCache()
    for s in range(0, ids.shape[1], segment):
        out = model(ids[:, s:s + segment], **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=1)
        cache = output_cache(out)
    return out.logits[:, -1:].argmax(-1), cache


def decode_step(model, token: torch.Tensor, cache):
    """One greedy decoding step: (the next token, the cache)."""
    out = model(token, **cache_kwargs(model, cache), use_cache=True)
    return out.logits[:, -1:].argmax(-1), output_cache(out)


def measure(model, length: int, *, segment: int, new_tokens: int, device) -> dict:
    """Prefill ``length`` random tokens through the method's cache, then decode."""
    ids = random_ids(model, length, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        token, cache = prefill(model, ids, segment)
        _sync(device)
        prefill_s = time.perf_counter() - start
        held = cache_bytes(cache)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token, cache = decode_step(model, token, cache)
        _sync(device)
        decode_s = time.perf_counter() - start
    row = {"length": length, "prefill_s": round(prefill_s, 3),
           "prefill_tokens_per_s": round(length / prefill_s), "cache_bytes": held,
           "decode_tokens_per_s": round(new_tokens / decode_s, 1)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row


def best_of(runs: list[dict]) -> dict:
    """One row from repeated measurements of one length: the fastest prefill and decode."""
    row = dict(max(runs, key=lambda r: r["prefill_tokens_per_s"]))
    fastest = max(runs, key=lambda r: r["decode_tokens_per_s"])
    row["decode_tokens_per_s"] = fastest["decode_tokens_per_s"]
    row["prefill_s_runs"] = [r["prefill_s"] for r in runs]
    row["decode_tokens_per_s_runs"] = [r["decode_tokens_per_s"] for r in runs]
    if "peak_gib" in row:
        row["peak_gib"] = max(r["peak_gib"] for r in runs)
    return row


def run(args) -> int:
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # (name, plug-in kind, kernel paths): "cca@cca=reference;attention=sdpa"
    methods = [(m, kind, kernels.replace(";", ","))
               for m in (m.strip() for m in args.methods.split(",")) if m
               for kind, _, kernels in [m.partition("@")]]
    unknown = sorted({kind for _, kind, _ in methods} - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} "
                         "(each optionally @KERNELS, e.g. cca@cca=reference)")
    for method, _, kernels in methods:
        if kernels:
            try:
                parse_kernels(kernels)
            except ValueError as e:
                raise SystemExit(f"method {method!r}: {e}") from None
    lengths = parse_lengths(args.lengths)
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    if model.config.model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"{args.model} holds a {model.config.model_type!r} model; the plug-ins "
                         f"support {', '.join(hf.SUPPORTED_MODEL_TYPES)}")
    rows = []
    for method, kind, kernels in methods:
        if kind == "full":
            if hf.plugin_settings(model):
                hf.restore_attention(model)
        else:
            plugin = hf.get_plugin(kind)
            options = {k: getattr(args, k.replace("-", "_")) for k in plugin.options}
            hf.enable(model, {"kind": kind, **options})
        with use_kernels(kernels) if kernels else contextlib.nullcontext():
            measure(model, min(lengths), segment=args.segment, new_tokens=2, device=device)
            for length in lengths:
                row = {"method": method, **best_of(
                    [measure(model, length, segment=args.segment, new_tokens=args.new_tokens,
                             device=device) for _ in range(args.repeats)])}
                if kernels:
                    row["kernels"] = kernels
                rows.append(row)
                print(f"{method:20s} {length_label(length):>6s}  prefill {row['prefill_tokens_per_s']:>9,} tok/s"
                      f"  cache {row['cache_bytes'] / 2**20:9.2f} MiB"
                      f"  decode {row['decode_tokens_per_s']:8.1f} tok/s", flush=True)
    by = {(r["method"], r["length"]): r for r in rows}
    for r in rows:  # ratios against full attention at the same length, measured in this run
        base = by.get(("full", r["length"]))
        if base is not None and r["method"] != "full":
            r["cache_vs_full"] = round(r["cache_bytes"] / base["cache_bytes"], 4)
            r["decode_vs_full"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
    result = {"model": str(args.model), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."),
              "settings": {k: getattr(args, k) for k in ("segment", "new_tokens", "repeats",
                                                        "group_size", "window", "sinks")},
              "rows": rows, **versions()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2))
    return 0
