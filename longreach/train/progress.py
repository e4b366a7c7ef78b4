"""What a training run shows on the console: the progress bar, metric records as text, and
transformers' own progress bars kept quiet while checkpoints are written."""

from __future__ import annotations

import contextlib
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging


def progress_bar(console: Console, *, total: int, done: int) -> Progress:
    """A bar of optimizer steps with the last logged loss and tokens/s (task fields ``loss``
    and ``tps``), the retrieval probe's last needle-first rate of a GCA model (field ``ret``,
    "ret 85%"; empty for other models) and, within a step of gradient accumulation, the
    micro-batches done (field ``micro``, "micro-batch 3/32"); disabled on a quiet console
    (ranks other than 0)."""
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[micro]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[ret]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=console.quiet,
    )
    progress.add_task("train", total=total, completed=done, loss="-", tps="-", micro="", ret="")
    return progress


def format_record(record: dict[str, Any]) -> str:
    """A metrics record as one console line: ``step 10  loss 2.345  tokens_per_s 12,345``."""
    return "  ".join(_format_field(k, v) for k, v in record.items())


def _format_field(key: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}" if key != "tokens_per_s" else f"{value:,.0f}"
    return f"{key} {value}"


def format_retrieval(metrics: dict[str, float]) -> str:
    """The progress bar's ``ret`` field: the probe's needle-first rate, "ret 85%" (or "")."""
    rate = metrics.get("probe/needle_first")
    return "" if rate is None else f"ret {rate:.0%}"


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' per-save "Writing model shards" bar, restoring the setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
