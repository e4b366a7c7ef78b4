"""Benchmarks run by ``longreach bench <name>``:

  attention         the CCA and GCA kernels against their baselines (`bench.attention`, one
                    module per suite: `attention_cca`, `_decode`, `_gca`, `_model`)
  recurrence        the linear-recurrence kernel against its reference (`bench.recurrence`;
                    suites `recurrence_op`, `recurrence_model`)
  attention-memory  peak CPU memory of sliding-window vs full causal attention
  cca-cache         KV-cache bytes of a Llama-2-7B-shaped model, full vs CCA, and the CCA
                    reference op's time
  plugin-decode     a pretrained Llama folder, full attention vs each plug-in: cache bytes,
                    prefill and decode speed
  gca-memory        GCA inference memory vs context length
  train-throughput  training step time of recipes side by side
  host-syncs        host-device synchronizations of one training step (CUDA)

The suites share `bench.harness` (rows, results file, timer, run metadata) and `bench.floors`
(FLOP and byte floors). This module only declares the command-line options (argparse, no
heavy imports), so the ``longreach`` command can list them without importing torch.
"""

from __future__ import annotations

import argparse
import importlib

ATTENTION_SUITES = ("cca", "decode", "gca", "model", "lm-infinite")
RECURRENCE_SUITES = ("op", "model")
ATTENTION_MEMORY_CASES = ("window-reference", "full-sdpa", "full-reference", "full-naive")
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
    """The options of ``longreach bench attention``."""
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
    """The options of ``longreach bench recurrence``."""
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



def add_attention_memory_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench attention-memory``."""
    parser.add_argument("--lengths", default="16384,65536", help="comma-separated token counts")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cases", default=",".join(ATTENTION_MEMORY_CASES))
    parser.add_argument("--naive-limit-gb", type=float, default=16.0)
    parser.add_argument("--full-reference-max", type=int, default=16384)
    parser.add_argument("--out", help="write the results here as JSON")
    # the case a fresh interpreter measures (the command starts one per case)
    parser.add_argument("--worker", choices=ATTENTION_MEMORY_CASES, help=argparse.SUPPRESS)
    return parser


def _token_counts(text: str) -> list[int]:
    """--lengths of cca-cache: comma-separated positive integers."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return lengths


def add_cca_cache_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench cca-cache``."""
    parser.add_argument("--lengths", type=_token_counts,
                        default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--full-max", type=int, default=16384,
                        help="longest full-cache prefill; longer ones use the per-token size")
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--segment", type=int, default=2048, help="prefill segment length")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--op-lengths", type=_token_counts, default=[4096, 8192, 16384])
    parser.add_argument("--op-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-op", action="store_true")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the 7B-shape check (about half of the run on 2 cores)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def add_gca_memory_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench gca-memory``."""
    parser.add_argument("--config", default="gca-tiny", help="recipe name or path (random weights)")
    parser.add_argument("--model", default=None, help="a saved GCA model folder instead of --config")
    parser.add_argument("--lengths", default="16k,64k,256k,1m,4m")
    parser.add_argument("--segment", type=int, default=4096, help="prefill segment length")
    parser.add_argument("--memory", default="cpu", help="cpu | device | disk:PATH")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    return parser


