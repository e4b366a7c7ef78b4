"""``longreach bench recurrence``: the linear-recurrence kernel against its PyTorch reference.

    longreach bench recurrence --suite op,model --out runs/bench/recurrence.json
    longreach bench recurrence --quick --device cpu        # smoke test: tiny shapes

Suites (both implementations measured in the same run, on the same random inputs):
  op     `linear_recurrence` forward and forward+backward with an initial state and the final
         state (the training API of state passing and TBTT), bf16 q/k/v, float32 decays, at
         two published layer shapes: Mamba-2-130M (scalar decay; 24 heads, state K=128, head
         dim V=64) and GLA-340M (per-key decay; 4 heads, K=128, V=256), batch 8, T in
         --lengths. fla-core's chunked kernel (`impl="fla"`, what CUDA dispatches to when it
         is installed) vs the chunked pure-PyTorch reference.
  model  one optimizer step of the mamba2-130m recipe (bf16 autocast, its gradient
         checkpointing) at its training length 2K: the op on the reference
         (LONGREACH_KERNELS=reference) vs the default dispatch.

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

import contextlib
import os
from pathlib import Path

import torch

from longreach.bench import RECURRENCE_SUITES
from longreach.bench.attention import (
    Recorder,
    Row,
    Timer,
    _free,
    _len_label,
    _versions,
    check_peaks,
    parse_lengths,
    parse_suites,
    resolve_device,
    run_meta,
    run_suites,
    script_main,
)
from longreach.ops.backend import autotune_override
from longreach.ops.linear_recurrence import _fla_fits, fla_version, linear_recurrence

CHUNK = 64  # the chunk length the FLOP count assumes (fla-core's and the reference's default)
DTYPE = torch.bfloat16

# name: (decay per key, heads, K, V) at batch 8; tiny shapes for smoke tests
OP_CASES = {
    "mamba2-130m": (False, 24, 128, 64),
    "gla-340m": (True, 4, 128, 256),
}
TINY_OP_CASES = {
    "mamba2-tiny": (False, 2, 8, 16),
    "gla-tiny": (True, 2, 4, 8),
}
# the smoke test's model: mamba2-tiny with the same (K, V) as the tiny op case
TINY_MODEL_OVERRIDES = ["model.mixers.state_size=8", "model.mixers.head_dim=16",
                        "model.num_hidden_layers=2"]


def recurrence_flops(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, *,
                     backward: bool = False, chunk: int = CHUNK) -> int:
    """Matmul FLOPs of the chunked recurrence: per token and head, the intra-chunk scores and
    values (2*chunk*(K+V)), the read of the carried state and its update (4*K*V); the
    backward counted as twice the forward."""
    fwd = batch * seq_len * heads * (2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim)
    return 3 * fwd if backward else fwd


def recurrence_bytes(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, *,
                     per_key: bool, backward: bool = False, elem: int = 2) -> int:
    """Minimum bytes: q, k, v read and o written once (elem bytes each), the float32 decays
    read, the float32 initial state read and final state written; with the backward also do
    read, dq/dk/dv written, dg and d(initial state) written, and the inputs read again."""
    tokens = batch * seq_len * heads
    inputs = tokens * (2 * key_dim + value_dim) * elem  # q, k, v (and dq, dk, dv)
    outputs = tokens * value_dim * elem  # o (and do)
    decay = tokens * (key_dim if per_key else 1) * 4  # g (and dg), float32
    state = batch * heads * key_dim * value_dim * 4  # one float32 state
    fwd = inputs + outputs + decay + 2 * state  # ... + initial state in, final state out
    if not backward:
        return fwd
    # reads q, k, v, do, g, the initial state and d(final state); writes dq, dk, dv, dg, d(initial)
    bwd = 2 * inputs + outputs + 2 * decay + 3 * state
    return fwd + bwd


@contextlib.contextmanager
def kernels_env(value: str | None):
    """Set (or, for None, unset) LONGREACH_KERNELS for the block."""
    old = os.environ.get("LONGREACH_KERNELS")
    if value is None:
        os.environ.pop("LONGREACH_KERNELS", None)
    else:
        os.environ["LONGREACH_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LONGREACH_KERNELS", None)
        else:
            os.environ["LONGREACH_KERNELS"] = old


class RecurrenceBench:
    def __init__(self, args, device: torch.device, recorder: Recorder):
        self.args, self.device, self.rec = args, device, recorder
        self.tiny = args.quick or device.type != "cuda"
        self.time = Timer(device)
        probe = torch.empty(1, device=device, dtype=DTYPE)
        self.fla = _fla_fits(probe, probe)

    def add(self, **kw) -> Row:
        return self.rec.add(Row(**kw))

    def run_op(self) -> None:
        cases = TINY_OP_CASES if self.tiny else OP_CASES
        lengths = [100] if self.tiny else parse_lengths(self.args.lengths)
        batch = 1 if self.tiny else 8
        impls = ["reference"] + (["fla"] if self.fla else [])
        if not self.fla:
            print("[op] fla-core kernel not available here (needs CUDA and fla-core): reference only",
                  flush=True)
        for name, (per_key, H, K, V) in cases.items():
            for T in lengths:
                self._op_case(name, per_key, batch, T, H, K, V, impls)
                _free(self.device)

    def _op_case(self, name, per_key, B, T, H, K, V, impls) -> None:
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k = (torch.randn(B, T, H, K, device=dev, generator=gen).to(DTYPE) for _ in range(2))
        v = torch.randn(B, T, H, V, device=dev, generator=gen).to(DTYPE)
        g_shape = (B, T, H, K) if per_key else (B, T, H)
        # decays of a trained model: exp(g) mostly in 0.9 .. 1
        g = torch.nn.functional.logsigmoid(torch.randn(g_shape, device=dev, generator=gen) + 4.0)
        h0 = torch.randn(B, H, K, V, device=dev, generator=gen) * 0.1
        do = torch.randn(B, T, H, V, device=dev, generator=gen).to(DTYPE)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, h0)]
        case = f"{name} T={_len_label(T)} B={B}"
        shape = {"batch": B, "seq_len": T, "heads": H, "key_dim": K, "value_dim": V,
                 "decay": "per key" if per_key else "scalar"}
        for impl in impls:
            def fwd(impl=impl):
                return linear_recurrence(q, k, v, g, initial_state=h0, output_final_state=True,
                                         impl=impl)

            def fwdbwd(impl=impl):
                o, final = linear_recurrence(*leaves[:4], initial_state=leaves[4],
                                             output_final_state=True, impl=impl)
                torch.autograd.backward([o, final], [do, torch.ones_like(final)])

            for pass_, fn, grads, backward in (("fwd", fwd, (), False),
                                               ("fwd+bwd", fwdbwd, leaves, True)):
                with torch.no_grad() if not backward else contextlib.nullcontext():
                    ms = self.time(fn, grads)
                self.add(
                    suite="recurrence-op", case=case, pass_=pass_, kind=impl,
                    impl="fla-core chunk_gla" if impl == "fla" else "PyTorch reference (chunked)",
                    ms=ms, shape=shape,
                    flops=recurrence_flops(B, T, H, K, V, backward=backward),
                    bytes=recurrence_bytes(B, T, H, K, V, per_key=per_key, backward=backward),
                )

    def run_model(self) -> None:
        from longreach.bench.training import measure_training

        recipe, overrides, seq_len, steps, warmup = "mamba2-130m", [], None, 3, 2
        if self.tiny:
            recipe, overrides, seq_len, steps, warmup = "mamba2-tiny", TINY_MODEL_OVERRIDES, 64, 1, 1
        batch = self.args.train_batch or (1 if self.tiny else 8)
        runs = [("reference", "reference")] + ([("fla", None)] if self.fla else [])
        for kind, env in runs:
            with kernels_env(env):
                r = measure_training(recipe, overrides, device=self.device, seq_len=seq_len, batch=batch,
                                     steps=steps, warmup=warmup)
            note = f"{r['tokens_per_s']:,} tok/s, {r['params_M']}M params, loss {r['loss']}"
            if "peak_mem_GiB" in r:
                note += f", peak {r['peak_mem_GiB']} GiB"
            self.add(suite="recurrence-model", case=f"{recipe} T={_len_label(r['seq_len'])} B={batch}",
                     pass_="train step", kind=kind,
                     impl=f"{recipe}, op on " + ("fla-core" if kind == "fla" else "the reference"),
                     ms=1e3 * r["step_s"], shape=r, note=note)
            _free(self.device)


def run(args) -> int:
    """Run the suites named in args (as parsed by `add_recurrence_arguments`); 0 on success."""
    suites = parse_suites(args.suite, RECURRENCE_SUITES)
    check_peaks(args)
    if args.train_batch is not None and args.train_batch < 1:
        raise ValueError(f"--train-batch must be >= 1, got {args.train_batch}")
    parse_lengths(args.lengths)  # fail before any work
    device, device_name = resolve_device(args.device)
    smoke = args.quick or device.type != "cuda"
    versions = {**_versions(), "fla-core": fla_version() or "not installed"}
    meta = run_meta(args, device, device_name, versions, suites, smoke,
                    cuda_timing="train step: median of 3 after 2 warm-ups")
    meta["autotune"] = args.autotune if device.type == "cuda" else None
    out = Path(args.out) if args.out else None
    recorder = Recorder(out, meta, peak_flops=args.peak_tflops * 1e12,
                        peak_bw=args.peak_tbps * 1e12, title="bench recurrence")
    bench = RecurrenceBench(args, device, recorder)
    print(f"bench recurrence on {device_name}: suites {','.join(suites)}, fla-core "
          f"{versions['fla-core']}{' (SMOKE TEST: tiny shapes, times mean nothing)' if smoke else ''}",
          flush=True)
    title_note = " (SMOKE TEST: tiny shapes, times mean nothing)" if smoke else f" on {device_name}"
    with autotune_override(args.autotune if device.type == "cuda" else "full"):
        run_suites(bench, recorder, suites, title_note, table_prefix="recurrence-")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/recurrence.py ...`: the same options as `longreach bench recurrence`."""
    from longreach.bench import add_recurrence_arguments

    return script_main(argv, add_recurrence_arguments, run, script="benchmarks/recurrence.py", doc=__doc__)
