"""Training step time of a longreach recipe on random tokens (shared by the benchmarks)."""

from __future__ import annotations

import statistics
import time

import torch

from longreach.models import build_model
from longreach.models.compat import enable_checkpointing
from longreach.train import find_recipe, load_config


def measure_training(
    recipe: str,
    overrides: list[str] | None = None,
    *,
    device: torch.device,
    seq_len: int | None = None,
    batch: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    transform=None,
) -> dict:
    """Median optimizer-step time of a recipe's model on random tokens.

    AdamW, bf16 autocast on CUDA (fp32 elsewhere), the recipe's gradient checkpointing
    setting. seq_len and batch default to the recipe's; ``transform(model)``, when given,
    edits the built model in place before it moves to the device. Returns a dict with the
    step time, tokens/s, parameter count, the last loss and (CUDA) the peak memory.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    cfg = load_config(find_recipe(recipe), list(overrides or []))
    seq_len = seq_len or cfg.data.seq_len
    batch = batch or cfg.train.batch_size
    model = build_model(cfg.model)
    if transform is not None:
        transform(model)
    model = model.to(device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    bf16 = device.type == "cuda"
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "recipe": recipe, "params_M": round(params / 1e6, 1),
        "mixers": str(cfg.model.get("mixers")), "layers": model.config.num_hidden_layers,
        "seq_len": seq_len, "batch": batch, "step_s": round(step, 4),
        "tokens_per_s": round(batch * seq_len / step), "loss": round(loss.item(), 3),
    }
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, opt
    return result
