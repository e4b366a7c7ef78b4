"""Perplexity per position bucket on long documents, streamed through the model's cache.

A document of ``length`` tokens is fed to the model in ``prefill_chunk``-token segments
through its own generation cache, so a model with a bounded cache (sliding window,
recurrent state) evaluates any length in constant memory. The loss of the token at
position p (predicted from tokens [0, p)) goes to bucket ``p // bucket``; a bucket's
perplexity is exp(mean NLL) over its tokens, pooled over the ``samples`` documents.

A model that generalizes past its training length stays flat; one that does not blows up
right after it. Documents are runs of consecutive documents of the corpus (the built-in
corpus's documents are chapters, a few thousand tokens each), joined by a blank line, from
a random start: a long "document" is usually several concatenated ones, and the results
say how many. A corpus haystack (``--haystack DIR/heldout.jsonl.gz``) keeps its documents
whole: a long one (a package's source) is read in pieces of about 16K characters, counted
as such in ``documents``.

Outputs in ``out_dir``: ``run.json``, ``results.jsonl`` (one line per document: per-bucket
NLL sums and token counts), ``summary.json``, ``summary.csv`` and ``ppl.png``. Re-running
the same command skips the documents already in ``results.jsonl``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longreach.data.synthetic import get_haystack
from longreach.eval.plots import format_length, plot_lines
from longreach.eval.run_folder import read_results, result_writer, write_summaries
from longreach.eval.runner import (
    check_chunk_memory,
    check_memory,
    load_model,
    open_run,
    progress_bar,
)
from longreach.eval.stream import token_logprobs
from longreach.runtime import versions

PPL_PLOT = "ppl.png"


# ---------------------------------------------------------------- documents


@dataclass
class LongDocument:
    """``ids`` (exactly the requested length) cut from consecutive corpus documents."""

    ids: list[int]
    first_document: int  # index of the corpus document it starts with
    documents: int  # how many corpus documents it spans (> 1: concatenated)


def leading_special_ids(tokenizer) -> list[int]:
    """[bos] when the tokenizer starts every encoded text with it (the model was trained that
    way), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer.encode("a")[:1] == [bos]:
        return [bos]
    return []


def long_document(tokenizer, length: int, *, seed: int = 0, index: int = 0,
                  haystack: str = "builtin") -> LongDocument:
    """Document ``index`` of a run: ``length`` tokens of consecutive corpus documents starting
    at a document drawn from ``(seed, index)`` (the same start for every length, so a shorter
    document is a prefix of a longer one). Text is never repeated: a corpus with fewer than
    ``length`` tokens raises ValueError."""
    if length < 2:
        raise ValueError(f"a document needs at least 2 tokens, got length {length}")
    source = get_haystack(haystack, tokenizer)
    n_docs = len(source.documents)
    start = int(np.random.default_rng([int(seed), int(index)]).integers(n_docs))
    ids = list(leading_special_ids(tokenizer))
    used = 0
    while len(ids) < length:
        if used == n_docs:
            raise ValueError(
                f"haystack {haystack!r} has only {len(ids)} tokens; a {length}-token document "
                "needs more text (use a shorter length or a larger --haystack file)"
            )
        # each document (or piece of a long one) with the separator where a document ends
        ids.extend(source.document_ids((start + used) % n_docs).tolist())
        used += 1
    return LongDocument(ids=ids[:length], first_document=start, documents=used)


# ---------------------------------------------------------------- the streamed loss


def stream_nll(model, ids: Sequence[int], *, prefill_chunk: int = 4096) -> Iterator[tuple[int, Any]]:
    """Yield ``(first_position, nll)`` per segment: ``nll[j]`` is -log q(ids[p] | ids[:p]) for
    p = first_position + j, float32 on the CPU. Segments go through the model's cache, so only
    one segment's activations and logits exist at a time."""
    for first, logprobs, _ in token_logprobs(model, ids, prefill_chunk=prefill_chunk):
        yield first, -logprobs


