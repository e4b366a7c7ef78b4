"""Peak CPU memory and time of one attention forward: sliding-window vs full causal attention.

    longreach bench attention-memory [--lengths 16384,65536] [--window 512] [--out FILE.json]

Shape: batch 1, `--heads` query and key/value heads (8), head_dim `--head-dim` (64), float32,
causal, no grad. Cases:
  window-reference  longreach.ops.attention(window=W, impl="reference"): the blocked reference
  full-sdpa         longreach.ops.attention() -> torch SDPA with is_causal (flash-style on CPU)
  full-reference    the blocked reference without a window (quadratic time; long lengths skipped)
  full-naive        softmax(Q K^T + mask) V with the whole [B, H, T, T] score matrix (in-place
                    softmax), skipped where it would need more than --naive-limit-gb
Each case runs in a fresh interpreter. Memory is the growth of the resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs after the inputs are allocated and the code
has been warmed up on a short input); it includes the [B, T, H, D] output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from longreach.bench import add_attention_memory_arguments
from longreach.runtime import versions, write_atomic


def naive_causal_attention(q, k, v):
    """Full attention with the whole score matrix materialized (the textbook way)."""
    import torch

    T = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    scores.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu_(1), float("-inf"))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()  # in place: one T x T buffer
    scores.div_(scores.sum(dim=-1, keepdim=True))
    return torch.matmul(scores, v).transpose(1, 2)


def naive_bytes(length: int, heads: int) -> int:
    return heads * length * length * 4 + length * length  # fp32 scores + bool mask


def _memory_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def run_case(case: str, length: int, window: int, heads: int, head_dim: int) -> dict:
    """Runs in the worker process: one forward pass, measured."""
    import torch

    from longreach.ops import attention

    def forward(q, k, v):
        if case == "window-reference":
            return attention(q, k, v, window=window, impl="reference")
        if case == "full-sdpa":
            return attention(q, k, v, impl="sdpa")
        if case == "full-reference":
            return attention(q, k, v, impl="reference")
        return naive_causal_attention(q, k, v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, heads, head_dim, generator=g) for _ in range(3))
    with torch.no_grad():
        short = min(length, 1024)
        forward(q[:, :short], k[:, :short], v[:, :short])  # load kernels, size thread pools
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _memory_kib()["VmRSS"]
        start = time.perf_counter()
        out = forward(q, k, v)
        seconds = time.perf_counter() - start
        peak = _memory_kib()["VmHWM"]
    assert torch.isfinite(out).all()
    return {"seconds": seconds, "peak_growth_mib": (peak - before) / 1024}


def measure(args, case: str, length: int) -> dict:
    row = {"case": case, "length": length, "seconds": None, "peak_growth_mib": None, "note": ""}
    if case == "full-naive" and naive_bytes(length, args.heads) > args.naive_limit_gb * 2**30:
        gib = naive_bytes(length, args.heads) / 2**30
        row["note"] = f"skipped: needs {gib:.0f} GiB for the score matrix"
        return row
    if case == "full-reference" and length > args.full_reference_max:
        row["note"] = f"skipped: quadratic time (> --full-reference-max {args.full_reference_max})"
        return row
    command = [sys.executable, "-m", "longreach.bench.attention_memory", "--worker", case,
               "--lengths", str(length),
               "--window", str(args.window), "--heads", str(args.heads),
               "--head-dim", str(args.head_dim)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        row["note"] = f"failed: {result.stderr.strip().splitlines()[-1:]}"
        return row
    row.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return row


def run(args) -> int:
    """Measure every case at every length (each in a fresh interpreter), print the table and
    write the JSON; with --worker, measure that one case here and print its row."""
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(run_case(args.worker, lengths[0], args.window, args.heads, args.head_dim)))
        return 0

    import torch

    config = {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
              "causal": True, "window": args.window, **versions(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    print(f"shape: B=1, T=S=length, {args.heads} heads, head_dim {args.head_dim}, float32, causal;"
          f" window {args.window}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'length':>7}  {'case':<17} {'time (s)':>9} {'peak growth (MiB)':>18}  note")
    rows = []
    for length in lengths:
        for case in args.cases.split(","):
            row = measure(args, case, length)
            rows.append(row)
            seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
            mib = "-" if row["peak_growth_mib"] is None else f"{row['peak_growth_mib']:.0f}"
            print(f"{length:>7}  {case:<17} {seconds:>9} {mib:>18}  {row['note']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps({"config": config, "results": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # the worker process of one case (see `measure`)
    sys.exit(run(add_attention_memory_arguments(argparse.ArgumentParser()).parse_args()))
