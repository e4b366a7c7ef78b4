"""One table over several runs of study_gpu.sh (seeds, budgets): for each run its base and
the base's pre-training tokens, then the perplexity over the cut-context control's of the base
and of each post-trained model, by range of the training length:
    python benchmarks/recurrent/compare.py WORK [WORK ...] --out RESULT.json [--range 16-64x]
A run folder without a post-trained model gives its base's row only; a folder that is not a
study run is an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import summarize  # noqa: E402  (this folder's summarize.py)

MODELS = ("base", *summarize.KINDS)


def run_row(work: Path) -> dict:
    if not (work / "pretrain").is_dir():
        sys.exit(f"{work} has no pretrain/ folder: not a study_gpu.sh WORK folder")
    log = work / "study.log"
    found = re.findall(r"base for post-training: (\S+)", log.read_text()) if log.is_file() else []
    if not found:
        sys.exit(f"{work}: study.log names no base (the run stopped before choosing one)")
    base = found[-1]
    run = work / "pretrain" / base
    train = summarize.training_row(run) or {}
    config = summarize.run_config(run)
    n = int(config["data"]["seq_len"])
    evals = work / "evals"
    ratios = {}
    for model in MODELS:
        full = summarize.read_json(evals / model / "ppl" / "summary.json")
        control = summarize.read_json(evals / model / "ppl-control" / "summary.json")
        if full is None and model == "base":  # stopped before the final evaluations
            full = summarize.read_json(evals / f"base-{base}-ppl" / "summary.json")
            control = summarize.read_json(evals / f"base-{base}-ppl-control" / "summary.json")
        row = summarize.ppl_row(full, control, n)
        if row:
            ratios[model] = {name: cell["x_control"] for name, cell in row.items()}
    return {"work": str(work), "base": base, "train_len": n, "tokens": train.get("tokens"),
            "seed": config.get("seed", 0), "ratios": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("works", nargs="+", metavar="WORK")
    p.add_argument("--out", required=True)
    p.add_argument("--range", default="16-64x", dest="span",
                   help="the range of the training length in the table (e.g. 4-16x)")
    args = p.parse_args(argv)
    rows = [run_row(Path(w)) for w in args.works]
    print(f"perplexity / cut-context control's at {args.span} of the training length\n")
    print("| run | base | seed | pre-training tokens | " + " | ".join(MODELS) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(MODELS))
    for r in rows:
        cells = [summarize.fmt(r["ratios"].get(m, {}).get(args.span), 3) for m in MODELS]
        tokens = f"{r['tokens'] / 1e6:.1f}M" if r["tokens"] else "-"
        print(f"| {Path(r['work']).name} | `{r['base']}` | {r['seed']} | {tokens} | "
              + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps({"range": args.span, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
