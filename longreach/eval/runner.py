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

import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from longreach.eval.attention import (
    apply_attention,
    check_attention_model,
    resolve_attention,
    saved_attention,
)
from longreach.eval.plots import plot_heatmap
from longreach.eval.run_folder import open_run_folder, read_results, result_writer, write_summaries
from longreach.eval.scoring import score_generation
from longreach.eval.stream import greedy_generate
from longreach.eval.tasks import count_tokens, get_eval_task, make_sample
from longreach.eval.tasks.base import check_depth
from longreach.integrations import hf
from longreach.models.loading import (
    check_model_folder,
    load_causal_lm,
    load_model_tokenizer,
    tokenizer_source,
)
from longreach.runtime import resolve_device, resolve_dtype, versions

_MEMORY_HEADROOM = 0.9  # use at most this fraction of free memory for the cache


class InsufficientMemoryError(ValueError):
    """The prompt's KV cache would not fit in the device's free memory."""


# ---------------------------------------------------------------- model loading


def load_model(model_dir: str | os.PathLike, device: str = "auto", dtype: str = "auto",
               attention: dict | None = None, tokenizer: str | os.PathLike | None = None,
               memory: str | None = None):
    """A local HF causal LM folder (longreach or any other, or a shipped checkpoint name
    such as ``gca-tiny``) and its tokenizer; nothing is downloaded. ``attention``: longreach
    plug-in settings (``eval.attention``) to switch to; None: the ones the folder was saved
    with, if any (``eval.attention.saved_attention``). ``tokenizer``: ``"byte"`` or a
    folder, for a model folder saved without one. ``memory`` (GCA models): where generation
    caches keep the chunk keys/values, ``"cpu"``, ``"device"`` or ``"disk:PATH"``, in place of
    the folder's setting. A broken or missing file raises a ValueError naming it."""
    path = check_model_folder(model_dir)  # a folder or a shipped checkpoint's name
    tok = load_model_tokenizer(path, tokenizer)  # a missing tokenizer fails before the weights load
    attention = attention or saved_attention(path)
    dev = resolve_device(device)
    model = load_causal_lm(path, dtype=resolve_dtype(dtype, dev))
    model = apply_attention(model, attention)
    if memory is not None:
        set_chunk_memory(model, memory, path)
    return model.to(dev).eval(), tok


def check_chunk_memory(memory: str | None) -> None:
    """A bad ``memory`` value fails before anything loads."""
    if memory is not None:
        from longreach.cache.gca import parse_memory

        parse_memory(memory)


def set_chunk_memory(model, memory: str, model_dir="the model") -> None:
    """Make ``model``'s generation caches keep chunk keys/values in ``memory``."""
    check_chunk_memory(memory)
    gca = getattr(getattr(model, "model", None), "gca", None)
    if gca is None or not hasattr(gca, "settings"):
        raise ValueError(f"--memory {memory} is for GCA models (their chunk memory); "
                         f"{model_dir} has no gca layers")
    gca.settings["memory"] = memory


# ---------------------------------------------------------------- memory check


