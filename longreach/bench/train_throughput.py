"""``longreach bench train-throughput``: training throughput of longreach recipes, side by
side in one run.

    longreach bench train-throughput --configs swa-128m,full-128m --seq-len 16384 --batch-size 4

For each recipe: builds the model, runs optimizer steps on random tokens (AdamW, bf16
autocast on CUDA, fp32 on CPU, the recipe's gradient checkpointing setting), and reports the
median step time, tokens/s and peak device memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longreach.bench.harness import device_name
from longreach.bench.training import measure_training
from longreach.runtime import resolve_device, versions, write_atomic


def measure(name: str, overrides: list[str], args, device: torch.device) -> dict:
    return measure_training(
        name, overrides, device=device, seq_len=args.seq_len, batch=args.batch_size,
        steps=args.steps, warmup=args.warmup,
    )


def run(args) -> int:
    """Measure every recipe of --configs, print the table, write the JSON."""
    device = resolve_device(args.device)
    rows = [measure(name, args.overrides, args, device) for name in args.configs.split(",")]
    header = list(rows[0])
    info = versions()
    print(f"device: {device_name(device)}; torch {info['torch']}; longreach {info['longreach']}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": str(device), "device_name": device_name(device), **info,
                   "results": rows}
        write_atomic(args.out, json.dumps(payload, indent=2))
    return 0
