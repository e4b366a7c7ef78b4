"""Collect docs/cca.md's comparison into one JSON and one figure.

    python benchmarks/cca_pretrained/report.py WORK [WORK...] --out benchmarks/results/cca_llama_small_h200.json \
        --png docs/cca-llama-small.png

WORK folders hold what pretrain_h200.sh and compare_h200.sh wrote (llama-small/metrics.jsonl,
ft-*/metrics.jsonl, eval/<model>-<task>/summary.json, plugin_decode.json); a model found in
several WORK folders is taken from the last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longreach.eval.plots import save_figure
from longreach.runtime import write_atomic


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training(path: Path) -> dict:
    logged = rows(path)
    steps = [r for r in logged if "tokens_per_s" in r]
    evals = [r for r in logged if "eval_loss" in r]
    last = steps[-1]
    return {"steps": last["step"], "tokens": last.get("tokens"), "tokens_per_s": round(last["tokens_per_s"]),
            "train_seconds": round(last.get("elapsed", 0.0), 1),
            "eval_loss": [(r["step"], round(r["eval_loss"], 4)) for r in evals]}


def ppl(summary: dict) -> dict:
    return {"by_length": {t["length"]: round(t["ppl"], 4) for t in summary["totals"]},
            "buckets_at_longest": [round(c["ppl"], 4) for c in summary["cells"]
                                   if c["length"] == max(t["length"] for t in summary["totals"])],
            "bucket": summary["bucket"], "samples": summary["samples"]}


def passkey(summary: dict) -> dict:
    by, contains = {}, {}
    for c in summary["cells"]:
        by.setdefault(str(c["length"]), {})[str(c["depth"])] = round(c["exact_match"], 4)
        contains.setdefault(c["length"], []).append(c["contains"] * c["n"])
    n = summary["cells"][0]["n"]
    return {"exact_match": round(summary["overall"], 4), "exact_match_cells": by,
            "contains_by_length": {k: round(sum(v) / (n * len(v)), 4) for k, v in contains.items()},
            "n_per_cell": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    result = {"pretrain": None, "finetunes": {}, "evals": {}, "decode": None}
    for work in map(Path, args.work):
        if (work / "llama-small" / "metrics.jsonl").is_file():
            result["pretrain"] = training(work / "llama-small" / "metrics.jsonl")
        for run in sorted(work.glob("ft*/metrics.jsonl")):
            result["finetunes"][run.parent.name] = training(run)
        for summary in sorted(work.glob("eval/*/summary.json")):
            s = json.loads(summary.read_text())
            name = summary.parent.name
            result["evals"][name] = ppl(s) if s["task"] == "ppl" else passkey(s)
        if (work / "plugin_decode.json").is_file():
            result["decode"] = json.loads((work / "plugin_decode.json").read_text())
    write_atomic(args.out, json.dumps(result, indent=1))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"full": "k", "cca-w1024": "tab:blue", "cca-w256": "tab:cyan",
              "streaming-w1024": "tab:orange", "lm-infinite-w1024": "tab:red"}
    for method, color in styles.items():
        for prefix, line in (("zs-", ":"), ("ft-", "-")):
            e = result["evals"].get(f"{prefix}{method}-ppl")
            if e is None:
                continue
            buckets = e["buckets_at_longest"]
            tuned = result["finetunes"].get(f"ft-{method}")
            steps = tuned["eval_loss"][-1][0] if tuned else "?"  # the last step it saved
            x = [(i + 0.5) * e["bucket"] / 1024 for i in range(len(buckets))]
            ax.plot(x, buckets, line, color=color, marker="o" if prefix == "ft-" else None,
                    ms=3, label=f"{method} ({f'fine-tuned {steps} steps' if prefix == 'ft-' else 'plug-in only'})")
    ax.set_xlabel("position in the held-out document (K tokens)")
    ax.set_ylabel("perplexity of the 1K bucket")
    ax.set_title("llama-small (29M, trained at 8K): full attention vs plug-ins, held-out packages")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, args.png)


if __name__ == "__main__":
    main()
