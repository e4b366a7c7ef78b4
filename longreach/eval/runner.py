"""Run an eval task over a (length x depth) grid on a saved model and record the results.

Long prompts stream through the model's own generation cache in segments, so a model with
a bounded cache (sliding window, recurrent state) evaluates any length in bounded memory;
a full-attention model is refused up front when its KV cache would not fit. Each finished
sample is appended to ``results.jsonl`` at once, so an interrupted run resumes where it
stopped: re-running the same command skips the samples already there.

Outputs in ``out_dir``: ``run.json`` (what is being evaluated), ``results.jsonl`` (one
line per sample), ``summary.json`` and ``summary.csv`` (per-cell means, the command and
versions) and ``heatmap.png``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from longreach.eval.attention import (
    apply_attention,
    check_attention_model,
    new_bounded_cache,
    plugin_cache_bytes_per_token,
    resolve_attention,
)
from longreach.eval.plots import plot_heatmap
from longreach.eval.scoring import score_generation
from longreach.eval.tasks import count_tokens, get_eval_task, make_sample
from longreach.eval.tasks.base import check_depth
from longreach.models.compat import cache_kwargs, output_cache

RESULTS = "results.jsonl"
RUN_CONFIG = "run.json"
# Keys of run.json that must agree for old results to count as the same experiment.
_IDENTITY = ("task", "model", "seed", "haystack", "options", "max_new_tokens", "attention")
_MEMORY_HEADROOM = 0.9  # use at most this fraction of free memory for the cache


class InsufficientMemoryError(ValueError):
    """The prompt's KV cache would not fit in the device's free memory."""


# ---------------------------------------------------------------- model loading


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


def load_model(model_dir: str | os.PathLike, device: str = "auto", dtype: str = "auto",
               attention: dict | None = None):
    """A local HF causal LM folder (longreach or any other) and its tokenizer; nothing is
    downloaded. ``attention``: longreach plug-in settings (``eval.attention``) to switch to."""
    from transformers import AutoModelForCausalLM

    import longreach  # noqa: F401  (registers the longreach model type)
    from longreach.data import load_tokenizer

    path = _model_path(model_dir)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, dev), local_files_only=True
    )
    model = apply_attention(model, attention)
    return model.to(dev).eval(), load_tokenizer(path)


def _model_path(model_dir) -> Path:
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json)")
    return path


# ---------------------------------------------------------------- memory check


def cache_bytes_per_token(model) -> int:
    """Bytes the generation cache grows by per token (0 for a bounded cache).

    longreach models: layers whose state is an attention KV cache without a window grow;
    other states (sliding windows, recurrent states) are bounded. Other HF models are
    assumed to keep keys and values for every token in every layer.
    """
    from longreach.cache import AttentionKVState

    plugin = plugin_cache_bytes_per_token(model)
    if plugin is not None:
        return plugin
    cfg = model.config
    element = next(model.parameters()).element_size()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_layer = 2 * kv_heads * head_dim * element
    inner = getattr(model, "model", None)
    gca = getattr(inner, "gca", None)
    if gca is not None and gca.settings["memory"] != "device":
        return 0  # chunk keys/values go to host RAM or disk; the device keeps only landmarks
    if hasattr(inner, "new_cache"):
        states = inner.new_cache().states
        growing = [s for s in states if isinstance(s, AttentionKVState) and s.window is None]
        return len(growing) * (per_layer + 8)  # + the int64 position of each kept token
    return cfg.num_hidden_layers * per_layer


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (None when unknown: no check is made)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_memory(model, n_tokens: int, device, force: bool = False) -> int:
    """Raise InsufficientMemoryError when the cache for ``n_tokens`` will not fit."""
    need = cache_bytes_per_token(model) * n_tokens
    free = available_memory(device)
    if need and free is not None and need > _MEMORY_HEADROOM * free and not force:
        raise InsufficientMemoryError(
            f"a {n_tokens}-token prompt needs about {need / 2**30:.2f} GiB of KV cache but only "
            f"{free / 2**30:.2f} GiB is free on {device}: this model's attention keeps every "
            "token. Use shorter lengths, a model with a bounded cache, or force=True "
            "(--force) to try anyway"
        )
    return need


# ---------------------------------------------------------------- generation


def generate_answer(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    prefill_chunk: int = 4096,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt_ids``; the prompt is fed in ``prefill_chunk`` segments
    through the model's cache, so only one segment's activations exist at a time."""
    import inspect

    import torch

    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    # only the last position's logits are needed while prefilling
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache, out = new_bounded_cache(model), None
    with torch.inference_mode():
        for start in range(0, ids.shape[1], prefill_chunk):
            out = model(ids[:, start : start + prefill_chunk], **cache_kwargs(model, cache),
                        use_cache=True, **keep)
            cache = output_cache(out)
        generated: list[int] = []
        logits = out.logits[:, -1]
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1))
            generated.append(token)
            if token == eos_token_id or len(generated) == max_new_tokens:
                break
            out = model(torch.tensor([[token]], device=device), **cache_kwargs(model, cache),
                        use_cache=True, **keep)
            cache, logits = output_cache(out), out.logits[:, -1]
    return generated


