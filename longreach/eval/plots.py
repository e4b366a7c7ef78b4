"""The needle-in-a-haystack picture: x = context length, y = needle depth, colour = score."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
