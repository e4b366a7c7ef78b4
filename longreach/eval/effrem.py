"""Effective Remembrance: how much the prediction at position T still depends on early tokens.

    EffRem_T(t) = TV( q(. | x[0:T]), q(. | x[t:T]) ),   TV(p, q) = 1/2 sum_v |p(v) - q(v)|

(Buitrago Ruiz and Gu, 2025): the total variation between the model's next-token
distribution after the full prefix and after the prefix with its first t tokens cut away.
0 at t = 0 by definition; large values at small t mean early tokens still dominate far
downstream. Computed over a log-spaced grid of t in [0, T), averaged over ``samples``
documents (the same long documents as ``ppl``). Works for any causal LM folder: each
context is streamed through the model's own cache and only its last logits are kept.

When the tokenizer starts every text with a BOS token, each cut context starts with it too.
Outputs in ``out_dir``: ``run.json``, ``results.jsonl`` (one line per document),
``summary.json``, ``summary.csv`` and ``effrem.png`` (log-log, as in the paper). Re-running
the same command skips the documents already done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from longreach.eval.plots import format_length, plot_lines
from longreach.eval.ppl import check_position_limit, leading_special_ids, long_document
from longreach.eval.run_folder import read_results, result_writer, write_summaries
from longreach.eval.runner import (
    check_chunk_memory,
    check_memory,
    load_model,
    open_run,
    progress_bar,
)
from longreach.eval.stream import next_token_logits
from longreach.runtime import versions

EFFREM_PLOT = "effrem.png"


def cut_points(T: int, points: int = 16) -> list[int]:
    """0 and ``points`` log-spaced cut points in [1, T - 1] (fewer where they coincide)."""
    if T < 2:
        raise ValueError(f"T must be >= 2 tokens, got {T}")
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    grid = np.unique(np.round(np.geomspace(1, T - 1, num=points)).astype(int))
    return [0, *(int(t) for t in grid if 1 <= t <= T - 1)]


def next_token_probs(model, ids: Sequence[int], *, prefill_chunk: int = 4096):
    """q(. | ids): the model's next-token distribution (float64, CPU) after streaming ``ids``
    through its cache in ``prefill_chunk``-token segments."""
    import torch

    logits = next_token_logits(model, ids, prefill_chunk=prefill_chunk)
    return torch.softmax(logits.double(), dim=-1).cpu()


def total_variation(p, q) -> float:
    """1/2 sum_v |p(v) - q(v)|."""
    return float(0.5 * (p - q).abs().sum())


def effective_remembrance(model, ids: Sequence[int], ts: Sequence[int], *,
                          prefix: Sequence[int] = (), prefill_chunk: int = 4096,
                          on_step=None) -> list[float]:
    """EffRem_T(t) for each t in ``ts``, T = len(ids); every context is ``prefix`` (e.g. [bos])
    + ids[t:T]. t = 0 is recomputed like any other cut, so it checks the streaming is exact.
    ``on_step()`` is called after each cut (progress bars)."""
    T = len(ids)
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise ValueError(f"cut points must lie in [0, T={T}), got {bad}")
    prefix, ids = list(prefix), list(ids)
    full = next_token_probs(model, prefix + ids, prefill_chunk=prefill_chunk)
    values = []
    for t in ts:
        cut = next_token_probs(model, prefix + ids[t:], prefill_chunk=prefill_chunk)
        values.append(total_variation(full, cut))
        if on_step is not None:
            on_step()
    return values


def run_effrem(
    model_dir: str | os.PathLike,
    T: int = 4096,
    *,
    samples: int = 8,
    points: int = 16,
    seed: int = 0,
    out_dir: str | os.PathLike = "eval-effrem",
    device: str = "auto",
    dtype: str = "auto",
    prefill_chunk: int = 4096,
    force: bool = False,
    haystack: str = "builtin",
    command: str | None = None,
    progress: bool = True,
    attention: str | dict[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
    memory: str | None = None,
) -> dict[str, Any]:
    """EffRem_T over ``cut_points(T, points)``, averaged over ``samples`` documents.

    ``attention`` switches a Llama / Qwen2 / Mistral folder to a longreach plug-in, as in
    ``run_eval``; ``tokenizer`` (``"byte"`` or a folder) replaces the model folder's own.
    Returns the summary (also written to ``out_dir/summary.json``).
    """
    check_chunk_memory(memory)
    T = int(T)
    ts = cut_points(T, points)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    model_path, attention, out, config, finished = open_run(
        "effrem", model_dir, out_dir, seed=seed, haystack=haystack,
        options={"T": T, "points": points}, max_new_tokens=None, attention=attention,
        tokenizer=tokenizer)
    done = {r["index"] for r in finished}
    todo = [i for i in range(samples) if i not in done]

    if todo:
        model, tokenizer = load_model(model_path, device, dtype, attention, tokenizer, memory)
        check_position_limit(model, T + 1)
        check_memory(model, T + 1, next(model.parameters()).device, force)
        prefix = leading_special_ids(tokenizer)
        with progress_bar(progress, "effrem", len(todo) * len(ts)) as (bar, job), \
                result_writer(out) as append:
            for index in todo:
                bar.update(job, description=f"effrem T={format_length(T)} doc={index}")
                started = time.perf_counter()
                # the document's own BOS (if any) goes in front of every cut context instead
                doc = long_document(tokenizer, T + len(prefix), seed=seed, index=index,
                                    haystack=haystack)
                values = effective_remembrance(
                    model, doc.ids[len(prefix):], ts, prefix=prefix, prefill_chunk=prefill_chunk,
                    on_step=lambda: bar.advance(job))
                append({
                    "task": "effrem", "T": T, "index": index, "seed": seed, "t": ts,
                    "effrem": values, "first_document": doc.first_document,
                    "documents": doc.documents,
                    "seconds": round(time.perf_counter() - started, 4),
                    "finished_at": datetime.now(timezone.utc).isoformat(),
                })

    summary = summarize_effrem(out, T, ts, samples)
    summary.update({
        "command": command or f"run_effrem({str(model_dir)!r}, T={T}, samples={samples}, "
                              f"points={points}, seed={seed}, out_dir={str(out_dir)!r})",
        "config": config, "versions": versions(), "evaluated": len(todo),
        "skipped": samples - len(todo),
    })
    write_effrem_summary(out, summary)
    return summary


def summarize_effrem(out_dir, T: int, ts: Sequence[int], samples: int) -> dict[str, Any]:
    """Mean, std, min and max of EffRem_T(t) over the recorded documents, per t."""
    records = {r["index"]: r for r in read_results(out_dir)
               if r.get("task") == "effrem" and r["T"] == T and r["index"] < samples
               and r["t"] == list(ts)}
    values = np.array([r["effrem"] for r in records.values()], dtype=np.float64)
    cells = []
    for j, t in enumerate(ts):
        column = values[:, j] if len(values) else np.array([])
        cells.append({"T": T, "t": t, "n": len(column),
                      "effrem": float(column.mean()) if len(column) else None,
                      "std": float(column.std()) if len(column) else None,
                      "min": float(column.min()) if len(column) else None,
                      "max": float(column.max()) if len(column) else None})
    positive = [c["effrem"] for c in cells if c["t"] > 0 and c["effrem"] is not None]
    return {"task": "effrem", "metric": "effrem", "T": T, "lengths": [T], "samples": samples,
            "overall": float(np.mean(positive)) if positive else None, "cells": cells,
            "documents_per_sample": [r["documents"] for r in records.values()]}


def write_effrem_summary(out: Path, summary: dict[str, Any]) -> None:
    write_summaries(out, summary, ["T", "t", "n", "effrem", "std", "min", "max"],
                    summary["cells"])
    points = [(c["t"], c["effrem"]) for c in summary["cells"]]
    plot_lines({f"T={format_length(summary['T'])}": points}, out / EFFREM_PLOT,
               xlabel="cut point t (tokens)", ylabel="EffRem_T(t)", logx=True, logy=True,
               title=f"Effective Remembrance, T={format_length(summary['T'])}")


def print_effrem(summary: dict[str, Any]) -> None:
    print(f"effrem T={summary['T']}; evaluated {summary['evaluated']} document(s), reused "
          f"{summary['skipped']}")
    for row in summary["cells"]:
        value = f"{row['effrem']:.4f} (std {row['std']:.4f})" if row["n"] else "-"
        print(f"  t={row['t']:>8}  n={row['n']:<3} EffRem {value}")


__all__ = [
    "cut_points",
    "effective_remembrance",
    "next_token_probs",
    "run_effrem",
    "summarize_effrem",
    "total_variation",
]
