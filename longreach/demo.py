"""``longreach demo``: train the tiny sliding-window model on the built-in corpus for a few
minutes, then report its held-out loss and a sample, and say where the run lives."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel


def held_out_loss(model, cfg, n_batches: int | None = None) -> float:
    """Mean next-token loss of ``model`` on the held-out split the trainer used."""
    from longreach.data import PackedSequences, build_token_cache, eval_batches, load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    cache = build_token_cache(
        cfg.data.source, tok, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction,
        text_field=cfg.data.text_field, progress=False,
    )
    batches = eval_batches(PackedSequences(cache.val, cfg.data.seq_len), cfg.train.batch_size,
                           n_batches or cfg.train.eval_batches)
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"].to(model.device)
            losses.append(model(ids, labels=batch["labels"].to(model.device)).loss.item())
    return sum(losses) / len(losses)


def calibrate_steps(cfg, seconds: float) -> int:
    """How many optimizer steps of ``cfg`` fit in ``seconds`` on this machine.

    Times a few steps of a throwaway copy of the model, so the run's learning-rate schedule
    (warmup + cosine) ends inside the budget instead of being cut off midway.
    """
    from longreach import LongReachConfig, LongReachForCausalLM

    model = LongReachForCausalLM(LongReachConfig(**cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (cfg.train.batch_size, cfg.data.seq_len))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[1]  # median after one warm-up step
    # leave room for periodic evaluation, checkpoints and logging
    return max(20, int(0.8 * seconds / step))


def run_demo(*, minutes: float, out_dir: str, config: Path, prompt: str) -> int:
    from transformers import AutoModelForCausalLM

    from longreach.data import load_tokenizer
    from longreach.train import load_config, train

    console = Console()
    out = Path(out_dir)
    if out.exists():
        # the demo is a fresh run each time; only ever remove a folder the demo itself made
        if not (out / ".longreach-demo").exists():
            raise ValueError(f"{out} exists and was not made by the demo; pass --out to choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".longreach-demo").touch()
    cfg = load_config(config, [f"train.out_dir={out}"])
    steps = min(cfg.train.steps, calibrate_steps(cfg, minutes * 60))
    warmup = min(cfg.train.warmup_steps, max(1, steps // 10))
    every = max(1, steps // 5)
    cfg = load_config(config, [
        f"train.out_dir={out}", f"train.steps={steps}", f"train.warmup_steps={warmup}",
        f"train.eval_every={every}", f"train.save_every={every}",
        # a safety net if the machine gets busier than it was while calibrating
        f"train.max_time_minutes={minutes * 1.5}",
    ])
    console.print(Panel.fit(
        f"Training [bold]{cfg.name}[/] ({config}) on the built-in corpus: {steps} steps, "
        f"about {minutes:g} min on this machine.\n"
        f"mixers: {cfg.model.get('mixers')}, seq_len {cfg.data.seq_len}, batch {cfg.train.batch_size}",
        title="longreach demo",
    ))
    start = time.time()
    run_dir = train(cfg)
    final = Path(run_dir) / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = load_tokenizer(final)
    loss = held_out_loss(model, cfg)
    torch.manual_seed(0)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=160, do_sample=True, temperature=0.7, top_k=40,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    sample = tok.decode(gen[0], skip_special_tokens=True)
    per_token = "bits/byte" if len(tok) <= 300 else "bits/token"
    console.print(Panel.fit(
        f"held-out loss: [bold]{loss:.3f}[/] nats ({loss / math.log(2):.3f} {per_token}), "
        f"perplexity {math.exp(loss):.2f}\n"
        f"wall time: {time.time() - start:.0f} s\n\n[bold]sample[/]\n{sample}\n\n"
        f"run folder: {run_dir}\nmodel: {final}\n"
        f"try: longreach generate --model {final} --prompt \"{prompt}\"",
        title="result",
    ))
    return 0