def add_train_throughput_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench train-throughput``."""
    parser.add_argument("--configs", default="tiny-swa", help="comma-separated recipe names or paths")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value applied to every recipe")
    return parser


def add_host_syncs_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench host-syncs``."""
    parser.add_argument("--recipe", action="append", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def add_plugin_decode_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``longreach bench plugin-decode``."""
    parser.add_argument("--model", required=True, help="a Llama / Qwen2 / Mistral model folder")
    parser.add_argument("--methods", default="full,cca,streaming,lm-infinite")
    parser.add_argument("--lengths", default="8k,64k,128k")
    parser.add_argument("--segment", type=int, default=4096, help="prefill segment length")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per length")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per length; the fastest prefill and decode are reported")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    return parser


# name: (module with run(args) -> exit code, options, help, description)
COMMANDS = {
    "attention": (
        "attention", add_attention_arguments,
        "CCA / GCA kernels vs SDPA, FlexAttention and PyTorch baselines",
        "Time the CCA and GCA kernels side by side with their baselines (medians of "
        "triton's do_bench), with each row's FLOP and byte floors; prints tables and writes JSON. "
        "On CPU (or --quick): tiny shapes, a smoke test whose times mean nothing.",
    ),
    "recurrence": (
        "recurrence", add_recurrence_arguments,
        "the linear-recurrence kernel (fla-core) vs its PyTorch reference",
        "Time linear_recurrence (Mamba-2 and GLA layer shapes, forward and "
        "forward+backward with states) and a mamba2-130m training step, fla-core's kernel vs the "
        "chunked PyTorch reference, with FLOP and byte floors; prints tables and writes JSON. "
        "On CPU (or --quick): tiny shapes and the reference only, a smoke test.",
    ),
    "attention-memory": (
        "attention_memory", add_attention_memory_arguments,
        "peak CPU memory and time of one attention forward: sliding window vs full causal",
        "Peak CPU memory (growth of the resident-set high-water mark) and time of one "
        "attention forward, each case in a fresh interpreter: the sliding-window reference vs "
        "full causal attention (SDPA, the blocked reference, the naive T x T scores).",
    ),
    "cca-cache": (
        "cca_cache", add_cca_cache_arguments,
        "KV-cache bytes of a Llama-2-7B-shaped model (full vs CCA) and CCA op time on CPU",
        "Measure the KV-cache bytes a transformers Llama-2-7B-shaped model holds after a "
        "prefill, with a full DynamicCache and with enable_cca's CCACache, and time the CCA "
        "reference op against torch SDPA on CPU.",
    ),
    "plugin-decode": (
        "plugin_decode", add_plugin_decode_arguments,
        "a pretrained Llama folder: full attention vs each plug-in, cache bytes and decode speed",
        "Prefill random tokens through the generation cache of the model's own attention and of "
        "each plug-in (CCA, StreamingLLM, LM-Infinite), then decode greedily: prefill tokens/s, "
        "the cache's bytes and decode tokens/s per context length, side by side in one run.",
    ),
    "gca-memory": (
        "gca_memory", add_gca_memory_arguments,
        "GCA inference memory vs context length (device memory flat, chunk memory offloaded)",
        "Stream one long random-token context through a GCA model in prefill segments and "
        "record device bytes, offloaded chunk-memory bytes and prefill throughput as each "
        "length is reached.",
    ),
    "train-throughput": (
        "train_throughput", add_train_throughput_arguments,
        "training throughput of longreach recipes, side by side in one run",
        "For each recipe: median optimizer-step time on random tokens (AdamW, bf16 autocast on "
        "CUDA, fp32 on CPU, the recipe's gradient checkpointing), tokens/s and peak memory.",
    ),
    "host-syncs": (
        "host_syncs", add_host_syncs_arguments,
        "host-device synchronizations of one training step of a recipe's model (CUDA)",
        "Count the synchronizing calls of one training step (forward, backward, gradient "
        "clipping, AdamW) after warm-up, under torch.cuda.set_sync_debug_mode('warn'), with the "
        "Python line each comes from.",
    ),
}


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(f"longreach.bench.{module}").run(args)

    return run


def add_bench_parser(sub) -> None:
    """``longreach bench <name>``: one subcommand per entry of `COMMANDS`."""
    p = sub.add_parser("bench", help="benchmarks: kernels against their baselines, memory, "
                       "training throughput")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for name, (module, add_arguments, help_, description) in COMMANDS.items():
        b = bsub.add_parser(name, help=help_, description=description)
        add_arguments(b)
        b.set_defaults(func=_runner(module))
