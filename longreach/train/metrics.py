"""The run's metrics: one JSON line per record in ``<run>/metrics.jsonl`` and, with
``train.tensorboard``, the same numbers as TensorBoard scalars in ``<run>/tensorboard``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longreach.runtime import write_atomic

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def summary_writer_class():
    """TensorBoard's SummaryWriter; a RuntimeError saying how to install it when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed after each, so a killed run keeps them) and
    mirrors their numbers to TensorBoard. Kept open for the whole run; ``close`` ends both."""

    def __init__(self, run_dir: Path, *, tensorboard: bool):
        self.file = open(run_dir / METRICS, "a")
        self.tensorboard = (
            summary_writer_class()(str(run_dir / TENSORBOARD)) if tensorboard else None
        )

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def clear_metrics(run_dir: Path) -> None:
    """Start a run's metrics file empty."""
    write_atomic(run_dir / METRICS, "")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the lines up to ``step`` (a resumed run rewrites what came after)."""
    path = run_dir / METRICS
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
    write_atomic(path, "".join(kept))
