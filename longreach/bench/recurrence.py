"""``longreach bench recurrence``: the linear-recurrence kernel against its PyTorch reference.

    longreach bench recurrence --suite op,model --out runs/bench/recurrence.json
    longreach bench recurrence --quick --device cpu        # smoke test: tiny shapes

Suites (both implementations measured in the same run, on the same random inputs):
  op     `linear_recurrence` forward and forward+backward with an initial state and the final
         state (the training API of state passing and TBTT), bf16 q/k/v, float32 decays, at
         two published layer shapes: Mamba-2-130M (scalar decay; 24 heads, state K=128, head
         dim V=64) and GLA-340M (per-key decay; 4 heads, K=128, V=256), batch 8, T in
         --lengths. fla-core's chunked kernels (`impl="fla"`, what CUDA dispatches to when it
         is installed; for the scalar decay also `impl="fla-gla"`, chunk_gla with the decay
         broadcast over the keys) vs the chunked pure-PyTorch reference.
  model  one optimizer step of the mamba2-130m recipe (bf16 autocast, its gradient
         checkpointing) at its training length 2K: the op on the reference
         (LONGREACH_KERNELS=reference) and on the default dispatch, and the same model built
         on flash-linear-attention's own SimpleGatedLinearAttention and GatedLinearAttention
         layers (when `flash-linear-attention` is installed; recurrence_model's docstring).

Times are medians of `triton.testing.do_bench` on CUDA (optimizer steps: median wall time of
3 after 2 warm-ups), taken after the warm-up in which fla-core's kernels autotune: with
`--autotune full` (the default, what users get) that first call times every config and takes
minutes per shape (Triton keeps the result on disk for later runs); `--autotune first` takes
each kernel's first valid config, which starts in seconds and gives upper bounds on the tuned
times. Every op row gets its FLOP count (the chunked algorithm with 64-token
chunks: per token and head 2*64*(K+V) for the intra-chunk products and 4*K*V for the
inter-chunk read and the state update; the backward counted as twice the forward) and its
minimum bytes (each input read and each output written once), and the time these allow on a
chip with --peak-tflops / --peak-tbps. On CPU (or with --quick) the shapes are tiny and only
the reference runs: a smoke test of the code paths whose times mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longreach.bench import RECURRENCE_SUITES, recurrence_model, recurrence_op
from longreach.bench.harness import (
    DTYPE,
    SMOKE_NOTE,
    Recorder,
    Row,
    Timer,
    bench_device,
    check_peaks,
    parse_lengths,
    parse_suites,
    run_meta,
    run_suites,
)
from longreach.ops.backend import autotune_override
from longreach.ops.linear_recurrence import _fla_fits, fla_version
from longreach.runtime import versions as runtime_versions

# which rows each suite's others are compared with (by `Row.kind`)
BASELINES = {"recurrence-op": ("reference", "fla-gla"),
             "recurrence-model": ("reference", "fla-layers", "fla-gla-layers")}
SUITES = {"op": recurrence_op.run, "model": recurrence_model.run}


class RecurrenceBench:
    """What the suites share: the device, the shapes (tiny on CPU or with --quick), whether
    fla-core's kernel runs here, the timer and the recorder."""

    def __init__(self, args, device: torch.device, recorder: Recorder):
        self.args, self.device, self.rec = args, device, recorder
        self.tiny = args.quick or device.type != "cuda"
        self.time = Timer(device)
        probe = torch.empty(1, device=device, dtype=DTYPE)
        self.fla = _fla_fits(probe, probe)

    def add(self, **kw) -> Row:
        return self.rec.add(Row(**kw))


def run(args) -> int:
    """Run the suites named in args (as parsed by `add_recurrence_arguments`); 0 on success."""
    suites = parse_suites(args.suite, RECURRENCE_SUITES)
    check_peaks(args)
    if args.train_batch is not None and args.train_batch < 1:
        raise ValueError(f"--train-batch must be >= 1, got {args.train_batch}")
    parse_lengths(args.lengths)  # fail before any work
    device, device_name = bench_device(args.device)
    smoke = args.quick or device.type != "cuda"
    versions = {**runtime_versions(["triton"]), "fla-core": fla_version() or "not installed"}
    meta = run_meta(args, device, device_name, versions, suites, smoke,
                    cuda_timing="train step: median of 3 after 2 warm-ups")
    meta["autotune"] = args.autotune if device.type == "cuda" else None
    out = Path(args.out) if args.out else None
    recorder = Recorder(out, meta, baselines=BASELINES, peak_flops=args.peak_tflops * 1e12,
                        peak_bw=args.peak_tbps * 1e12, title="bench recurrence")
    bench = RecurrenceBench(args, device, recorder)
    print(f"bench recurrence on {device_name}: suites {','.join(suites)}, fla-core "
          f"{versions['fla-core']}{SMOKE_NOTE if smoke else ''}",
          flush=True)
    title_note = SMOKE_NOTE if smoke else f" on {device_name}"
    with autotune_override(args.autotune if device.type == "cuda" else "full"):
        run_suites({s: lambda s=s: SUITES[s](bench) for s in suites}, recorder, title_note,
                   table_prefix="recurrence-")
    return 0
