"""Per-run table of a folder of tiny GCA runs (sweep_h200.sh's output): the final retrieval
probe (needle chunk ranked first / in the top-k, its fusion weight, teacher-forced accuracy of
the answer's first token), the first step the needle was ranked first on >= 90% of the probe
prompts, held-out loss and wall time; and, where the run folder has one (sweep2_h200.sh),
the exact match of its held-out passkey eval per length (``eval-heldout/summary.json``).

    python benchmarks/gca_retrieval/summarize.py OUT [--json FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LEARNED = 0.9  # needle chunk ranked first on >= 90% of probe prompts


def run_row(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe/needle_first" in r]
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    match = re.fullmatch(r"(.+)-seed(\d+)", run_dir.name)
    row = {"run": run_dir.name, "setting": match.group(1) if match else run_dir.name,
           "seed": int(match.group(2)) if match else None,
           "step": losses[-1]["step"] if losses else None,
           "tokens": losses[-1]["tokens"] if losses else None,
           "wall_s": round(losses[-1]["elapsed"]) if losses else None,
           "eval_loss": evals[-1]["eval_loss"] if evals else None}
    if probes:
        last = probes[-1]
        row.update({key.split("/")[1]: last[key] for key in
                    ("probe/needle_first", "probe/needle_in_topk", "probe/needle_weight",
                     "probe/answer_acc")})
        row["learned"] = last["probe/needle_first"] >= LEARNED
        row["learned_at_step"] = next(
            (r["step"] for r in probes if r["probe/needle_first"] >= LEARNED), None)
    summary = run_dir / "eval-heldout" / "summary.json"
    if summary.is_file():
        row["heldout_exact"] = heldout_exact(json.loads(summary.read_text()))
    return row


def heldout_exact(summary: dict) -> dict[str, float]:
    """Exact match per prompt length (all depths pooled) of an eval summary."""
    by_length: dict[int, list[tuple[int, float]]] = {}
    for cell in summary["cells"]:
        by_length.setdefault(cell["length"], []).append((cell["n"], cell["exact_match"]))
    return {str(length): sum(n * v for n, v in cells) / sum(n for n, _ in cells)
            for length, cells in sorted(by_length.items())}


def _loss(row: dict) -> str:
    return "-" if row["eval_loss"] is None else f"{row['eval_loss']:.3f}"


def _exact(row: dict, lengths: list[str]) -> str:
    exact = row.get("heldout_exact", {})
    return "".join(f" {exact[k]:.0%} |" if k in exact else " - |" for k in lengths)


def markdown(rows: list[dict]) -> str:
    lengths = sorted({k for r in rows for k in r.get("heldout_exact", {})}, key=int)
    head = ("| run | needle first | in top-k | needle weight | first-token acc | learned at step "
            "| held-out loss |" + "".join(f" held-out exact @{k} |" for k in lengths) + "\n"
            + "|---" * (7 + len(lengths)) + "|\n")
    lines = []
    for r in rows:
        if "needle_first" not in r:
            lines.append(f"| {r['run']} | - | - | - | - | - | {_loss(r)} |"
                         + _exact(r, lengths))
            continue
        lines.append(f"| {r['run']} | {r['needle_first']:.2f} | {r['needle_in_topk']:.2f} | "
                     f"{r['needle_weight']:.2f} | {r['answer_acc']:.2f} | "
                     f"{r['learned_at_step'] or 'not learned'} | {_loss(r)} |"
                     + _exact(r, lengths))
    settings: dict[str, list[dict]] = {}
    for r in rows:
        if "needle_first" in r:
            settings.setdefault(r["setting"], []).append(r)
    summary = ["", "| setting | runs | retriever learned (needle first >= 0.9) | "
               "first-token acc >= 0.7 | held-out exact >= 95% at every length |",
               "|---|---|---|---|---|"]
    for name, group in settings.items():
        evaluated = [g for g in group if g.get("heldout_exact")]
        passed = sum(min(g["heldout_exact"].values()) >= 0.95 for g in evaluated)
        summary.append(f"| {name} | {len(group)} | {sum(g['learned'] for g in group)} | "
                       f"{sum(g['answer_acc'] >= 0.7 for g in group)} | "
                       + (f"{passed} of {len(evaluated)} |" if evaluated else "- |"))
    return head + "\n".join(lines) + "\n" + "\n".join(summary) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args()
    rows = [run_row(d) for d in sorted(Path(args.out).iterdir()) if (d / "metrics.jsonl").is_file()]
    text = markdown(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
