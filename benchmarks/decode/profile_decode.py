"""Where one decoded token's time goes: a transformers Llama / Qwen2 / Mistral folder, full
attention or a plug-in, after a prefill of LENGTH random tokens.

    python benchmarks/decode/profile_decode.py --model MODEL --method cca --length 8192 \\
        --out profile.txt

Prints (and writes to --out) the wall time per token without and with the profiler, the
number of host-device synchronisations and copies per token, and the top operators by
self CPU time and by device time. On CPU the device columns are absent.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from longreach.bench.plugin_decode import METHODS, decode_step, prefill, random_ids
from longreach.integrations import hf
from longreach.runtime import resolve_device, resolve_dtype, write_atomic

# runtime calls that make the host wait for the device (or copy to it)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
               "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens timed and profiled")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=resolve_dtype(args.dtype, device)).to(device).eval()
    if args.method != "full":
        hf.enable(model, {"kind": args.method})
    ids = random_ids(model, args.length, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    with torch.inference_mode():
        token, cache = prefill(model, ids, args.segment)
        for _ in range(4):  # warm-up: the single-token shapes' first calls
            token, cache = decode_step(model, token, cache)
        sync()
        start = time.perf_counter()
        for _ in range(args.tokens):
            token, cache = decode_step(model, token, cache)
        sync()
        plain = (time.perf_counter() - start) / args.tokens
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.tokens):
                token, cache = decode_step(model, token, cache)
            sync()
    events = prof.key_averages()
    say(f"{args.model} {args.method} at {args.length:,} tokens on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
        f"{plain * 1e3:.2f} ms per token ({1 / plain:.1f} tokens/s) without the profiler")
    counts = {e.key: e.count / args.tokens for e in events if e.key in SYNC_EVENTS}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC")) / args.tokens
    syncs = ", ".join(f"{k} x{v:.1f}" for k, v in sorted(counts.items())) or "no syncs"
    say(f"per token: {launches:.0f} kernel launches; {syncs}")
    say()
    say(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        say(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    if args.out:
        write_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
