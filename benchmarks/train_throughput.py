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
import statistics
import tempfile
import time
from pathlib import Path

import torch

import longreach
from longreach import LongReachConfig, LongReachForCausalLM
from longreach.train import find_recipe, load_config


def measure(name: str, overrides: list[str], args, device: torch.device) -> dict:
    cfg = load_config(find_recipe(name), overrides)
    seq_len = args.seq_len or cfg.data.seq_len
    batch = args.batch_size or cfg.train.batch_size
    model = LongReachForCausalLM(LongReachConfig(**cfg.model)).to(device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    bf16 = device.type == "cuda"
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "recipe": name, "params_M": round(params / 1e6, 1), "mixers": str(cfg.model.get("mixers")),
        "seq_len": seq_len, "batch": batch, "step_s": round(step, 4),
        "tokens_per_s": round(batch * seq_len / step), "loss": round(loss.item(), 3),
    }
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, opt
    return result


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
