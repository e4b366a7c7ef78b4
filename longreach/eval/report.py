"""Side-by-side reports of eval runs: a markdown table and one combined plot per task.

``longreach report DIR [DIR ...]`` reads the ``summary.json`` files the eval commands write
(a DIR is one run's ``--out`` folder, or a folder holding several of them, one model per
DIR). Models become columns; rows are task x length (grid tasks: the headline metric
averaged over depths), task x position bucket (``ppl``) or task x cut point t (``effrem``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longreach.eval.plots import draw_lines, format_length, plot_lines, save_figure
from longreach.runtime import write_atomic

REPORT = "report.md"


# ---------------------------------------------------------------- reading runs


def find_summaries(folder: str | os.PathLike) -> list[Path]:
    """``folder/summary.json``, or every ``summary.json`` below ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if (folder / "summary.json").is_file():
        return [folder / "summary.json"]
    found = sorted(folder.rglob("summary.json"))
    if not found:
        raise ValueError(f"{folder}: no summary.json inside (is it an eval --out folder?)")
    return found


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable summary ({err})") from err
    if not isinstance(summary, dict) or "task" not in summary or "cells" not in summary:
        raise ValueError(f"{path}: not an eval summary (no task / cells)")
    return summary


def task_label(summary: dict[str, Any]) -> str:
    """The task, its headline metric (when named otherwise) and its options: one row group."""
    options = (summary.get("config") or {}).get("options") or {}
    extra = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    metric = summary.get("metric", "")
    label = summary["task"] if metric in ("", summary["task"]) else f"{summary['task']} ({metric})"
    return f"{label} {extra}" if extra else label


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(row label, value) pairs of one summary, in display order."""
    task = summary["task"]
    if task == "ppl":
        longest = max(summary["lengths"])
        bucket = summary["bucket"]
        cells = [c for c in summary["cells"] if c["length"] == longest]
        rows = []
        for i, c in enumerate(cells):
            k = c["end"] // bucket
            if (k & (k - 1)) == 0 or i == len(cells) - 1:  # log-spaced buckets and the last
                rows.append((f"tokens {format_length(c['start'])}-{format_length(c['end'])}",
                             c["ppl"]))
        rows += [(f"all {format_length(t['length'])}", t["ppl"]) for t in summary["totals"]]
        return rows
    if task == "effrem":
        return [(f"t={c['t']}", c["effrem"]) for c in summary["cells"]]  # T is in the label
    metric = summary["metric"]
    rows = []
    for n in summary["lengths"]:
        cells = [c for c in summary["cells"] if c["length"] == n and c.get("n")]
        total = sum(c["n"] for c in cells)
        value = sum(c[metric] * c["n"] for c in cells) / total if total else None
        rows.append((format_length(n), value))
    return rows


def summary_series(summary: dict[str, Any]) -> list[tuple[float, float]]:
    """The points of one summary on its task's combined plot."""
    task = summary["task"]
    if task == "ppl":
        longest = max(summary["lengths"])
        return [(c["end"], c["ppl"]) for c in summary["cells"] if c["length"] == longest]
    if task == "effrem":
        return [(c["t"], c["effrem"]) for c in summary["cells"]]
    rows = summary_rows(summary)
    return [(n, v) for n, (_, v) in zip(summary["lengths"], rows, strict=True)]


_AXES = {  # task -> (x label, log y)
    "ppl": ("position (tokens)", False),
    "effrem": ("cut point t (tokens)", True),
}


# ---------------------------------------------------------------- the report


def column_names(folders: Sequence[str | os.PathLike], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(folders):
            raise ValueError(f"{len(names)} names for {len(folders)} folders")
        return list(names)
    paths = [Path(f).resolve() for f in folders]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):  # same last component: add the parent
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    return labels


