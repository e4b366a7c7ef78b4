"""Seeing what a GCA model retrieves: which earlier chunks each chunk of a text reads, with
which fusion weights.

``trace_retrieval(model, input_ids)`` runs one forward over the whole text (the chunk memory on
the compute device, as in training) and returns a ``RetrievalTrace``: for every query chunk c
(the chunk whose tokens are served), the top-k memory chunks it read, their fusion weights and
the scores of every chunk it could see. ``retrieval_table`` turns it into rows of text
snippets, ``plot_retrieval`` into a heatmap (query chunk x memory chunk, colour = fusion
weight). ``longreach inspect retrieval`` is the command line for all three.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from longreach.models.gca.retrieval import GCAStack, find_gca_stack, record_retrieval
from longreach.runtime import write_atomic

SNIPPET_CHARS = 40


def gca_stack(model: nn.Module, name: str | None = None) -> GCAStack:
    """The ``GCAStack`` of a GCA model; a ValueError naming the model if it has none."""
    stack = find_gca_stack(model)
    if stack is not None:
        return stack
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    raise ValueError(
        f"{name or type(model).__name__} is not a GCA model (model_type {model_type!r}); "
        "retrieval inspection needs gca layers"
    )


@dataclass
class RetrievalTrace:
    """What every query chunk of one sequence retrieved, per retrieval group.

    Chunks are numbered in the model's stream (with ``landmark: token`` a chunk holds
    ``chunk_size - 1`` text tokens and its landmark). Row c of ``indices`` / ``weights``
    ``[groups, n_chunks, top_k]`` is what served the tokens of chunk c: memory chunk numbers
    (-1 = empty slot, always for chunks 0 and 1) in top-k order and their fusion weights.
    ``scores`` ``[groups, n_chunks, n_memory]`` holds the score of every memory chunk for each
    query chunk (-inf where it is not visible), or is None.
    """

    n_tokens: int
    chunk_size: int
    text_per_chunk: int
    landmark: str
    top_k: int
    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor | None

    @property
    def n_chunks(self) -> int:
        return self.indices.shape[1]

    @property
    def n_groups(self) -> int:
        return self.indices.shape[0]

    def chunk_of_token(self, n: int) -> int:
        """The chunk holding text token ``n``."""
        return n // self.text_per_chunk

    def token_span(self, chunk: int) -> tuple[int, int]:
        """Text tokens ``[start, end)`` of ``chunk``."""
        start = chunk * self.text_per_chunk
        return start, min(start + self.text_per_chunk, self.n_tokens)

    def retrieved(self, chunk: int, group: int = 0) -> list[tuple[int, float]]:
        """(memory chunk, fusion weight) pairs that served ``chunk``, highest score first."""
        return [(int(j), float(w)) for j, w in zip(self.indices[group, chunk], self.weights[group, chunk])
                if j >= 0]

    def rank(self, chunk: int, memory_chunk: int, group: int = 0) -> int | None:
        """1-based rank of ``memory_chunk`` by score among the chunks ``chunk``'s query could
        see (None: not visible, or no scores recorded)."""
        if self.scores is None or memory_chunk >= self.scores.shape[2]:
            return None
        row = self.scores[group, chunk]
        score = row[memory_chunk]
        if not torch.isfinite(score):
            return None
        return int((row > score).sum()) + 1

    def weight_matrix(self, group: int = 0) -> torch.Tensor:
        """``[n_chunks, n_chunks]`` fusion weight of memory chunk j (column) for query chunk i
        (row); 0 where not retrieved."""
        grid = torch.zeros(self.n_chunks, self.n_chunks)
        idx, w = self.indices[group], self.weights[group]
        valid = idx >= 0
        rows = torch.arange(self.n_chunks)[:, None].expand_as(idx)
        grid[rows[valid], idx[valid]] = w[valid]
        return grid

    def to_dict(self) -> dict:
        """JSON-ready: the settings and, per group, what each chunk retrieved."""
        groups = []
        for g in range(self.n_groups):
            chunks = []
            for c in range(self.n_chunks):
                got = self.retrieved(c, g)
                chunks.append({"chunk": c, "tokens": list(self.token_span(c)),
                               "retrieved": [j for j, _ in got],
                               "weights": [round(w, 6) for _, w in got]})
            groups.append({"group": g, "chunks": chunks})
        return {"n_tokens": self.n_tokens, "chunk_size": self.chunk_size,
                "text_per_chunk": self.text_per_chunk, "landmark": self.landmark,
                "top_k": self.top_k, "n_chunks": self.n_chunks, "groups": groups}


def min_tokens(stack: GCAStack) -> int:
    """The fewest text tokens for which some chunk retrieves: more than two chunks' worth."""
    return 2 * stack.text_per_chunk + 1


