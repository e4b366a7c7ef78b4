"""benchmarks/recurrent/summarize.py on a small hand-made WORK folder of study_gpu.sh."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "recurrent" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("recurrent_summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pretrain(work: Path, name: str, finished: bool) -> None:
    run = work / "pretrain" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  seq_len: 256\n")
    rows = [{"step": 10, "loss": 3.0, "tokens": 10240, "tokens_per_s": 5000.0, "elapsed": 2.0},
            {"step": 10, "eval_loss": 2.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "final").mkdir()


def _ppl(folder: Path, nll_of) -> None:
    folder.mkdir(parents=True)
    cells = [{"start": s, "end": s + 128, "nll": nll_of(s), "tokens": 100}
             for s in range(0, 4096, 128)]
    (folder / "summary.json").write_text(json.dumps({"lengths": [4096], "bucket": 128,
                                                      "cells": cells}))


def test_a_stopped_condition_is_marked_and_the_others_keep_their_tables(summarize, tmp_path,
                                                                          capsys):
    # the first condition (in name order) stopped before its final model and was never
    # evaluated: its row says so, and the perplexity table still has the second's ranges
    _pretrain(tmp_path, "a-stopped", finished=False)
    _pretrain(tmp_path, "b-done", finished=True)
    _ppl(tmp_path / "evals" / "base-b-done-ppl", lambda s: 2.0 if s < 1024 else 2.5)
    _ppl(tmp_path / "evals" / "base-b-done-ppl-control", lambda s: 2.0)
    out = tmp_path / "result.json"
    plot = tmp_path / "ratio.png"
    assert summarize.main([str(tmp_path), "--out", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 0
    text = capsys.readouterr().out
    assert "`a-stopped` (stopped: no final model)" in text
    assert "`b-done` | 256 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| b-done |"))
    # 4-16x is 1024-4096: NLL 2.5 against the control's 2.0
    assert f"{math.exp(2.5):.2f} ({math.exp(0.5):.3f}x)" in row
    result = json.loads(out.read_text())
    assert result["conditions"]["a-stopped"]["finished"] is False
    assert result["conditions"]["b-done"]["finished"] is True


def test_a_folder_that_is_not_a_study_is_refused(summarize, tmp_path):
    with pytest.raises(SystemExit, match="pretrain"):
        summarize.main([str(tmp_path), "--out", str(tmp_path / "r.json")])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recurrent_{name}", SCRIPT.with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_puts_each_run_on_one_row(tmp_path, capsys):
    compare = _load("compare.py")
    runs = []
    for name, rise in (("seed1", 0.5), ("seed2", 0.25)):
        work = tmp_path / name
        _pretrain(work, "slowest-256", finished=True)
        (work / "study.log").write_text("[00:00:00] base for post-training: slowest-256\n")
        for model, far in (("base", 2.0 + rise), ("state_passing", 2.0)):
            _ppl(work / "evals" / model / "ppl", lambda s, far=far: 2.0 if s < 1024 else far)
            _ppl(work / "evals" / model / "ppl-control", lambda s: 2.0)
        runs.append(str(work))
    assert compare.main([*runs, "--out", str(tmp_path / "c.json"), "--range", "4-16x"]) == 0
    text = capsys.readouterr().out
    assert f"| seed1 | `slowest-256` | 0 | 0.0M | {math.exp(0.5):.3f} | - |" in text
    result = json.loads((tmp_path / "c.json").read_text())
    assert [r["ratios"]["state_passing"]["4-16x"] for r in result["runs"]] == [1.0, 1.0]
    assert result["runs"][1]["ratios"]["base"]["4-16x"] == pytest.approx(math.exp(0.25))
    (tmp_path / "seed2" / "study.log").write_text("")
    with pytest.raises(SystemExit, match="names no base"):
        compare.main([*runs, "--out", str(tmp_path / "c.json")])
