"""Training throughput of longreach recipes, side by side in one run.

    python benchmarks/train_throughput.py --configs swa-128m,full-128m --seq-len 16384 --batch-size 4

For each recipe: builds the model, runs optimizer steps on random tokens (AdamW, bf16
autocast on CUDA, fp32 on CPU, the recipe's gradient checkpointing setting), and reports the
median step time, tokens/s and peak device memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import longreach
from longreach.bench.training import measure_training


def measure(name: str, overrides: list[str], args, device: torch.device) -> dict:
    return measure_training(
        name, overrides, device=device, seq_len=args.seq_len, batch=args.batch_size,
        steps=args.steps, warmup=args.warmup,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny-swa", help="comma-separated recipe names or paths")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value applied to every recipe")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rows = [measure(name, args.overrides, args, device) for name in args.configs.split(",")]
    header = list(rows[0])
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}; longreach {longreach.__version__}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": rows}, f, indent=2)
        os.replace(f.name, out)


if __name__ == "__main__":
    main()