def _target_ids(tokenizer, prompt: str, prompt_ids: list[int], continuation: str) -> list[int]:
    """The ids a perfect model generates after the prompt."""
    both = tokenizer.encode(prompt + continuation)
    if both[: len(prompt_ids)] == prompt_ids:
        return both[len(prompt_ids) :]
    return tokenizer.encode(continuation, add_special_tokens=False)


def _blank_check(tokenizer):
    blank: dict[int, bool] = {}

    def is_blank(token: int) -> bool:
        if token not in blank:
            blank[token] = not tokenizer.decode([token], skip_special_tokens=False).strip()
        return blank[token]

    return is_blank


# ---------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished samples recorded in ``out_dir`` (a torn last line is ignored)."""
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run killed mid-write; that sample is simply redone
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so new lines start clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _sample_key(length: int, depth: float, index: int) -> tuple[int, float, int]:
    return (int(length), round(float(depth), 6), int(index))


def versions() -> dict[str, str]:
    import torch
    import transformers

    import longreach

    return {"longreach": longreach.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------- the grid


def _check_grid(lengths, depths, samples) -> tuple[list[int], list[float]]:
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    depths = [check_depth(d) for d in depths]
    if not depths:
        raise ValueError("depths must not be empty")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    return sorted(set(lengths)), sorted(set(depths))


def run_eval(
    task: str,
    model_dir: str | os.PathLike,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike = "eval-out",
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int | None = None,
    *,
    prefill_chunk: int = 4096,
    force: bool = False,
    haystack: str = "builtin",
    options: dict[str, Any] | None = None,
    command: str | None = None,
    progress: bool = True,
    attention: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``task`` on every (length, depth) cell, ``samples`` prompts per cell.

    Returns the summary (also written to ``out_dir/summary.json``). ``max_new_tokens``
    defaults to the answer's token count + 4. ``attention`` switches a Llama / Qwen2 /
    Mistral model to a longreach plug-in: ``"cca"``, ``"streaming"``, ``"lm-infinite"`` or a
    dict such as ``{"kind": "cca", "group_size": 16, "window": 1024}``. Raises ValueError for
    bad arguments, before the model is loaded.
    """
    spec = get_eval_task(task)
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"task {task!r} got unknown option(s) {unknown}; valid: {sorted(spec.options)}")
    lengths, depths = _check_grid(lengths, depths, samples)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model_path, attention, out, config, finished = open_run(
        task, model_dir, out_dir, seed=seed, haystack=haystack, options=options,
        max_new_tokens=max_new_tokens, attention=attention)
    done = {_sample_key(r["length"], r["depth"], r["index"]) for r in finished}
    todo = [(n, d, i) for n in lengths for d in depths for i in range(samples)
            if _sample_key(n, d, i) not in done]
    skipped = len(lengths) * len(depths) * samples - len(todo)

    if todo:
        from longreach.data import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        # bad lengths (shorter than the prompt scaffolding) fail before the model loads
        make_sample(task, tokenizer, lengths[0], depths[0], seed=seed, haystack=haystack, **options)
        model, tokenizer = load_model(model_path, device, dtype, attention)
        dev = next(model.parameters()).device
        check_memory(model, max(n for n, _, _ in todo) + (max_new_tokens or 64), dev, force)
        _run_samples(task, spec.metric, model, tokenizer, todo, out, seed=seed, haystack=haystack,
                     options=options, max_new_tokens=max_new_tokens,
                     prefill_chunk=prefill_chunk, progress=progress)

    summary = summarize(out, task, lengths, depths, samples, metric=spec.metric)
    summary.update({"command": command or _default_command(task, model_dir, lengths, depths,
                                                             samples, seed, out_dir),
                    "config": config, "versions": versions(), "evaluated": len(todo),
                    "skipped": skipped})
    write_summary(out, summary, lengths, depths)
    return summary


def open_run(task: str, model_dir, out_dir, *, seed: int, haystack: str, options: dict,
             max_new_tokens: int | None, attention) -> tuple[Path, Any, Path, dict, list[dict]]:
    """Start or resume a run in ``out_dir``: check the model folder and attention plug-in,
    refuse a folder that holds another run's results, drop a torn last line, and return
    (model path, resolved attention, out folder, run config, this task's finished records)."""
    model_path = _model_path(model_dir).resolve()
    attention = resolve_attention(attention)
    check_attention_model(model_path, attention)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"task": task, "model": str(model_path), "seed": int(seed), "haystack": str(haystack),
              "options": options, "max_new_tokens": max_new_tokens, "attention": attention}
    _check_run_config(out, config)
    _drop_torn_tail(out / RESULTS)
    finished = [r for r in read_results(out) if r.get("task", task) == task]
    return model_path, attention, out, config, finished


def _check_run_config(out: Path, config: dict[str, Any]) -> None:
    path = out / RUN_CONFIG
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in _IDENTITY if old.get(k) != config.get(k)]
        if diff and (out / RESULTS).is_file():
            raise ValueError(
                f"{out} holds results of a different run ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} }); use another --out folder"
            )
    write_atomic(path, json.dumps(config, indent=2) + "\n")


def _run_samples(task, metric, model, tokenizer, todo, out: Path, *, seed, haystack, options,
                 max_new_tokens, prefill_chunk, progress) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    is_blank = _blank_check(tokenizer)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar, \
            open(out / RESULTS, "a", encoding="utf-8") as results:
        job = bar.add_task(f"{task}", total=len(todo))
        for length, depth, index in todo:
            bar.update(job, description=f"{task} length={length} depth={depth:g}")
            started = time.perf_counter()
            sample = make_sample(task, tokenizer, length, depth, seed=seed, index=index,
                                 haystack=haystack, **options)
            prompt_ids = tokenizer.encode(sample.prompt)
            target = _target_ids(tokenizer, sample.prompt, prompt_ids, sample.continuation)
            generated = generate_answer(
                model, prompt_ids, max_new_tokens or len(target) + 4,
                prefill_chunk=prefill_chunk, eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(generated, skip_special_tokens=True)
            scores = score_generation(text, sample.answers, generated, target, is_blank)
            record = {
                "task": task, "length": length, "depth": depth, "index": index, "seed": seed,
                "prompt_tokens": len(prompt_ids), "answer": sample.answer,
                "answers": sample.answers, "generation": text, "score": scores[metric],
                "scores": scores, "metadata": sample.metadata,
                "seconds": round(time.perf_counter() - started, 4),
                "finished_at": datetime.now(timezone.utc).isoformat(),
            }
            # one line per finished sample, flushed to disk: an interrupted run loses at most it
            results.write(json.dumps(record) + "\n")
            results.flush()
            os.fsync(results.fileno())
            bar.advance(job)


def summarize(out_dir, task: str, lengths, depths, samples: int, metric: str) -> dict[str, Any]:
    """Per-cell means of every metric over the recorded samples of this grid."""
    wanted = {_sample_key(n, d, i) for n in lengths for d in depths for i in range(samples)}
    cells: dict[tuple[int, float], dict[int, dict[str, float]]] = {}
    for r in read_results(out_dir):
        key = _sample_key(r["length"], r["depth"], r["index"])
        if key in wanted and r.get("task") == task:
            cells.setdefault(key[:2], {})[key[2]] = r["scores"]
    rows = []
    for n in lengths:
        for d in depths:
            got = list(cells.get((n, round(d, 6)), {}).values())
            row: dict[str, Any] = {"length": n, "depth": d, "n": len(got)}
            for name in sorted({k for s in got for k in s}):
                row[name] = sum(s[name] for s in got) / len(got)
            rows.append(row)
    scored = [r for r in rows if r["n"]]
    overall = (sum(r[metric] * r["n"] for r in scored) / sum(r["n"] for r in scored)
               if scored else None)
    return {"task": task, "metric": metric, "overall": overall, "lengths": list(lengths),
            "depths": list(depths), "samples": samples, "cells": rows}


def write_summary(out: Path, summary: dict[str, Any], lengths, depths) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    metrics = sorted({k for row in summary["cells"] for k in row} - {"length", "depth", "n"})
    buf = io.StringIO()
    buf.write(f"# command: {summary['command']}\n")
    buf.write("# versions: " + " ".join(f"{k}={v}" for k, v in summary["versions"].items()) + "\n")
    writer = csv.DictWriter(buf, fieldnames=["length", "depth", "n", *metrics], lineterminator="\n")
    writer.writeheader()
    for row in summary["cells"]:
        writer.writerow(row)
    write_atomic(out / "summary.csv", buf.getvalue())
    metric = summary["metric"]
    scores = {(r["length"], r["depth"]): r[metric] for r in summary["cells"] if r["n"]}
    plot_heatmap(scores, lengths, depths, out / "heatmap.png", metric=metric,
                 title=f"{summary['task']} ({metric})")


def _default_command(task, model_dir, lengths, depths, samples, seed, out_dir) -> str:
    if sys.argv and sys.argv[0].endswith("longreach"):
        import shlex

        return shlex.join(["longreach", *sys.argv[1:]])
    return (f"run_eval({task!r}, {str(model_dir)!r}, lengths={list(lengths)}, "
            f"depths={list(depths)}, samples={samples}, seed={seed}, out_dir={str(out_dir)!r})")


__all__ = [
    "InsufficientMemoryError",
    "available_memory",
    "cache_bytes_per_token",
    "check_memory",
    "count_tokens",
    "generate_answer",
    "load_model",
    "read_results",
    "run_eval",
    "summarize",
]
