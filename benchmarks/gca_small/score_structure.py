"""How much of a GCA model's retrieval depends on the query? (docs/results.md, "Why")

    python benchmarks/gca_small/score_structure.py --model M --text FILE [--tokens 4096]

Runs the model once over the first ``--tokens`` tokens of FILE and prints:
- the landmarks' mean pairwise cosine (1: every chunk's landmark points the same way);
- the query-dependent share of the score variance within a query: the score matrix of the
  last queries against the memory chunks every one of them can see, split two-way into a
  per-chunk effect (what all queries see alike: salience) and the query x chunk
  interaction; the share is interaction / (interaction + chunk effect);
- the scores' mean standard deviation within a query (near 0: uniform fusion weights).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from longreach.eval.retrieval import trace_retrieval
from longreach.eval.runner import load_model
from longreach.models.gca.retrieval import mean_pairwise_cosine


def score_structure(model, ids: list[int]) -> dict:
    cache = model.model.new_cache("cpu")
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    memory = cache.memory.memory
    landmarks = memory.landmarks[:, : memory.n_chunks]
    scores = trace_retrieval(model, ids).scores[0].numpy()  # [query chunks, memory chunks]
    n = scores.shape[0]
    q0, m1 = int(n * 0.625), int(n * 0.6)  # queries 40-63 vs memory 0-37 at 64 chunks
    block = scores[q0:, :m1]
    block = block[np.isfinite(block).all(axis=1)]
    grand = block.mean()
    col, row = block.mean(axis=0, keepdims=True), block.mean(axis=1, keepdims=True)
    interaction = float(((block - col - row + grand) ** 2).sum())
    chunk_effect = float(((col - grand) ** 2).sum() * block.shape[0])
    return {"tokens": len(ids), "chunks": int(memory.n_chunks),
            "landmark_cosine": mean_pairwise_cosine(landmarks),
            "query_dependent_share": interaction / (interaction + chunk_effect),
            "score_std_within_query": float(block.std(axis=1).mean()),
            "block": [int(block.shape[0]), int(block.shape[1])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"][: args.tokens]
    print(json.dumps({"model": args.model, **score_structure(model, ids)}))


if __name__ == "__main__":
    main()
