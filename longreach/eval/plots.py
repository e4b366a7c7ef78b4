"""Eval plots: the needle-in-a-haystack heatmap (x = context length, y = needle depth,
colour = score) and line plots (perplexity per position, EffRem, report panels).

Figures are drawn on a ``Figure`` with an Agg canvas (no pyplot: no global backend or GUI is
touched) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from longreach.runtime import atomic_path


def format_length(n: int) -> str:
    """1024 -> "1k", 1048576 -> "1m", 1500 -> "1500"."""
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def plot_heatmap(
    scores: dict[tuple[int, float], float],
    lengths: Sequence[int],
    depths: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str = "",
    metric: str = "accuracy",
) -> Path:
    """Write a PNG heatmap of ``scores[(length, depth)]`` (missing cells are blank)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend or GUI is touched
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            if (length, depth) in scores:
                grid[i, j] = scores[(length, depth)]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=metric)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def plot_lines(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    vlines: dict[str, float] | None = None,
) -> Path:
    """Write a PNG with one line per ``series`` entry (name -> [(x, y), ...]), atomically.
    Points that a log axis cannot show (x or y <= 0, None) are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend or GUI is touched
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    draw_lines(fig.add_subplot(1, 1, 1), series, xlabel=xlabel, ylabel=ylabel, title=title,
               logx=logx, logy=logy, vlines=vlines)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_lines(ax, series, *, xlabel: str, ylabel: str, title: str = "", logx: bool = False,
               logy: bool = False, vlines: dict[str, float] | None = None) -> None:
    """``plot_lines`` onto an existing matplotlib axis."""
    for name, points in series.items():
        kept = [(x, y) for x, y in points if y is not None and math.isfinite(y)
                and (not logx or x > 0) and (not logy or y > 0)]
        if kept:
            xs, ys = zip(*kept, strict=True)
            ax.plot(xs, ys, marker="o" if len(kept) < 40 else None, markersize=3, label=name)
    for name, x in (vlines or {}).items():
        ax.axvline(x, color="grey", linestyle="--", linewidth=1, label=name)
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_length_formatter())
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if series or vlines:
        ax.legend(fontsize=8)


def _length_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: format_length(int(x)) if x >= 1 and x == int(x) else f"{x:g}")
