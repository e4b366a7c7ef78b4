"""Tables and plots of docs/results.md from the folders the gca-small runs wrote.

    python benchmarks/gca_small/report.py --runs RUNS --evals EVALS \
        --json benchmarks/results/gca_small_h200.json --plots docs

RUNS holds one training folder per run (``metrics.jsonl``, ``config.yaml``), named as in
``RUN_NAMES`` below; EVALS holds the ``longreach eval`` output folders (``results.jsonl``).
Perplexity by position is pooled over the recorded documents in doubling buckets
([0, 1K), [1K, 2K), [2K, 4K), ...) from the evals' 1K-token buckets; both models read the
same documents (same seed, same held-out corpus).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

# training folder (under RUNS) -> row name
RUN_NAMES = {
    "o/gca-small": "gca-small, stage 1",
    "o/swa-small": "swa-small, stage 1",
    "s2/gca-small": "gca-small, stage 2",
    "s3/gca-small": "gca-small, passkey fine-tune",
}
PPL_EVALS = {"s1-ppl-gca": "gca-small, stage 1", "s1-ppl-swa": "swa-small, stage 1",
             "s2-ppl-gca": "gca-small, stage 2"}
PASSKEY_EVALS = {"s1-pk-gca": "gca-small, stage 1", "s1-pk-swa": "swa-small, stage 1",
                 "s2-pk-gca": "gca-small, stage 2", "ft-pk-gca": "gca-small, passkey fine-tune"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_summary(folder: Path) -> dict:
    rows = read_jsonl(folder / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    probes = [r for r in rows if "probe/needle_in_topk" in r]
    last = train[-1]
    return {
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_seconds": round(last["elapsed"], 1),
        "tokens_per_s": round(last["tokens"] / last["elapsed"]),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_loss": [[r["step"], r["eval_loss"]] for r in evals],
        "loss": [[r["step"], r["loss"]] for r in train],
        "probe": [{"step": r["step"], **{k[len("probe/"):]: r[k] for k in r if k.startswith("probe/")}}
                  for r in probes],
    }


def doubling_buckets(n_tokens: int, base: int) -> list[tuple[int, int]]:
    edges = [0, base]
    while edges[-1] < n_tokens:
        edges.append(min(edges[-1] * 2, n_tokens))
    return list(zip(edges[:-1], edges[1:]))


def ppl_by_position(folder: Path) -> dict:
    rows = [r for r in read_jsonl(folder / "results.jsonl") if r.get("task") == "ppl"]
    length, bucket = rows[0]["length"], rows[0]["bucket"]
    nll = np.sum([r["nll_sum"] for r in rows], axis=0)
    count = np.sum([r["count"] for r in rows], axis=0)
    out = []
    for start, end in doubling_buckets(length, bucket):
        a, b = start // bucket, math.ceil(end / bucket)
        out.append({"start": start, "end": end,
                    "ppl": float(math.exp(nll[a:b].sum() / count[a:b].sum())),
                    "tokens": int(count[a:b].sum())})
    return {"length": length, "documents": len(rows), "buckets": out,
            "ppl": float(math.exp(nll.sum() / count.sum())),
            "first_documents": [r["first_document"] for r in rows]}


def passkey_summary(folder: Path) -> dict:
    cells: dict[int, list[float]] = defaultdict(list)
    by_depth: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in read_jsonl(folder / "results.jsonl"):
        cells[r["length"]].append(r["score"])
        by_depth[(r["length"], r["depth"])].append(r["score"])
    return {
        str(length): {"exact": sum(s), "n": len(s),
                      "by_depth": {str(d): [sum(v), len(v)] for (n, d), v in sorted(by_depth.items())
                                   if n == length}}
        for length, s in sorted(cells.items())
    }


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in report["training"].items():
        if "stage 1" in name:
            steps, loss = zip(*run["eval_loss"])
            axes[0].plot(steps, loss, marker="o", label=name)
    axes[0].set(xlabel="step (16 x 4,096 tokens)", ylabel="held-out loss (val split)",
                title="Stage 1, trained side by side")
    axes[0].legend()
    for name, ppl in report["ppl"].items():
        if ppl["length"] < 1 << 20:
            continue
        mids = [math.sqrt(max(b["start"], 1) * b["end"]) for b in ppl["buckets"]]
        axes[1].plot(mids, [b["ppl"] for b in ppl["buckets"]], marker="o", label=name)
    axes[1].set(xscale="log", xlabel="position (tokens, doubling buckets)", ylabel="perplexity",
                title="Held-out packages, 2 documents of 1M tokens")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "gca-small.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--evals", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plots", type=Path)
    args = parser.parse_args()
    report = {
        "training": {name: training_summary(args.runs / folder)
                     for folder, name in RUN_NAMES.items() if (args.runs / folder).is_dir()},
        "ppl": {name: ppl_by_position(args.evals / folder)
                for folder, name in PPL_EVALS.items() if (args.evals / folder).is_dir()},
        "passkey_heldout": {name: passkey_summary(args.evals / folder)
                            for folder, name in PASSKEY_EVALS.items()
                            if (args.evals / folder).is_dir()},
    }
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plots:
        plot(report, args.plots)
    for name, ppl in report["ppl"].items():
        print(name, f"{ppl['ppl']:.3f}", " ".join(
            f"{b['start']}-{b['end']}:{b['ppl']:.2f}" for b in ppl["buckets"]))
    for name, pk in report["passkey_heldout"].items():
        print(name, {n: f"{c['exact']:g}/{c['n']}" for n, c in pk.items()})


if __name__ == "__main__":
    main()