def context_windows(length: int, max_context: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` of the windows that score every position 1..length-1
    from at most ``max_context`` tokens: windows of ``max_context`` tokens stepped by half of
    it; the first scores all its positions, each later one its last half, so a position p >=
    max_context is predicted from between max_context // 2 and max_context - 1 tokens."""
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2 tokens, got {max_context}")
    step = max_context // 2
    windows = [(0, min(max_context, length), 1)]
    start = step
    while windows[-1][1] < length:
        end = min(start + max_context, length)
        windows.append((start, end, start + max_context - step))
        start += step
    return windows


LOGITS_PER_BATCH = 1 << 27  # window_nll: logits of one batch (512 MB in float32)


def window_nll(model, ids: Sequence[int], max_context: int, *,
               batch_tokens: int | None = None) -> Iterator[tuple[int, Any]]:
    """Like ``stream_nll``, but each position is predicted from at most ``max_context``
    previous tokens (``context_windows``): every window is a new sequence from position 0
    with a fresh state, run in batches of about ``batch_tokens`` tokens (default: as many as
    keep a batch's logits within ``LOGITS_PER_BATCH``). On the same document this is the
    content-matched control of the full-context loss: where the two differ, the context
    beyond ``max_context`` helped (lower) or hurt (higher)."""
    device = next(model.parameters()).device
    windows = context_windows(len(ids), max_context)
    if batch_tokens is None:
        vocab = getattr(model.config, "vocab_size", None) or 65536
        batch_tokens = LOGITS_PER_BATCH // vocab
    per_batch = max(1, batch_tokens // max_context)
    # windows of one length go together (all of them but the first and the last, usually)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    tokens = torch.as_tensor(list(ids), dtype=torch.long)
    for group in groups.values():
        for i in range(0, len(group), per_batch):
            batch = group[i : i + per_batch]
            x = torch.stack([tokens[s:e] for s, e, _ in batch]).to(device)
            skip = min(f - s for s, _, f in batch) - 1  # outputs before it predict nothing scored
            with torch.inference_mode():
                logits = model(input_ids=x, use_cache=False).logits[:, skip:-1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                picked = logprobs.gather(-1, x[:, skip + 1 :, None])[..., 0].cpu()
            for (s, _, f), row in zip(batch, picked):
                yield f, -row[f - s - skip - 1 :]


def bucket_nll(model, ids: Sequence[int], bucket: int, *, prefill_chunk: int = 4096,
               max_context: int | None = None) -> tuple[list[float], list[int]]:
    """Per-bucket sums of NLL and token counts; bucket k holds positions [k*bucket, (k+1)*bucket)
    (position 0 has no prediction, so bucket 0 holds one token fewer). ``max_context``: each
    position predicted from at most that many previous tokens (``window_nll``)."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1 token, got {bucket}")
    n_buckets = math.ceil(len(ids) / bucket)
    sums = np.zeros(n_buckets, dtype=np.float64)
    counts = np.zeros(n_buckets, dtype=np.int64)
    scored = (window_nll(model, ids, max_context) if max_context is not None
              else stream_nll(model, ids, prefill_chunk=prefill_chunk))
    for first, nll in scored:
        which = (np.arange(first, first + len(nll)) // bucket).astype(np.int64)
        np.add.at(sums, which, nll.double().numpy())
        np.add.at(counts, which, 1)
    return sums.tolist(), counts.tolist()


# ---------------------------------------------------------------- the run


def _check_lengths(lengths, samples, bucket, max_context=None) -> list[int]:
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths must be token counts >= 2, got {lengths}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be a positive number of tokens, got {bucket!r}")
    if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
        raise ValueError(f"max_context must be a number of tokens >= 2, got {max_context!r}")
    return lengths


def check_position_limit(model, length: int) -> None:
    """A longreach model with ``max_position_embeddings`` set refuses longer inputs: say so
    before spending time on the first segments."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "model_type", "") == "longreach" and limit and length > limit:
        raise ValueError(f"length {length} is past this model's max_position_embeddings={limit}")


def run_ppl(
    model_dir: str | os.PathLike,
    lengths: Sequence[int],
    *,
    bucket: int = 1024,
    samples: int = 1,
    seed: int = 0,
    out_dir: str | os.PathLike = "eval-ppl",
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
    max_context: int | None = None,
) -> dict[str, Any]:
    """Perplexity per ``bucket``-token position bucket of ``samples`` documents per length.

    ``max_context``: the control run. Each position is predicted from at most that many
    previous tokens of the same documents (windows stepped by half of it, each a fresh
    sequence: ``window_nll``); its ratio to the full-context run, bucket by bucket, is what
    the context beyond ``max_context`` adds or costs with the content held fixed.

    ``attention`` switches a Llama / Qwen2 / Mistral folder to a longreach plug-in, as in
    ``run_eval``; ``tokenizer`` (``"byte"`` or a folder) replaces the model folder's own.
    Returns the summary (also written to ``out_dir/summary.json``).
    """
    check_chunk_memory(memory)
    lengths = _check_lengths(lengths, samples, bucket, max_context)
    options: dict[str, Any] = {"bucket": bucket}
    if max_context is not None:  # recorded only when given, so earlier folders still resume
        options["max_context"] = max_context
    model_path, attention, out, config, finished = open_run(
        "ppl", model_dir, out_dir, seed=seed, haystack=haystack, options=options,
        max_new_tokens=None, attention=attention, tokenizer=tokenizer)
    done = {(r["length"], r["index"]) for r in finished}
    todo = [(n, i) for n in lengths for i in range(samples) if (n, i) not in done]

    if todo:
        model, tokenizer = load_model(model_path, device, dtype, attention, tokenizer, memory)
        check_position_limit(model, lengths[-1])
        check_memory(model, max(n for n, _ in todo), next(model.parameters()).device, force)
        # bad haystacks and too-short corpora fail before the first forward pass
        long_document(tokenizer, max(n for n, _ in todo), seed=seed, index=todo[0][1],
                      haystack=haystack)
        with progress_bar(progress, "ppl", sum(n for n, _ in todo)) as (bar, job), \
                result_writer(out) as append:
            for length, index in todo:
                bar.update(job, description=f"ppl length={format_length(length)} doc={index}")
                started = time.perf_counter()
                doc = long_document(tokenizer, length, seed=seed, index=index, haystack=haystack)
                sums, counts = bucket_nll(model, doc.ids, bucket, prefill_chunk=prefill_chunk,
                                          max_context=max_context)
                append({
                    "task": "ppl", "length": length, "index": index, "seed": seed,
                    "bucket": bucket, "max_context": max_context, "nll_sum": sums, "count": counts,
                    "first_document": doc.first_document, "documents": doc.documents,
                    "seconds": round(time.perf_counter() - started, 4),
                    "finished_at": datetime.now(timezone.utc).isoformat(),
                })
                bar.advance(job, length)

    summary = summarize_ppl(out, lengths, samples, bucket, max_context)
    summary.update({
        "command": command or f"run_ppl({str(model_dir)!r}, lengths={lengths}, bucket={bucket}, "
                              f"samples={samples}, seed={seed}, out_dir={str(out_dir)!r})",
        "config": config, "versions": versions(), "evaluated": len(todo),
        "skipped": len(lengths) * samples - len(todo),
    })
    write_ppl_summary(out, summary)
    return summary


def summarize_ppl(out_dir, lengths: Sequence[int], samples: int, bucket: int,
                  max_context: int | None = None) -> dict[str, Any]:
    """Pooled perplexity per (length, bucket) and per length over the recorded documents."""
    wanted = {(n, i) for n in lengths for i in range(samples)}
    by_length: dict[int, dict[int, dict[str, Any]]] = {}
    for r in read_results(out_dir):
        if (r.get("task") == "ppl" and (r["length"], r["index"]) in wanted
                and r["bucket"] == bucket and r.get("max_context") == max_context):
            by_length.setdefault(r["length"], {})[r["index"]] = r
    cells, totals = [], []
    for n in lengths:
        records = list(by_length.get(n, {}).values())
        n_buckets = math.ceil(n / bucket)
        for k in range(n_buckets):
            nll = sum(r["nll_sum"][k] for r in records)
            count = sum(r["count"][k] for r in records)
            cells.append({"length": n, "start": k * bucket, "end": min((k + 1) * bucket, n),
                          "n": len(records), "tokens": count,
                          "nll": nll / count if count else None,
                          "ppl": math.exp(nll / count) if count else None})
        nll = sum(sum(r["nll_sum"]) for r in records)
        count = sum(sum(r["count"]) for r in records)
        totals.append({"length": n, "n": len(records), "tokens": count,
                       "ppl": math.exp(nll / count) if count else None,
                       "documents_per_sample": [r["documents"] for r in records]})
    concatenated = any(d > 1 for t in totals for d in t["documents_per_sample"])
    note = ("each sample concatenates consecutive corpus documents (joined by a blank line) to "
            "reach its length; documents_per_sample says how many" if concatenated else
            "each sample is a single corpus document")
    return {"task": "ppl", "metric": "ppl", "overall": totals[-1]["ppl"], "lengths": list(lengths),
            "samples": samples, "bucket": bucket, "max_context": max_context,
            "cells": cells, "totals": totals,
            "concatenated": concatenated, "note": note}


def write_ppl_summary(out: Path, summary: dict[str, Any]) -> None:
    write_summaries(out, summary, ["length", "start", "end", "n", "tokens", "nll", "ppl"],
                    summary["cells"], notes=[summary["note"]])
    plot_lines(ppl_series(summary), out / PPL_PLOT, xlabel="position (tokens)",
               ylabel="perplexity", title=f"perplexity per {format_length(summary['bucket'])} "
               "bucket" + (f", context cut to {format_length(summary['max_context'])}"
                           if summary.get("max_context") else ""), logx=True)


def ppl_series(summary: dict[str, Any], label: str = "") -> dict[str, list[tuple[float, float]]]:
    """(bucket end, ppl) points per length (one line per length; ``label`` prefixes names)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in summary["cells"]:
        if row["ppl"] is not None:
            name = f"{label} {format_length(row['length'])}".strip() if len(summary["lengths"]) > 1 \
                else (label or format_length(row["length"]))
            series.setdefault(name, []).append((row["end"], row["ppl"]))
    return series


def print_ppl(summary: dict[str, Any]) -> None:
    limit = (f", each token from at most {summary['max_context']} previous tokens"
             if summary.get("max_context") else "")
    print(f"ppl per {summary['bucket']}-token bucket{limit}; evaluated {summary['evaluated']} "
          f"document(s), reused {summary['skipped']}")
    print(f"note: {summary['note']}")
    for row in summary["cells"]:
        value = f"{row['ppl']:.3f}" if row["ppl"] is not None else "-"
        print(f"  length={row['length']:>8}  tokens {row['start']:>8}-{row['end']:<8} "
              f"n={row['n']:<3} ppl {value}")
    for row in summary["totals"]:
        if row["ppl"] is not None:
            print(f"length {row['length']}: ppl {row['ppl']:.3f} over {row['tokens']} tokens "
                  f"(corpus documents per sample: {row['documents_per_sample']})")


__all__ = [
    "LongDocument",
    "bucket_nll",
    "context_windows",
    "long_document",
    "run_ppl",
    "stream_nll",
    "summarize_ppl",
    "window_nll",
]
