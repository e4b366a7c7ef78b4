"""Retrieval on real code: does the chunk that calls a function retrieve the chunk defining it?

For Python source (a corpus of code, e.g. the held-out split of ``longreach corpus
build-pycode``), every function defined once in a text (``def name(``) and called later
(``name(``, ``.name(``) beyond the model's sliding window is a call site. A GCA model runs
once over the text; for each call site this counts whether the chunk holding the definition
line is among the top-k chunks retrieved for the chunk holding the call, and its rank among
the chunks the query could see. Chance is ``top_k / visible chunks``, reported beside it.

    longreach inspect call-sites --model M --corpus data/pycode/heldout.jsonl.gz \
        --max-tokens 16384 --documents 8 --out runs/call-sites
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longreach.data.corpus import iter_documents
from longreach.eval.retrieval import gca_stack, min_tokens, trace_retrieval

_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*\(", re.M)
MIN_NAME = 4  # shorter names (``get``, ``run``) are too often another function's
MAX_CALLS_PER_NAME = 3  # the first calls of each name, so a few hot helpers do not dominate


@dataclass(frozen=True)
class CallSite:
    name: str
    definition: int  # character offset of the ``def`` line's start
    call: int  # character offset of the call's name


def find_call_sites(text: str, max_calls: int = MAX_CALLS_PER_NAME) -> list[CallSite]:
    """Calls, after its definition, of every function ``text`` defines exactly once."""
    defined = Counter(m.group(1) for m in _DEF.finditer(text))
    sites = []
    for m in _DEF.finditer(text):
        name = m.group(1)
        if defined[name] != 1 or len(name) < MIN_NAME or name.startswith("__"):
            continue
        after = m.end()
        found = 0
        for call in re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(name)}\(", text[after:]):
            sites.append(CallSite(name, m.start(), after + call.start()))
            found += 1
            if found == max_calls:
                break
    return sorted(sites, key=lambda s: s.call)


def _token_index(starts: np.ndarray, ends: np.ndarray, char: int) -> int:
    """The token whose span ``[starts, ends)`` holds character ``char`` (the first one
    starting after it if none does)."""
    hit = np.flatnonzero((starts <= char) & (char < ends))
    if len(hit):
        return int(hit[0])
    return int(np.searchsorted(starts, char))


def call_site_retrieval(model, tokenizer, texts: list[str], *, max_tokens: int = 16384,
                        min_distance: int = 512, group: int = 0) -> dict:
    """Per call site and pooled: is the defining chunk retrieved for the calling chunk?

    Each text is cut to its first ``max_tokens`` tokens; call sites closer than
    ``min_distance`` tokens to their definition (inside a sliding window) are left out.
    """
    stack = gca_stack(model)
    records = []
    for doc, text in enumerate(texts):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
        if len(ids) < min_tokens(stack):
            continue
        sites = find_call_sites(text[: offsets[-1][1]])
        if not sites:
            continue
        starts, ends = np.array(offsets).T
        trace = trace_retrieval(model, ids)
        for site in sites:
            t_def = _token_index(starts, ends, site.definition)
            t_call = _token_index(starts, ends, site.call)
            if t_call >= len(ids) or t_call - t_def < min_distance:
                continue
            query, target = trace.chunk_of_token(t_call), trace.chunk_of_token(t_def)
            if target >= query - 1:  # the chunk right before is never retrieved (the window's)
                continue
            got = [j for j, _ in trace.retrieved(query, group)]
            visible = int(np.isfinite(trace.scores[group, query].numpy()).sum()) \
                if trace.scores is not None else None
            records.append({"document": doc, "name": site.name, "call_token": t_call,
                            "definition_token": t_def, "query_chunk": query,
                            "definition_chunk": target, "retrieved": got,
                            "in_topk": target in got, "first": bool(got) and got[0] == target,
                            "rank": trace.rank(query, target, group), "visible": visible})
    n = len(records)
    chance = [min(1.0, stack.settings["top_k"] / r["visible"]) for r in records if r["visible"]]
    ranks = [r["rank"] for r in records if r["rank"] is not None]
    return {
        "call_sites": n,
        "documents": len({r["document"] for r in records}),
        "in_topk": sum(r["in_topk"] for r in records) / n if n else None,
        "first": sum(r["first"] for r in records) / n if n else None,
        "chance_in_topk": float(np.mean(chance)) if chance else None,
        "median_rank": float(np.median(ranks)) if ranks else None,
        "median_visible": float(np.median([r["visible"] for r in records if r["visible"]]))
        if chance else None,
        "top_k": stack.settings["top_k"], "max_tokens": max_tokens, "min_distance": min_distance,
        "records": records,
    }


def read_code_documents(source: str | os.PathLike, documents: int) -> list[str]:
    """The first ``documents`` documents of a corpus source (any ``iter_documents`` source)."""
    if documents < 1:
        raise ValueError(f"documents must be >= 1, got {documents}")
    texts = []
    for text in iter_documents(str(source)):
        if _DEF.search(text):
            texts.append(text)
        if len(texts) == documents:
            break
    if not texts:
        raise ValueError(f"{source} has no Python function definitions (def name(...)) to "
                         "measure call sites on")
    return texts


def write_call_sites(result: dict, out_dir: str | os.PathLike, source: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "call_sites.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**source, **result}, indent=1) + "\n")
    os.replace(tmp, path)
    return path