def cache_bytes_per_token(model) -> int:
    """Bytes the generation cache grows by per token (0 for a bounded cache): the plug-in's
    growth for a plugged HF model, the model's own ``cache_bytes_per_token()`` where it has
    one (longreach models), else keys and values of every token in every layer."""
    plugin = hf.cache_bytes_per_token(model)
    if plugin is not None:
        return plugin
    own = getattr(model, "cache_bytes_per_token", None)
    if callable(own):
        return int(own())
    return hf.kv_cache_bytes_per_token(model)


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (None when unknown: no check is made).

    On the CPU it reads ``MemAvailable`` from /proc/meminfo (Linux), which is what
    ``psutil.virtual_memory().available`` reports there; psutil is not a dependency of
    longreach nor of torch or transformers, so one number does not add one. Elsewhere the
    free physical pages (``os.sysconf``, an underestimate: no reclaimable cache), else None."""
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
    """Raise InsufficientMemoryError when the cache for ``n_tokens`` will not fit: on the
    device, and in host memory for a GCA model's chunk store (``memory="cpu"``)."""
    need = cache_bytes_per_token(model) * n_tokens
    free = available_memory(device)
    if need and free is not None and need > _MEMORY_HEADROOM * free and not force:
        raise InsufficientMemoryError(
            f"a {n_tokens}-token prompt needs about {need / 2**30:.2f} GiB of KV cache but only "
            f"{free / 2**30:.2f} GiB is free on {device}: this model's attention keeps every "
            "token. Use shorter lengths, a model with a bounded cache, or force=True "
            "(--force) to try anyway"
        )
    host = getattr(model, "host_cache_bytes_per_token", None)
    host_need = int(host() * n_tokens) if callable(host) else 0
    if host_need and not force:
        if device.type == "cpu":  # the device part lives in the same RAM
            host_need += need
        import torch

        host_free = available_memory(torch.device("cpu"))
        if host_free is not None and host_need > _MEMORY_HEADROOM * host_free:
            raise InsufficientMemoryError(
                f"a {n_tokens}-token prompt keeps about {host_need / 2**30:.2f} GiB of chunk "
                f"keys/values in host memory but only {host_free / 2**30:.2f} GiB is available: "
                "keep the chunk memory on disk instead (memory-mapped files: --memory "
                "disk:PATH, or memory='disk:PATH' in Python), use shorter lengths, or --force "
                "to try anyway"
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
    """Greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``, up to and including
    ``eos_token_id``); the prompt is fed in ``prefill_chunk`` segments through the model's
    cache, so only one segment's activations exist at a time (``model.generate`` with
    ``prefill_chunk_size``; see ``stream.greedy_generate``)."""
    return greedy_generate(model, prompt_ids, max_new_tokens, prefill_chunk=prefill_chunk,
                           eos_token_id=eos_token_id)


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


# ---------------------------------------------------------------- the grid


def _sample_key(length: int, depth: float, index: int) -> tuple[int, float, int]:
    return (int(length), round(float(depth), 6), int(index))


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
    tokenizer: str | os.PathLike | None = None,
    memory: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``task`` on every (length, depth) cell, ``samples`` prompts per cell.

    Returns the summary (also written to ``out_dir/summary.json``). ``max_new_tokens``
    defaults to the answer's token count + 4. ``attention`` switches a Llama / Qwen2 /
    Mistral model to a longreach plug-in: ``"cca"``, ``"streaming"``, ``"lm-infinite"`` or a
    dict such as ``{"kind": "cca", "group_size": 16, "window": 1024}``. ``tokenizer``:
    ``"byte"`` or a tokenizer folder, in place of the one saved in the model folder.
    ``memory`` (GCA models): where the chunk memory lives (``load_model``). Raises
    ValueError for bad arguments, before the model is loaded.
    """
    check_chunk_memory(memory)
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
        max_new_tokens=max_new_tokens, attention=attention, tokenizer=tokenizer)
    done = {_sample_key(r["length"], r["depth"], r["index"]) for r in finished}
    todo = [(n, d, i) for n in lengths for d in depths for i in range(samples)
            if _sample_key(n, d, i) not in done]
    skipped = len(lengths) * len(depths) * samples - len(todo)

    if todo:
        tok = load_model_tokenizer(model_path, tokenizer)
        # bad lengths (shorter than the prompt scaffolding) fail before the model loads
        # (the shortest length, when short: no prompt scaffold nears 64K tokens, and building
        # a many-million-token prompt here would delay the memory check below by minutes)
        if min(lengths) <= 1 << 16:
            make_sample(task, tok, min(lengths), depths[0], seed=seed, haystack=haystack,
                        **options)
        model, tok = load_model(model_path, device, dtype, attention, tokenizer, memory)
        dev = next(model.parameters()).device
        check_memory(model, max(n for n, _, _ in todo) + (max_new_tokens or 64), dev, force)
        _run_samples(task, spec.metric, model, tok, todo, out, seed=seed, haystack=haystack,
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
             max_new_tokens: int | None, attention, tokenizer=None,
             ) -> tuple[Path, Any, Path, dict, list[dict]]:
    """Start or resume a run in ``out_dir`` (``run_folder.open_run_folder``) after checking
    the model folder, its tokenizer (or ``tokenizer``) and the attention plug-in; return
    (model path, resolved attention, out folder, run config, this task's finished records)."""
    model_path = check_model_folder(model_dir).resolve()
    tokenizer_source(model_path, tokenizer)  # no tokenizer: refused before a folder is made
    attention = resolve_attention(attention) or saved_attention(model_path)
    check_attention_model(model_path, attention)
    config = {"task": task, "model": str(model_path), "seed": int(seed), "haystack": str(haystack),
              "options": options, "max_new_tokens": max_new_tokens, "attention": attention}
    if tokenizer is not None:  # recorded only when given, so earlier runs' folders still resume
        config["tokenizer"] = str(tokenizer)
    out = open_run_folder(out_dir, config)
    finished = [r for r in read_results(out) if r.get("task", task) == task]
    return model_path, attention, out, config, finished


class progress_bar:
    """A rich progress bar with ETA (or a silent stand-in when not ``enabled``), entered as
    ``(bar, job)``; ``count`` adds a done/total column."""

    def __init__(self, enabled: bool, name: str, total: int, *, count: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(),
                   *((MofNCompleteColumn(),) if count else ()), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        self.bar = Progress(*columns, disable=not enabled, transient=False)
        self.name, self.total = name, total

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.bar.add_task(self.name, total=self.total)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _run_samples(task, metric, model, tokenizer, todo, out: Path, *, seed, haystack, options,
                 max_new_tokens, prefill_chunk, progress) -> None:
    is_blank = _blank_check(tokenizer)
    with progress_bar(progress, task, len(todo), count=True) as (bar, job), \
            result_writer(out) as append:
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
            append({
                "task": task, "length": length, "depth": depth, "index": index, "seed": seed,
                "prompt_tokens": len(prompt_ids), "answer": sample.answer,
                "answers": sample.answers, "generation": text, "score": scores[metric],
                "scores": scores, "metadata": sample.metadata,
                "seconds": round(time.perf_counter() - started, 4),
                "finished_at": datetime.now(timezone.utc).isoformat(),
            })
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
    metrics = sorted({k for row in summary["cells"] for k in row} - {"length", "depth", "n"})
    write_summaries(out, summary, ["length", "depth", "n", *metrics], summary["cells"])
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
    "open_run",
    "progress_bar",
    "read_results",
    "run_eval",
    "summarize",
]
