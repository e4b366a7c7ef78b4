"""``longreach report``: side-by-side tables and plots from summary files."""

import json

import pytest

from longreach.cli import main
from longreach.eval import report


def _grid(task, metric, values):
    """A runner-style summary: values[length] = (score at depth 0, score at depth 1)."""
    cells = [{"length": n, "depth": d, "n": 2, metric: v}
             for n, pair in values.items() for d, v in zip((0.0, 1.0), pair, strict=True)]
    return {"task": task, "metric": metric, "lengths": sorted(values), "depths": [0.0, 1.0],
            "cells": cells, "config": {"options": {}}}


def _ppl(values):
    cells = [{"length": 4096, "start": k * 1024, "end": (k + 1) * 1024, "n": 1, "ppl": v}
             for k, v in enumerate(values)]
    return {"task": "ppl", "metric": "ppl", "lengths": [4096], "bucket": 1024, "cells": cells,
            "totals": [{"length": 4096, "ppl": sum(values) / len(values)}],
            "config": {"options": {"bucket": 1024}}}


def _effrem(values):
    cells = [{"T": 256, "t": t, "n": 4, "effrem": v} for t, v in zip((0, 1, 255), values, strict=True)]
    return {"task": "effrem", "metric": "effrem", "T": 256, "lengths": [256], "cells": cells,
            "config": {"options": {"T": 256, "points": 16}}}


def _write(folder, summary):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "swa", tmp_path / "mamba"
    _write(a / "passkey", _grid("passkey", "exact_match", {1024: (1.0, 0.5), 4096: (0.0, 0.5)}))
    _write(a / "ppl", _ppl([10.0, 11.0, 12.0, 30.0]))
    _write(b / "passkey", _grid("passkey", "exact_match", {1024: (1.0, 1.0)}))
    _write(b / "effrem", _effrem([0.0, 0.00123, 0.4]))
    return a, b


def test_table_has_models_as_columns(runs):
    markdown = report.render_markdown(report.build_report(runs))
    lines = markdown.splitlines()
    assert lines[0] == "| task | length | swa | mamba |"
    assert "| passkey (exact_match) | 1k | 0.750 | 1.000 |" in lines
    assert "| passkey (exact_match) | 4k | 0.250 | - |" in lines  # missing cell shows "-"
    # ppl rows: log-spaced buckets (1k, 2k, 4k ends) and the whole length
    ppl_rows = [line for line in lines if line.startswith("| ppl")]
    assert [row.split(" | ")[1] for row in ppl_rows] == [
        "tokens 0-1k", "tokens 1k-2k", "tokens 3k-4k", "all 4k"]
    assert ppl_rows[2].endswith("| 30.000 | - |")
    assert "| effrem T=256 points=16 | t=1 | - | 0.00123 |" in lines  # small values keep digits
    assert "| effrem T=256 points=16 | t=0 | - | 0.000 |" in lines


def test_write_report_and_command(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", *map(str, runs), "--out", str(out), "--names", "A,B",
                 "--mark", "2k"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| task | length | A | B |" in printed
    text = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # one plot per task, plus the overview with a panel per task
    assert len(pngs) == 4 and "overview.png" in pngs and all(f"({name})" in text for name in pngs)
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no summary.json"):
        report.build_report([tmp_path])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="not an eval summary"):
        report.build_report([tmp_path / "x"])
    with pytest.raises(ValueError, match="names"):
        report.build_report([tmp_path / "x"], names=["a", "b"])
