"""Does the retriever find the needle far beyond the training length, on prompts it never saw?

For passkey prompts (any split and haystack), the chunk that answers the question retrieves
its top-k; this counts how often a chunk holding the key is ranked first and is in the top-k,
and the needle chunk's rank among all visible chunks. It measures retrieval alone, whether or
not the model then copies the key.

    python benchmarks/gca_retrieval/needle_rank.py --model DIR --lengths 512,4k,32k \
        --samples 10 --split heldout --haystack heldout [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from longreach.eval.command import parse_lengths
from longreach.eval.retrieval import trace_retrieval
from longreach.eval.runner import load_model
from longreach.eval.tasks import make_sample
from longreach.train.probe import key_token_positions


def needle_rank(model, tokenizer, length, samples, split, haystack, seed=0):
    firsts, in_topk, ranks = [], [], []
    for i in range(samples):
        depth = float(np.linspace(0.05, 0.95, samples)[i]) if samples > 1 else 0.5
        sample = make_sample("passkey", tokenizer, length, depth, seed=seed, index=i,
                             haystack=haystack, split=split)
        prompt = sample.prompt + " "  # the model writes the key's first character next
        ids, positions = key_token_positions(tokenizer, prompt, sample.answer,
                                             sample.metadata["needle_text"])
        trace = trace_retrieval(model, ids)
        query = trace.chunk_of_token(len(ids) - 1)
        needles = {trace.chunk_of_token(p) for p in positions}
        if not any(n <= query - 2 for n in needles):
            continue  # the window covers the needle: nothing to retrieve
        picked = trace.retrieved(query)
        best = max(picked, key=lambda jw: jw[1])[0] if picked else None
        firsts.append(best in needles)
        in_topk.append(any(j in needles for j, _ in picked))
        ranks.append(min(r for r in (trace.rank(query, n) for n in needles) if r is not None))
    n = len(firsts)
    return {"length": length, "n": n, "needle_first": sum(firsts) / n, "needle_in_topk":
            sum(in_topk) / n, "median_rank": float(np.median(ranks)), "max_rank": int(max(ranks))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lengths", default="512,4k,32k")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--haystack", default="heldout")
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "cpu")
    rows = [needle_rank(model, tokenizer, n, args.samples, args.split, args.haystack)
            for n in parse_lengths(args.lengths)]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "split": args.split, "haystack": args.haystack,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
