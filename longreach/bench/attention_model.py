"""``longreach bench attention --suite model``: training tokens/s of the GCA-128M recipe vs a
sliding-window model of equal depth (its layers + the chunk encoder's) at 16K, and
Llama-2-7B-shaped prefill (random weights) time to first token, SDPA vs `enable_cca`, at
--prefill-lengths (CUDA events).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import torch

from longreach.bench.floors import causal_attention_flops, cca_attention_flops
from longreach.bench.harness import DTYPE, free_memory, length_label, parse_lengths

if TYPE_CHECKING:
    from longreach.bench.attention import AttentionBench


def run(bench: AttentionBench) -> None:
    _training(bench)
    free_memory(bench.device)
    _prefill(bench)
    free_memory(bench.device)


def _training(bench: AttentionBench) -> None:
    from longreach.bench.training import measure_training
    from longreach.train import find_recipe, load_config

    gca_recipe, swa_recipe, seq_len, steps, warmup = "gca-128m", "swa-128m", 16384, 3, 2
    if bench.tiny:
        gca_recipe, swa_recipe, seq_len, steps, warmup = "gca-tiny", "swa-tiny", 256, 1, 1
    gca_cfg = load_config(find_recipe(gca_recipe), [])
    encoder = gca_cfg.model["gca"]["encoder_layers"]
    layers = gca_cfg.model["num_hidden_layers"] + encoder
    # the recipe's batch (4 sequences of 16K for the 128M recipes): at batch 1 a 128M model's
    # step is bound by Python and kernel launches, not by the GPU
    batch = bench.args.train_batch or (1 if bench.tiny else gca_cfg.train.batch_size)
    case = f"T={length_label(seq_len)} B={batch}"
    for kind, recipe, overrides in (
        ("swa", swa_recipe, [f"model.num_hidden_layers={layers}"]),
        ("gca", gca_recipe, []),
    ):
        r = measure_training(recipe, overrides, device=bench.device, seq_len=seq_len,
                             batch=batch, steps=steps, warmup=warmup)
        note = f"{r['tokens_per_s']:,} tok/s, {r['params_M']}M params"
        if "peak_mem_GiB" in r:
            note += f", peak {r['peak_mem_GiB']} GiB"
        bench.add(suite="model", case=case, pass_="train step", kind=kind,
                  impl=f"{recipe} ({r['layers']} layers" + (
                      f" + {encoder} encoder)" if kind == "gca" else ")"),
                  ms=1e3 * r["step_s"], shape=r, note=note)
        free_memory(bench.device)


def _prefill(bench: AttentionBench) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from longreach.integrations import hf

    if bench.args.prefill_lengths.strip().lower() in ("", "none"):
        print("[model] prefill skipped (--prefill-lengths none)", flush=True)
        return
    dev = bench.device
    dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
    layers = bench.args.model_layers or 32
    lengths = parse_lengths(bench.args.prefill_lengths)
    g, s = 16, 1024
    if bench.tiny:
        dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=256)
        layers, lengths, s = bench.args.model_layers or 2, [256], 64
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(lengths),
                         **dims)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    hidden, inter, heads = dims["hidden_size"], dims["intermediate_size"], dims[
        "num_attention_heads"]
    D = hidden // heads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for T in lengths:
        ids = torch.randint(0, dims["vocab_size"], (1, T), device=dev)
        # per token and layer: q, k, v, o projections and the SwiGLU MLP; one logit row
        dense = 2 * T * layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * hidden * (
            dims["vocab_size"])
        case = f"T={length_label(T)} {layers} layers"
        shape = dict(seq_len=T, layers=layers, **dims)
        for kind in ("sdpa", "cca"):
            if kind == "cca":
                hf.enable_cca(model, group_size=g, window=s)
                attn = cca_attention_flops(1, heads, T, D, group_size=g, window=s,
                                           pool_heads=dims["num_key_value_heads"])
            else:
                attn = causal_attention_flops(1, heads, T, D)
            ms = _prefill_ms(bench, model, ids)
            if kind == "cca":
                hf.restore_attention(model)
            bench.add(suite="model", case=case, pass_="prefill", kind=kind,
                      impl="llama sdpa" if kind == "sdpa" else f"llama enable_cca(g={g}, "
                      f"window={s})", ms=ms, shape=shape, flops=dense + layers * attn,
                      bytes=weight_bytes,  # the weights, read once: activations left out
                      note="time to first token, random weights")
            free_memory(dev)
        del ids
    del model
    free_memory(dev)


def _prefill_ms(bench: AttentionBench, model, ids) -> float:
    """Median of 2 prefills after 1 warm-up, in ms (CUDA events on CUDA)."""
    def once():
        model(ids, use_cache=False, logits_to_keep=1)

    times = []
    with torch.inference_mode():
        once()  # warm-up
        for _ in range(2):
            if bench.device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                once()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                once()
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)