@torch.no_grad()
def trace_retrieval(model: nn.Module, input_ids, *, scores: bool = True) -> RetrievalTrace:
    """Run ``model`` once (eval mode, no gradients) over ``input_ids`` (one sequence: ``[T]``
    or ``[1, T]``) and return what each chunk retrieved. ``scores=False`` skips the score
    matrix (n_chunks^2 floats per group)."""
    stack = gca_stack(model)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"trace_retrieval takes one sequence ([T] or [1, T]), got {tuple(ids.shape)}")
    T = ids.shape[1]
    if T < min_tokens(stack):
        raise ValueError(
            f"the text has {T} tokens; retrieval needs at least {min_tokens(stack)} (more than "
            f"two chunks of {stack.text_per_chunk} tokens) before any chunk can retrieve"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with record_retrieval(model, scores=scores) as records:
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        model.train(was_training)
    n_chunks = stack.chunk_answering(T - 1) + 1
    n_groups, k = len(stack.group_starts), stack.settings["top_k"]
    indices = torch.full((n_groups, n_chunks, k), -1, dtype=torch.long)
    weights = torch.zeros(n_groups, n_chunks, k)
    n_memory = max((r.scores.shape[2] for r in records if r.scores is not None), default=0)
    score_grid = torch.full((n_groups, n_chunks, n_memory), float("-inf")) if scores else None
    for r in records:
        rows = slice(r.c_lo, r.c_lo + r.indices.shape[1])
        width = r.indices.shape[2]
        indices[r.group, rows, :width] = r.indices[0]
        weights[r.group, rows, :width] = r.weights[0]
        if score_grid is not None and r.scores is not None:
            score_grid[r.group, rows, : r.scores.shape[2]] = r.scores[0]
    return RetrievalTrace(T, stack.chunk_size, stack.text_per_chunk, stack.settings["landmark"], k,
                          indices, weights, score_grid)


def snippet(tokenizer, ids, width: int = SNIPPET_CHARS) -> str:
    """Decoded tokens on one line (newlines and tabs shown as \\n, \\t), cut to ``width``."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def shown_chunks(trace: RetrievalTrace, rows: int | None, group: int = 0) -> list[int]:
    """The query chunks that retrieved something; at most ``rows`` of them, evenly spaced and
    always including the last."""
    chunks = [c for c in range(trace.n_chunks) if trace.retrieved(c, group)]
    if rows is None or len(chunks) <= rows:
        return chunks
    if rows <= 1:
        return chunks[-1:]
    step = (len(chunks) - 1) / (rows - 1)
    return sorted({chunks[round(i * step)] for i in range(rows)})


def retrieval_table(trace: RetrievalTrace, tokenizer, ids, *, group: int = 0,
                    rows: int | None = None, width: int = SNIPPET_CHARS) -> list[dict]:
    """One row per query chunk that retrieved something (at most ``rows``, evenly spaced):
    ``{"chunk", "tokens", "text", "retrieved": [{"chunk", "weight", "rank", "text"}]}``;
    ``rank`` is the chunk's place by score among those the query could see."""
    ids = torch.as_tensor(ids).reshape(-1).tolist()
    table = []
    for c in shown_chunks(trace, rows, group):
        start, end = trace.token_span(c)
        got = [{"chunk": j, "weight": w, "rank": trace.rank(c, j, group),
                "text": snippet(tokenizer, ids[slice(*trace.token_span(j))], width)}
               for j, w in trace.retrieved(c, group)]
        table.append({"chunk": c, "tokens": [start, end],
                      "text": snippet(tokenizer, ids[start:end], width), "retrieved": got})
    return table


def plot_retrieval(trace: RetrievalTrace, path: str | os.PathLike, *, group: int = 0,
                   title: str = "") -> Path:
    """A PNG heatmap: query chunk (rows) x memory chunk (columns), colour = fusion weight;
    the chunks a query cannot see (itself, the one before it and later ones) are grey."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from longreach.eval.plots import save_figure

    grid = trace.weight_matrix(group).numpy()
    n = trace.n_chunks
    hidden = np.arange(n)[None, :] > np.arange(n)[:, None] - 2
    shown = np.ma.masked_array(grid, mask=hidden)
    size = min(12.0, 3.0 + 0.06 * n)
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#d9d9d9")
    image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                      interpolation="nearest", origin="upper")
    ax.set_xlabel("memory chunk (retrieved)")
    ax.set_ylabel("query chunk (served)")
    fig.colorbar(image, ax=ax, label="fusion weight")
    ax.set_title(title or f"GCA retrieval, group {group}: {trace.n_tokens:,} tokens, "
                 f"chunks of {trace.chunk_size}, top-{trace.top_k}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def read_text_tokens(path: str | os.PathLike, tokenizer, stack: GCAStack,
                     max_tokens: int | None = None) -> list[int]:
    """The tokens of a UTF-8 text file (the first ``max_tokens``), as ``longreach eval`` feeds
    prompts (special tokens such as BOS included). ValueError / FileNotFoundError naming the
    problem: missing, empty, not text, too short for any chunk to retrieve."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: there is no text to inspect")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    need = min_tokens(stack)
    if len(ids) < need:
        raise ValueError(
            f"{path} has {len(ids)} tokens; retrieval needs at least {need} (more than two "
            f"chunks of {stack.text_per_chunk} tokens) before any chunk can retrieve"
        )
    return ids


def write_retrieval(trace: RetrievalTrace, table: list[dict], out_dir: str | os.PathLike, *,
                    source: dict | None = None, group: int = 0) -> tuple[Path, Path]:
    """Write ``retrieval.png`` (the heatmap of ``group``) and ``retrieval.json`` (the trace,
    every chunk of the table, and ``source``: what was inspected) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_retrieval(trace, out / "retrieval.png", group=group)
    record = {**(source or {}), **trace.to_dict(), "table_group": group, "table": table}
    js = write_atomic(out / "retrieval.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return png, js
