"""Tables of one run of study_gpu.sh, from its WORK folder (or its results.tar.xz unpacked):
    python benchmarks/recurrent/summarize.py WORK --out RESULT.json [--gpu NAME --commit REV
        --command "..."]
prints markdown tables (pre-training, perplexity by range of the training length with the
control's ratio, passkey, EffRem) and writes every summary they come from to RESULT.json.

Perplexity of a range is exp(mean NLL) over its 128-token buckets; "x control" is the
full-context perplexity over the control's on the same tokens (each predicted from at most the
training length of context, `eval ppl --max-context`): above 1, the context beyond the
training length costs; below 1, it helps.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import yaml

KINDS = ("zero", "random_noise", "fitted_noise", "state_passing", "tbtt")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_config(run: Path) -> dict:
    """The saved config.yaml of a training run."""
    return yaml.safe_load((run / "config.yaml").read_text())


def train_length(run: Path) -> int:
    """The training length of a training run: data.seq_len of its saved config."""
    return int(run_config(run)["data"]["seq_len"])


def training_row(run: Path) -> dict | None:
    rows = []
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    except OSError:
        return None
    steps = [r for r in rows if "loss" in r and "tokens" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not steps:
        return None
    last = steps[-1]
    return {"steps": last["step"], "tokens": last["tokens"], "seconds": round(last["elapsed"], 1),
            "tokens_per_s": round(last["tokens_per_s"]),
            "eval_loss": evals[-1]["eval_loss"] if evals else None}


def ranges(train_len: int, length: int, bucket: int = 128) -> list[tuple[str, int, int]]:
    out = [("last bucket in length", max(train_len - bucket, 0), train_len)]
    edges = [1, 4, 16, 64, 256]
    for lo, hi in zip(edges, edges[1:]):
        if lo * train_len < length:
            out.append((f"{lo}-{hi}x", lo * train_len, min(hi * train_len, length)))
    return out


def range_nll(summary: dict, start: int, end: int) -> float | None:
    cells = [c for c in summary["cells"] if c["start"] >= start and c["end"] <= end
             and c["nll"] is not None]
    if not cells:
        return None
    return sum(c["nll"] * c["tokens"] for c in cells) / sum(c["tokens"] for c in cells)


def ppl_row(full: dict | None, control: dict | None, train_len: int) -> dict:
    if full is None:
        return {}
    row = {}
    for name, start, end in ranges(train_len, full["lengths"][-1], full["bucket"]):
        nll = range_nll(full, start, end)
        cut = range_nll(control, start, end) if control else None
        row[name] = {"ppl": math.exp(nll) if nll is not None else None,
                     "x_control": math.exp(nll - cut) if nll is not None and cut is not None
                     else None}
    return row


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ppl_table(rows: dict[str, dict]) -> list[str]:
    names = list(dict.fromkeys(n for row in rows.values() for n in row))  # every row's ranges
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for model, row in rows.items():
        cells = [f"{fmt(row[n]['ppl'])} ({fmt(row[n]['x_control'], 3)}x)" if n in row else "-"
                 for n in names]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def passkey_table(evals: Path, models: list[str]) -> list[str]:
    lines = []
    for split, folder in (("held-out", "passkey"), ("training", "passkey-train")):
        for model in models:
            s = read_json(evals / model / folder / "summary.json")
            if not s:
                continue
            if not lines:
                lengths = s["lengths"]
                lines = ["| phrasings | model | " + " | ".join(f"{n:,}" for n in lengths) + " |",
                         "|---|---|" + "---:|" * len(lengths)]
            cells = []
            for n in s["lengths"]:  # exact match over the depths, weighted by prompts
                rows = [c for c in s["cells"] if c["length"] == n and c["n"]]
                prompts = sum(c["n"] for c in rows)
                cells.append(f"{sum(c[s['metric']] * c['n'] for c in rows) / prompts:.2f} "
                             f"(n={prompts})" if prompts else "-")
            lines.append(f"| {split} | {model} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work")
    p.add_argument("--out", required=True)
    p.add_argument("--gpu", default=None)
    p.add_argument("--commit", default=None)
    p.add_argument("--command", default=None)
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also plot each model's perplexity over its control's by octave of "
                        "position (the base conditions, and the post-trained models)")
    args = p.parse_args(argv)
    work = Path(args.work)
    if not (work / "pretrain").is_dir():
        sys.exit(f"{work} has no pretrain/ folder: not a study_gpu.sh WORK folder")
    evals = work / "evals"
    result: dict = {"gpu": args.gpu, "commit": args.commit, "command": args.command,
                    "conditions": {}, "post": {}, "evals": {}}
    base_rows, curves = {}, {"base conditions": {}, "post-training": {}}
    print("## pre-training\n\n| condition | length | steps | tokens | seconds | tok/s | "
          "held-out loss |\n|---|---:|---:|---:|---:|---:|---:|")
    for run in sorted((work / "pretrain").iterdir()):
        row = training_row(run)
        if row is None:
            continue
        n = train_length(run)
        full = read_json(evals / f"base-{run.name}-ppl" / "summary.json")
        control = read_json(evals / f"base-{run.name}-ppl-control" / "summary.json")
        result["conditions"][run.name] = {**row, "train_len": n, "ppl": full,
                                          "ppl_control": control}
        if full is not None:
            base_rows[run.name] = ppl_row(full, control, n)
            curves["base conditions"][run.name] = octave_ratios(full, control, n)
        # a run that stopped before its final model (an error, a cut): the row says so
        status = "" if (run / "final").is_dir() else " (stopped: no final model)"
        result["conditions"][run.name]["finished"] = not status
        print(f"| `{run.name}`{status} | {n} | {row['steps']:,} | {row['tokens'] / 1e6:.1f}M | "
              f"{row['seconds']} | {row['tokens_per_s']:,} | {fmt(row['eval_loss'], 3)} |")
    if base_rows:
        print("\n## base perplexity (x the cut-context control)\n")
        print("\n".join(ppl_table(base_rows)))

    base = None
    log = work / "study.log"
    if log.is_file():
        found = re.findall(r"base for post-training: (\S+)", log.read_text())
        base = found[-1] if found else None
    result["base"] = base
    if base is None or not (work / "post").is_dir():
        finish(args, result, curves)
        return 0
    n = result["conditions"][base]["train_len"]
    base_tokens = result["conditions"][base]["tokens"]
    print(f"\n## post-training of `{base}`\n\n| intervention | steps | tokens | of pre-training | "
          "seconds | held-out loss |\n|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        row = training_row(work / "post" / kind)
        if row:
            row["fraction_of_pretraining"] = row["tokens"] / base_tokens
            result["post"][kind] = row
            print(f"| {kind} | {row['steps']} | {row['tokens'] / 1e6:.2f}M | "
                  f"{row['fraction_of_pretraining']:.1%} | {row['seconds']} | "
                  f"{fmt(row['eval_loss'], 3)} |")
    models = [m for m in ("base", *KINDS) if (evals / m).is_dir()]
    rows = {}
    for model in models:
        full = read_json(evals / model / "ppl" / "summary.json")
        control = read_json(evals / model / "ppl-control" / "summary.json")
        rows[model] = ppl_row(full, control, n)
        curves["post-training"][model] = octave_ratios(full, control, n)
        result["evals"][model] = {
            name: read_json(evals / model / name / "summary.json")
            for name in ("ppl", "ppl-control", "passkey", "passkey-train", "effrem")}
    if rows and any(rows.values()):
        print("\n## perplexity to 64x (x the cut-context control)\n")
        print("\n".join(ppl_table({m: r for m, r in rows.items() if r})))
    lines = passkey_table(evals, models)
    if lines:
        print("\n## passkey (exact match)\n")
        print("\n".join(lines))
    lines = effrem_table(evals, models)
    if lines:
        print("\n## Effective Remembrance (EffRem(t) at T: 0 = the tokens before t do not "
              "change the prediction at T)\n")
        print("\n".join(lines))
    finish(args, result, curves, base)
    return 0


def finish(args, result: dict, curves: dict, base: str | None = None) -> None:
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot_ratios(Path(args.plot), curves, base)
        print(f"\nplot: {args.plot}")


def octave_ratios(full: dict | None, control: dict | None, train_len: int) -> list:
    """(position, full / control perplexity) for each octave past the training length."""
    if full is None or control is None:
        return []
    points, lo = [], train_len
    while lo < full["lengths"][-1]:
        hi = min(2 * lo, full["lengths"][-1])
        nll, cut = range_nll(full, lo, hi), range_nll(control, lo, hi)
        if nll is not None and cut is not None:
            points.append((math.sqrt(lo * hi), math.exp(nll - cut)))
        lo = hi
    return points


def plot_ratios(path: Path, curves: dict, base: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, lines) for title, lines in curves.items() if any(lines.values())]
    if not panels:
        print("no perplexity with its control to plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for model, points in lines.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1.05, color="gray", lw=0.8, ls=":", label="1.05")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (tokens; one point per octave past the training length)")
        ax.set_ylabel("perplexity / cut-context control's")
        ax.set_title(f"{title} of `{base}`" if title == "post-training" and base else title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def effrem_table(evals: Path, models: list[str], fractions=(0.25, 0.5, 0.75, 0.9, 0.99)) -> list[str]:
    """EffRem at the cut points nearest to each fraction of T, per model."""
    lines = []
    for model in models:
        s = read_json(evals / model / "effrem" / "summary.json")
        if not s:
            continue
        T, cells = s["T"], [c for c in s["cells"] if c["effrem"] is not None]
        nearest = [min(cells, key=lambda c, f=f: abs(c["t"] - f * T)) for f in fractions]
        picked = list({c["t"]: c for c in nearest}.values())
        if not lines:
            lines = [f"| model (T = {T}) | " + " | ".join(f"t = {c['t']}" for c in picked) + " |",
                     "|---|" + "---:|" * len(picked)]
        lines.append(f"| {model} | " + " | ".join(f"{c['effrem']:.4f}" for c in picked) + " |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