def build_report(folders: Sequence[str | os.PathLike],
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Collect every summary below ``folders``: ``{"models", "tasks": {label: {"rows": [...],
    "values": {row: {model: value}}, "series": {model: points}, "task": name}}}``."""
    if not folders:
        raise ValueError("give at least one run folder")
    models = column_names(folders, names)
    tasks: dict[str, dict[str, Any]] = {}
    for model, folder in zip(models, folders, strict=True):
        for path in find_summaries(folder):
            summary = load_summary(path)
            label = task_label(summary)
            entry = tasks.setdefault(label, {"task": summary["task"], "rows": [], "values": {},
                                             "series": {}, "metric": summary.get("metric", "")})
            for row, value in summary_rows(summary):
                if row not in entry["values"]:
                    entry["rows"].append(row)
                entry["values"].setdefault(row, {})[model] = value
            entry["series"][model] = summary_series(summary)
    return {"models": models, "tasks": tasks}


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    lines = ["| task | length | " + " | ".join(models) + " |",
             "|---|---|" + "---|" * len(models)]
    for label, entry in report["tasks"].items():
        for row in entry["rows"]:
            cells = [_format(entry["values"][row].get(m)) for m in models]
            lines.append(f"| {label} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if 0 < abs(value) < 0.01:  # small values (EffRem) keep three significant digits
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _file_name(label: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_=" else "_" for ch in label)
    return "_".join(part for part in keep.split("_") if part) + ".png"


OVERVIEW = "overview.png"


def write_report(folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 names: Sequence[str] | None = None, *,
                 mark: int | None = None) -> tuple[str, list[Path]]:
    """Write ``report.md``, one PNG per task and (for several tasks) ``overview.png`` with a
    panel per task into ``out_dir``; return (markdown, plots). ``mark``: a length (e.g. the
    training length) drawn as a dashed line on every plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = build_report(folders, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vlines = {f"length {format_length(mark)}": mark} if mark else None
    panels = []
    for label, entry in report["tasks"].items():
        xlabel, logy = _AXES.get(entry["task"], ("context length (tokens)", False))
        panels.append((label, dict(xlabel=xlabel, ylabel=entry["metric"], title=label,
                                   logx=True, logy=logy, vlines=vlines), entry["series"]))
    plots = [plot_lines(series, out / _file_name(label), **style)
             for label, style, series in panels]
    if len(panels) > 1:
        fig = Figure(figsize=(5.5 * len(panels), 4.2))
        FigureCanvasAgg(fig)
        for i, (_, style, series) in enumerate(panels):
            draw_lines(fig.add_subplot(1, len(panels), i + 1), series, **style)
        fig.tight_layout()
        plots.insert(0, save_figure(fig, out / OVERVIEW))
    table = render_markdown(report)
    text = "# Eval report\n\n" + table + "\n" + "".join(
        f"![{p.stem}]({p.name})\n" for p in plots)
    write_atomic(out / REPORT, text)
    return table, plots


# ---------------------------------------------------------------- the command


def cmd_report(args) -> int:
    from longreach.eval.command import parse_length

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    mark = parse_length(args.mark) if args.mark else None
    table, plots = write_report(args.dirs, args.out, names, mark=mark)
    print(table)
    print(f"report in {args.out} ({REPORT} and {len(plots)} plot(s))")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to an ``add_subparsers()`` object; sets ``func=cmd_report``."""
    p = subparsers.add_parser(
        "report",
        help="compare eval runs side by side (markdown table + plots)",
        description="Read the summary.json files of eval runs (one model per DIR: an eval "
        "--out folder or a folder of them) and write a markdown table with models as "
        "columns and task x length as rows, plus one combined plot per task.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="eval output folders, one per model")
    p.add_argument("--out", default="report", help="folder for report.md and the plots")
    p.add_argument("--names", default=None, help="comma-separated column names (default: "
                   "the folder names)")
    p.add_argument("--mark", default=None, metavar="LENGTH",
                   help="draw a dashed line at this length (e.g. the training length, 2k)")
    p.set_defaults(func=cmd_report)
    return p


__all__ = [
    "build_report",
    "find_summaries",
    "render_markdown",
    "write_report",
]
