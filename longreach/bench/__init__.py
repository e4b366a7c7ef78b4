"""Benchmarks run by ``longreach bench``: attention kernels against their baselines.

This module only declares the command-line options (argparse, no heavy imports), so the
``longreach`` command can list them without importing torch; the measuring code lives in
`longreach.bench.attention` (and `longreach.bench.training` for training step times).
"""

from __future__ import annotations

import argparse

ATTENTION_SUITES = ("cca", "decode", "gca", "model")
# H200-class bf16 dense matmul rate and device-copy bandwidth (measured; see docs/benchmarks.md)
DEFAULT_PEAK_TFLOPS = 790.0
DEFAULT_PEAK_TBPS = 4.3


def add_attention_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench attention`` (also ``python benchmarks/attention.py``)."""
    parser.add_argument(
        "--suite", default="cca,decode,gca",
        help=f"comma-separated suites out of {','.join(ATTENTION_SUITES)} "
        "(default: cca,decode,gca)",
    )
    parser.add_argument(
        "--lengths", default="8k,32k,128k",
        help="sequence lengths of the cca suite (k = 1024), e.g. 8k,32k,128k",
    )
    parser.add_argument(
        "--prefill-lengths", default="32k,128k",
        help="prompt lengths of the model suite's Llama-shaped prefill (none: skip it)",
    )
    parser.add_argument("--out", default="runs/bench/attention.json",
                        help="JSON file for the results (rewritten after every row)")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny shapes: a smoke test of every code path (the times mean nothing)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CPU: tiny shapes)")
    parser.add_argument(
        "--impl", default="auto", choices=("auto", "triton", "reference"),
        help="the longreach kernels' implementation (auto: triton on CUDA, reference on CPU)",
    )
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="the chip's dense bf16 rate for the floors, TFLOP/s")
    parser.add_argument("--peak-tbps", type=float, default=DEFAULT_PEAK_TBPS,
                        help="the chip's memory bandwidth for the floors, TB/s")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="model suite: sequences per training step (default: the recipe's)")
    parser.add_argument("--model-layers", type=int, default=None,
                        help="layers of the Llama-shaped prefill model (default 32; 2 when tiny)")
    return parser
