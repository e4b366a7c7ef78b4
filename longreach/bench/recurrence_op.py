"""``longreach bench recurrence --suite op``: `linear_recurrence` forward and forward+backward
with an initial state and the final state, bf16 q/k/v, float32 decays, at the Mamba-2-130M
(scalar decay; 24 heads, K=128, V=64) and GLA-340M (per-key decay; 4 heads, K=128, V=256) layer
shapes, batch 8, T in --lengths: fla-core's chunked kernels (for the scalar decay both
chunk_simple_gla and chunk_gla with the decay broadcast) vs the chunked PyTorch reference.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from longreach.bench.floors import recurrence_bytes, recurrence_flops
from longreach.bench.harness import DTYPE, free_memory, length_label, parse_lengths
from longreach.ops.linear_recurrence import linear_recurrence

if TYPE_CHECKING:
    from longreach.bench.recurrence import RecurrenceBench

# name: (decay per key, heads, K, V) at batch 8; tiny shapes for smoke tests
OP_CASES = {
    "mamba2-130m": (False, 24, 128, 64),
    "gla-340m": (True, 4, 128, 256),
}
TINY_OP_CASES = {
    "mamba2-tiny": (False, 2, 8, 16),
    "gla-tiny": (True, 2, 4, 8),
}


OP_IMPLS = {"reference": "PyTorch reference (chunked)", "fla": "fla-core chunk_simple_gla",
            "fla-gla": "fla-core chunk_gla (decay broadcast over keys)"}


def run(bench: RecurrenceBench) -> None:
    cases = TINY_OP_CASES if bench.tiny else OP_CASES
    lengths = [100] if bench.tiny else parse_lengths(bench.args.lengths)
    batch = 1 if bench.tiny else 8
    impls = ["reference"] + (["fla-gla", "fla"] if bench.fla else [])
    if not bench.fla:
        print("[op] fla-core kernel not available here (needs CUDA and fla-core): reference only",
              flush=True)
    for name, (per_key, H, K, V) in cases.items():
        for T in lengths:
            _case(bench, name, per_key, batch, T, H, K, V, impls)
            free_memory(bench.device)


def _case(bench: RecurrenceBench, name, per_key, B, T, H, K, V, impls) -> None:
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k = (torch.randn(B, T, H, K, device=dev, generator=gen).to(DTYPE) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, generator=gen).to(DTYPE)
    g_shape = (B, T, H, K) if per_key else (B, T, H)
    # decays of a trained model: exp(g) mostly in 0.9 .. 1
    g = torch.nn.functional.logsigmoid(torch.randn(g_shape, device=dev, generator=gen) + 4.0)
    h0 = torch.randn(B, H, K, V, device=dev, generator=gen) * 0.1
    do = torch.randn(B, T, H, V, device=dev, generator=gen).to(DTYPE)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, h0)]
    case = f"{name} T={length_label(T)} B={B}"
    shape = {"batch": B, "seq_len": T, "heads": H, "key_dim": K, "value_dim": V,
             "decay": "per key" if per_key else "scalar"}
    for impl in impls:
        if impl == "fla-gla" and per_key:  # the same kernel as "fla" for per-key decays
            continue
        # with gradients a scalar decay runs chunk_gla under "fla" too: timed once, as fla-gla
        passes = (("fwd", False),) if impl == "fla" and not per_key else (("fwd", False),
                                                                         ("fwd+bwd", True))

        def fwd(impl=impl):
            return linear_recurrence(q, k, v, g, initial_state=h0, output_final_state=True,
                                     impl=impl)

        def fwdbwd(impl=impl):
            o, final = linear_recurrence(*leaves[:4], initial_state=leaves[4],
                                         output_final_state=True, impl=impl)
            torch.autograd.backward([o, final], [do, torch.ones_like(final)])

        for pass_, backward in passes:
            fn, grads = (fwdbwd, leaves) if backward else (fwd, ())
            with torch.no_grad() if not backward else contextlib.nullcontext():
                ms = bench.time(fn, grads)
            bench.add(
                suite="recurrence-op", case=case, pass_=pass_, kind=impl,
                impl=OP_IMPLS[impl] if impl != "fla" or not per_key else "fla-core chunk_gla",
                ms=ms, shape=shape,
                flops=recurrence_flops(B, T, H, K, V, backward=backward),
                bytes=recurrence_bytes(B, T, H, K, V, per_key=per_key, backward=backward),
            )
