"""Benchmarks run by ``longreach bench``: attention kernels against their baselines, and the
linear-recurrence kernel against its reference.

This module only declares the command-line options (argparse, no heavy imports), so the
``longreach`` command can list them without importing torch; the measuring code lives in
`longreach.bench.attention`, `longreach.bench.recurrence` (and `longreach.bench.training` for
training step times).
"""

from __future__ import annotations

import argparse

ATTENTION_SUITES = ("cca", "decode", "gca", "model")
RECURRENCE_SUITES = ("op", "model")
# H200-class bf16 dense matmul rate and device-copy bandwidth (measured; see docs/benchmarks.md)
DEFAULT_PEAK_TFLOPS = 790.0
DEFAULT_PEAK_TBPS = 4.3


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--out, --quick, --device and the peaks the floors use, shared by every bench command."""
    parser.add_argument("--out", default=f"runs/bench/{name}.json",
                        help="JSON file for the results (rewritten after every row)")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny shapes: a smoke test of every code path (the times mean nothing)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CPU: tiny shapes)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="the chip's dense bf16 rate for the floors, TFLOP/s")
    parser.add_argument("--peak-tbps", type=float, default=DEFAULT_PEAK_TBPS,
                        help="the chip's memory bandwidth for the floors, TB/s")


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
    add_common_arguments(parser, "attention")
    parser.add_argument(
        "--impl", default="auto", choices=("auto", "triton", "reference"),
        help="the longreach kernels' implementation (auto: triton on CUDA, reference on CPU)",
    )
    parser.add_argument("--train-batch", type=int, default=None,
                        help="model suite: sequences per training step (default: the recipe's)")
    parser.add_argument("--model-layers", type=int, default=None,
                        help="layers of the Llama-shaped prefill model (default 32; 2 when tiny)")
    return parser


def add_recurrence_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench recurrence`` (also ``python benchmarks/recurrence.py``)."""
    parser.add_argument(
        "--suite", default="op,model",
        help=f"comma-separated suites out of {','.join(RECURRENCE_SUITES)} (default: op,model)",
    )
    parser.add_argument("--lengths", default="2k,8k",
                        help="sequence lengths of the op suite (k = 1024), e.g. 2k,8k,32k")
    add_common_arguments(parser, "recurrence")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="model suite: sequences per training step (default 8)")
    parser.add_argument(
        "--autotune", choices=("full", "first"), default="full",
        help="full: fla-core's kernels time every config on their first call (minutes); first: "
        "take each kernel's first valid config (fast to start; the tuned kernel is at least as fast)",
    )
    return parser
