"""``longreach bench attention``: the CCA and GCA kernels against their baselines, side by side.

    longreach bench attention --suite cca,decode,gca --out runs/bench/attention.json
    longreach bench attention --suite model
    longreach bench attention --quick --device cpu        # smoke test: tiny shapes

Suites (every comparison is measured in the same run, on the same random bf16 inputs):
  cca     CCA (pooling included) vs SDPA causal (flash) vs FlexAttention with the exact CCA
          mask over [core tokens ; raw tokens] (its core tokens pooled beforehand, not timed),
          forward and forward+backward, batch 1, 32 query heads, d=128, 32 (MHA) or 8 (GQA)
          key/value heads, g=16, window=1024, T in --lengths.
  decode  one decode step at 128K context, GQA 32/8, batch 1 and 8: SDPA over the full cache
          vs `cca_decode` over a CCA cache of the same context (core per query or kv head).
  gca     GCA vs gather-then-SDPA in PyTorch vs FlexAttention sliding-window-512, batch 4,
          T=16K, 12 heads, d=64, top-8 of 64-token chunks, forward and forward+backward.
  model   training tokens/s of the GCA-128M recipe vs a sliding-window model of equal depth
          (its layers + the chunk encoder's) at 16K; Llama-2-7B-shaped prefill (random
          weights) time to first token, SDPA vs `enable_cca`, at --prefill-lengths.

Times are medians of `triton.testing.do_bench` (warm-up 25 ms, rep 100 ms) on CUDA; the
prefill uses CUDA events. Every row also gets its two floors, the FLOP count and the minimum
bytes moved, and the time they allow on a chip with --peak-tflops / --peak-tbps: the row's
"x floor" is measured / that time. On CPU (or with --quick) the shapes are tiny and the
longreach ops run their reference implementations: a smoke test of the code paths whose
times mean nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from longreach.bench import (
    ATTENTION_SUITES,
    attention_cca,
    attention_decode,
    attention_gca,
    attention_lminf,
    attention_model,
)
from longreach.bench.baselines import fused_sdpa
from longreach.bench.harness import (
    SMOKE_NOTE,
    Recorder,
    Row,
    Timer,
    bench_device,
    check_peaks,
    free_memory,
    parse_lengths,
    parse_suites,
    run_meta,
    run_suites,
)
from longreach.ops.cca import cca_attention
from longreach.ops.cca import reference as cca_reference
from longreach.ops.gca import gca_attention, gca_attention_reference
from longreach.runtime import versions

# which rows each suite's others are compared with (by `Row.kind`), first = "the" baseline
BASELINES = {
    "cca": ("sdpa", "flex"),
    "decode": ("sdpa",),
    "gca": ("gather", "flex"),
    "model": ("swa", "sdpa"),
    "lm-infinite": ("reference", "streaming"),
}
SUITES = {"cca": attention_cca.run, "decode": attention_decode.run, "gca": attention_gca.run,
          "model": attention_model.run, "lm-infinite": attention_lminf.run}


class AttentionBench:
    """What the suites share: the device, the shapes (tiny on CPU or with --quick), the
    longreach ops forced to one implementation, FlexAttention, the timer and the recorder."""

    def __init__(self, args, device: torch.device, recorder: Recorder):
        self.args, self.device, self.rec = args, device, recorder
        self.tiny = args.quick or device.type != "cuda"
        self.impl = args.impl if args.impl != "auto" else (
            "triton" if device.type == "cuda" else "reference")
        self.time = Timer(device)
        # FlexAttention has no backward on CPU (torch 2.11 - 2.13)
        self.flex_backward = device.type == "cuda"

    # the longreach ops, forced to one implementation; "reference" calls the pure-PyTorch
    # specification (what every kernel matches) directly
    def cca(self, *a, **kw):
        if self.impl == "reference":
            return cca_reference.cca_attention_reference(*a, **kw)
        return cca_attention(*a, impl=self.impl, **kw)

    def cca_decode(self, *a, **kw):
        if self.impl == "reference":
            return cca_reference.cca_decode(*a, **kw)
        from longreach.ops.cca import cca_decode

        return cca_decode(*a, impl=self.impl, **kw)

    def gca(self, *a, **kw):
        if self.impl == "reference":
            return gca_attention_reference(*a, **kw)
        return gca_attention(*a, impl=self.impl, **kw)

    def flex(self):
        """(flex_attention, create_block_mask): compiled afresh on CUDA (call once per shape, so
        recompiles never hit the compile cache's limit), eager (unfused) elsewhere."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.device.type == "cuda":
            torch.compiler.reset()
            return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)
        return flex_attention, create_block_mask

    def add(self, **kw) -> Row:
        return self.rec.add(Row(**kw))

    def pair(self, common: dict, kind: str, impl: str, fwd, fwdbwd, grads, flops, nbytes,
             note: str = "") -> None:
        """A forward row (no grad) and a forward+backward row (grads reset between calls);
        fwdbwd None: forward only."""
        for backward, fn in ((False, fwd), (True, fwdbwd)):
            if fn is None:
                print(f"[{common['suite']}] {common['case']} fwd+bwd {impl}: skipped (no "
                      f"backward on {self.device.type})", flush=True)
                continue
            try:
                with contextlib.nullcontext() if backward else torch.no_grad(), fused_sdpa(
                    self.device
                ):
                    ms = self.time(fn, grads if backward else ())
            except torch.OutOfMemoryError:
                # one baseline out of memory must not cost the rest of the run
                print(f"[{common['suite']}] {common['case']} {'fwd+bwd' if backward else 'fwd'} "
                      f"{impl}: out of memory", flush=True)
                free_memory(self.device)
                continue
            self.add(**common, pass_="fwd+bwd" if backward else "fwd", kind=kind, impl=impl,
                     ms=ms, flops=flops(backward), bytes=nbytes(backward), note=note)
            free_memory(self.device)


def run(args) -> int:
    """Run the suites named in args (as parsed by `add_attention_arguments`); 0 on success."""
    suites = parse_suites(args.suite, ATTENTION_SUITES)
    check_peaks(args)
    if args.model_layers is not None and args.model_layers < 1:
        raise ValueError(f"--model-layers must be >= 1, got {args.model_layers}")
    parse_lengths(args.lengths)  # fail before any work
    if args.prefill_lengths.strip().lower() not in ("", "none"):
        parse_lengths(args.prefill_lengths)
    device, device_name = bench_device(args.device)
    smoke = args.quick or device.type != "cuda"
    meta = run_meta(args, device, device_name, versions(["triton"]), suites, smoke,
                    cuda_timing="prefill: CUDA events, median of 2 after 1 warm-up")
    out = Path(args.out) if args.out else None
    recorder = Recorder(out, meta, baselines=BASELINES, peak_flops=args.peak_tflops * 1e12,
                        peak_bw=args.peak_tbps * 1e12, title="bench attention")
    bench = AttentionBench(args, device, recorder)
    print(f"bench attention on {device_name}: suites {','.join(suites)}, impl {bench.impl}"
          f"{SMOKE_NOTE if smoke else ''}", flush=True)
    title_note = SMOKE_NOTE if smoke else f" on {device_name}"
    with warnings.catch_warnings():
        # eager FlexAttention on CPU warns that it is unfused: expected for a smoke test
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        run_suites({s: lambda s=s: SUITES[s](bench) for s in suites}, recorder, title_note)
    return 0
