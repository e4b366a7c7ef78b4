"""A resumable eval run folder: ``run.json`` (what is being evaluated), ``results.jsonl``
(one line per finished sample, on disk as soon as it is done), ``summary.json`` and
``summary.csv``.

An interrupted run resumes where it stopped: the same command reopens the folder, reads the
finished records and skips them. A folder holding another run's results is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from longreach.runtime import write_atomic

RESULTS = "results.jsonl"
RUN_CONFIG = "run.json"
# Keys of run.json that must agree for old results to count as the same experiment.
IDENTITY = ("task", "model", "seed", "haystack", "options", "max_new_tokens", "attention")


def open_run_folder(out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Create or reopen ``out_dir`` for the run ``config`` describes: refuse a folder whose
    results belong to a run differing in an ``IDENTITY`` key, write ``run.json``, and cut a
    last line that a killed run left unfinished. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_CONFIG
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in IDENTITY if old.get(k) != config.get(k)]
        if diff and (out / RESULTS).is_file():
            raise ValueError(
                f"{out} holds results of a different run ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} }); use another --out folder"
            )
    write_atomic(path, json.dumps(config, indent=2) + "\n")
    _drop_torn_tail(out / RESULTS)
    return out


def _drop_torn_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished records in ``out_dir`` (a torn last line is ignored)."""
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run killed mid-write; that sample is simply redone
    return records


@contextmanager
def result_writer(out_dir: str | os.PathLike) -> Iterator:
    """``with result_writer(out) as append: append(record)``: one JSON line per record,
    flushed and fsync'd, so an interrupted run loses at most the record being written."""
    with open(Path(out_dir) / RESULTS, "a", encoding="utf-8") as results:
        def append(record: dict[str, Any]) -> None:
            results.write(json.dumps(record) + "\n")
            results.flush()
            os.fsync(results.fileno())

        yield append


def write_summaries(out_dir: str | os.PathLike, summary: dict[str, Any], fields: Sequence[str],
                    rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> None:
    """Write ``summary.json`` and ``summary.csv`` (``rows`` under ``fields``, after ``#``
    lines with the summary's command and versions and any ``notes``), each atomically."""
    out = Path(out_dir)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    buf.write(f"# command: {summary['command']}\n")
    buf.write("# versions: " + " ".join(f"{k}={v}" for k, v in summary["versions"].items()) + "\n")
    for note in notes:
        buf.write(f"# {note}\n")
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(out / "summary.csv", buf.getvalue())


__all__ = ["IDENTITY", "RESULTS", "RUN_CONFIG", "open_run_folder", "read_results",
           "result_writer", "write_summaries"]
