"""``longreach demo``: length generalization in minutes.

Two tiny models of the same width and depth, trained at L = 512 tokens on the built-in corpus
mixed with the passkey task: a sliding-window transformer (longreach/configs/swa-tiny.yaml) and a GCA
model (longreach/configs/gca-tiny.yaml). The demo evaluates both on passkey retrieval at L, 8L, 64L,
512L and 1000L tokens, in two conditions side by side: in-distribution (the classic passkey
prompt in the built-in corpus) and held-out (phrasings no training task uses, in the held-out
haystack, the Python language reference: ``longreach.data.prompts``). By default it uses the
two checkpoints shipped in ``longreach/checkpoints`` (made by the commands in their README);
``--train`` trains them from the current recipes first, in two stages each (an H200: under 25
minutes; a 2-core CPU: about 4 hours).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from longreach.runtime import write_atomic

TRAIN_LENGTH = 512
MULTIPLES = (1, 8, 64, 512, 1000)
# (depths, samples per depth) per multiple of L: fewer, longer prompts further out
_FULL = {1: ((0.1, 0.3, 0.5, 0.7, 0.9), 2), 8: ((0.1, 0.3, 0.5, 0.7, 0.9), 2),
         64: ((0.1, 0.3, 0.5, 0.7, 0.9), 1), 512: ((0.3, 0.5, 0.7), 1), 1000: ((0.3, 0.7), 1)}
_QUICK = {1: ((0.1, 0.5, 0.9), 1), 8: ((0.1, 0.5, 0.9), 1), 64: ((0.5,), 1),
          512: ((0.5,), 1), 1000: ((0.5,), 1)}
MODELS = (("swa-tiny", "sliding window"), ("gca-tiny", "GCA"))
# The sliding-window baseline (window 64) cannot see a needle more than 64 tokens back: from
# 64L on, one prompt per condition shows that, instead of minutes of prefill for a known zero.
BASELINE = "swa-tiny"
BASELINE_ONE_PROMPT_FROM = 64
# Prompt tokens per second of the whole demo on an idle 2-core CPU (the full demo: 5.7M prompt
# tokens in 4 min 42 s), for the estimate printed at the start.
CPU_TOKENS_PER_S = 20_000
# (name, label, passkey task options, haystack): the prompts training saw, and prompts it never saw
CONDITIONS = (("in-distribution", "in-dist.", {}, "builtin"),
              ("held-out", "held-out", {"split": "heldout"}, "heldout"))


def _fresh_dir(out: Path) -> None:
    """Make ``out`` empty; only ever remove a folder the demo itself made."""
    if out.exists():
        if not (out / ".longreach-demo").exists():
            raise ValueError(f"{out} exists and was not made by the demo; pass --out to choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".longreach-demo").touch()


# The second stage of both recipes: the same recipe again, started from the first stage's
# weights at a lower learning rate. In the 10-seed sweep of docs/gca.md every GCA run's
# retriever had learned within the first stage, but most copied the key only after this one.
SECOND_STAGE = ("train.lr=1e-3", "train.min_lr=1e-4")


def train_demo_models(out: Path, overrides: list[str] | None = None) -> dict[str, Path]:
    """Train both demo models from scratch with longreach's own recipes
    (longreach/configs/gca-tiny.yaml and swa-tiny.yaml), each in two stages: the recipe, then
    the recipe again from the first stage's weights with ``SECOND_STAGE``'s overrides (the
    commands of longreach/checkpoints/README.md). Returns their final folders."""
    from longreach.train import find_recipe, load_config, train

    extra = list(overrides or [])
    finals = {}
    for name in ("gca-tiny", "swa-tiny"):
        recipe = find_recipe(name)
        first = train(load_config(recipe, [f"train.out_dir={out / (name + '-stage1')}", *extra]))
        second = train(load_config(recipe, [f"train.out_dir={out / name}", *SECOND_STAGE,
                                            f"train.init_from={Path(first) / 'final'}", *extra]))
        finals[name] = Path(second) / "final"
    return finals


def run_demo(*, quick: bool = False, retrain: bool = False, out_dir: str = "runs/demo",
             device: str = "auto", train_overrides: list[str] | None = None,
             plan: dict | None = None, progress: bool = True) -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from longreach.checkpoints import checkpoint_path
    from longreach.eval.plots import format_length
    from longreach.eval.runner import run_eval

    hf_logging.disable_progress_bar()
    console = Console()
    out = Path(out_dir)
    _fresh_dir(out)
    start = time.time()
    if retrain:
        console.print("[bold]Training both demo models from scratch[/] (recipes gca-tiny, "
                      "swa-tiny)")
        models = train_demo_models(out / "train", train_overrides)
    else:
        models = {name: checkpoint_path(name) for name, _ in MODELS}
    plan = plan or (_QUICK if quick else _FULL)
    lengths = [TRAIN_LENGTH * m for m in sorted(plan)]
    total_tokens = sum(_prompt_tokens(name, plan) for name, _ in MODELS) * len(CONDITIONS)
    console.print(f"Passkey retrieval (a number hidden in filler text) at L = {TRAIN_LENGTH} tokens "
                  f"(the training length) up to {format_length(lengths[-1])} = {max(plan)}L, "
                  f"{'quick' if quick else 'full'} run: {_count(total_tokens)} prompt tokens, "
                  f"about {_minutes(total_tokens / CPU_TOKENS_PER_S)} on an idle 2-core CPU")
    done_tokens, eval_start = 0, time.time()

    results: dict[str, dict[str, dict[int, dict]]] = {}
    for name, label in MODELS:
        results[name] = {}
        for condition, _, options, haystack in CONDITIONS:
            cells = results[name][condition] = {}
            for multiple in sorted(plan):
                depths, samples = _cell_plan(name, multiple, plan)
                length = TRAIN_LENGTH * multiple
                summary = run_eval(
                    "passkey", models[name], [length], depths, samples=samples, seed=0,
                    out_dir=out / name / condition / format_length(length), device=device,
                    progress=progress, haystack=haystack, options=options,
                    command=f"longreach demo{' --quick' if quick else ''}",
                )
                row = cells[length] = _cell(summary)
                done_tokens += _cell_tokens(name, multiple, plan)
                left = (total_tokens - done_tokens) * (time.time() - eval_start) / done_tokens
                console.print(f"  {label:>14} {condition:>15} {format_length(length):>6}: exact "
                              f"{row['exact_match']:.2f}  first character {row['first_token']:.2f}  "
                              f"(n={row['n']})" + (f"; about {_minutes(left)} left" if left >= 30 else ""))

    table = Table(title=f"passkey accuracy: exact match (first-character accuracy), trained at "
                        f"L = {TRAIN_LENGTH}")
    table.add_column("context")
    columns = [(n, c, f"{label}\n{clabel}") for n, label in MODELS for c, clabel, _, _ in CONDITIONS]
    for _, _, title in columns:
        table.add_column(title, justify="right")
    main_model = MODELS[-1][0]
    for multiple, length in zip(sorted(plan), lengths, strict=True):
        n = results[main_model][CONDITIONS[0][0]][length]["n"]
        cells = []
        for name, condition, _ in columns:
            cell = results[name][condition][length]
            cells.append(f"{cell['exact_match']:.0%} ({cell['first_token']:.0%})"
                         + (f" n={cell['n']}" if cell["n"] != n else ""))
        table.add_row(f"{format_length(length)} = {multiple}L (n={n})", *cells)
    console.print(table)
    console.print("in-distribution: the classic passkey prompt in the built-in corpus (what "
                  "training saw); held-out: phrasings no training task uses, in the held-out "
                  "haystack (the Python language reference)")
    heatmap = _plot(results, lengths, out / "passkey_heatmap.png")
    summary = {"task": "passkey", "train_length": TRAIN_LENGTH, "quick": quick, "retrained": retrain,
               "models": {n: str(models[n]) for n, _ in MODELS}, "seconds": round(time.time() - start, 1),
               "conditions": {c: {"options": o, "haystack": h} for c, _, o, h in CONDITIONS},
               "results": {n: {c: {str(k): v for k, v in cells.items()} for c, cells in r.items()}
                           for n, r in results.items()}}
    _write_json(out / "demo_summary.json", summary)
    console.print(f"wall time {time.time() - start:.0f} s; heatmap {heatmap}; per-sample results in {out}/<model>/<condition>/<length>/")
    return 0


def _cell_plan(name: str, multiple: int, plan: dict) -> tuple[tuple[float, ...], int]:
    """(depths, samples per depth) of one model at one multiple of L."""
    depths, samples = plan[multiple]
    if name == BASELINE and multiple >= BASELINE_ONE_PROMPT_FROM:
        return (depths[len(depths) // 2],), 1
    return tuple(depths), samples


def _cell_tokens(name: str, multiple: int, plan: dict) -> int:
    """Prompt tokens one model reads at one multiple of L in one condition."""
    depths, samples = _cell_plan(name, multiple, plan)
    return TRAIN_LENGTH * multiple * len(depths) * samples


def _prompt_tokens(name: str, plan: dict) -> int:
    """Prompt tokens one model reads in one condition."""
    return sum(_cell_tokens(name, multiple, plan) for multiple in plan)


def _count(tokens: int) -> str:
    return f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}K"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _cell(summary: dict) -> dict:
    rows = [r for r in summary["cells"] if r["n"]]
    n = sum(r["n"] for r in rows)
    return {"n": n, **{m: sum(r[m] * r["n"] for r in rows) / n for m in ("exact_match", "first_token")}}


def _plot(results: dict, lengths: list[int], path: Path) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from longreach.eval.plots import format_length, save_figure

    fig = Figure(figsize=(2.2 + 1.1 * len(lengths), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = [(n, c, f"{label}\n{c}") for n, label in MODELS for c, _, _, _ in CONDITIONS]
    grid = np.array([[results[n][c][length]["exact_match"] for length in lengths] for n, c, _ in rows])
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{format_length(n)}\n{n // TRAIN_LENGTH}L" for n in lengths])
    ax.set_yticks(range(len(rows)), [label for _, _, label in rows])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xlabel(f"context length (trained at L = {TRAIN_LENGTH})")
    ax.set_title("passkey exact match")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2))
