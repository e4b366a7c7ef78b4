"""``longreach bench gca-memory``: GCA inference memory vs context length: device memory
stays flat, the chunk memory grows off the device (host RAM or disk).

    longreach bench gca-memory --config gca-tiny --lengths 16k,64k,256k,1m,4m
    longreach bench gca-memory --model runs/gca-tiny/final --memory disk:/tmp/chunks

Streams one long random-token context through a GCA model in prefill segments with its own
cache (the way `longreach eval` runs long prompts) and records, as each length is reached:
device bytes (CUDA: ``torch.cuda.max_memory_allocated`` since the start, weights included;
CPU: the bytes of the tensors the cache keeps on the compute device, i.e. everything but the
offloaded chunk memory), the offloaded chunk-memory bytes, and the prefill throughput. Prints a
table and writes JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from longreach.bench.harness import device_name
from longreach.eval.command import parse_lengths
from longreach.models import GCAForCausalLM, build_model
from longreach.runtime import resolve_device, resolve_dtype, versions, write_atomic
from longreach.train import find_recipe, load_config


def load_gca_model(args, device, dtype):
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = build_model(load_config(find_recipe(args.config)).model).to(dtype)
    if not isinstance(model, GCAForCausalLM):
        raise ValueError("this benchmark needs a GCA model (a config with 'gca' layers)")
    return model.to(device).eval()


def measure(args) -> dict:
    """The rows, one per length, and what they were measured with."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_gca_model(args, device, dtype)
    lengths = sorted(parse_lengths(args.lengths))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = model.model.new_cache(memory=args.memory)
    gen = torch.Generator().manual_seed(0)
    rows, seen, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for target in lengths:
            while seen < target:
                n = min(args.segment, target - seen)
                ids = torch.randint(0, 256, (1, n), generator=gen).to(device)
                logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                seen += n
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            mem = cache.memory.memory
            row = {
                "tokens": seen,
                "chunks": mem.n_chunks,
                "cache_device_bytes": cache.nbytes(),
                "landmark_bytes": mem.device_nbytes(),
                "offloaded_bytes": mem.offloaded_nbytes(),
                "seconds": round(elapsed, 2),
                "tokens_per_s": round(seen / elapsed),
                "finite": bool(torch.isfinite(logits).all()),
            }
            if device.type == "cuda":
                row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            rows.append(row)
            print(_format(row), flush=True)
    return {
        "benchmark": "gca_memory",
        "model": args.model or args.config,
        "memory": args.memory,
        "segment": args.segment,
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "weights_bytes": weights,
        "versions": versions(),
        "rows": rows,
    }


def _format(row: dict) -> str:
    mib = 2.0**20
    cuda = f"  cuda peak {row['cuda_max_allocated_bytes'] / mib:8.1f} MiB" if "cuda_max_allocated_bytes" in row else ""
    return (f"{row['tokens']:>9} tokens  {row['chunks']:>7} chunks  device cache {row['cache_device_bytes'] / mib:7.2f} MiB"
            f" (landmarks {row['landmark_bytes'] / mib:6.2f})  offloaded {row['offloaded_bytes'] / mib:9.1f} MiB{cuda}"
            f"  {row['tokens_per_s']:>7} tok/s")


def run(args) -> int:
    """Measure, then write the JSON (--memory disk: chunk files in a new temporary folder)."""
    if args.memory == "disk":
        args.memory = "disk:" + tempfile.mkdtemp(prefix="longreach-chunks-")
    result = measure(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2))
    return 0
