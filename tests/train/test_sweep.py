"""`longreach sweep`: parsing, planning, the tables, and real sweeps of a tiny recipe (each run
a `python -m longreach.train` process; a few seconds each on a small CPU)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longreach.cli import main
from longreach.train.sweep import (
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_MD,
    Success,
    parse_grid,
    parse_seeds,
    parse_success,
    plan_sweep,
    read_run_metrics,
    run_sweep,
    split_values,
    summarize_sweep,
)

REPO = Path(__file__).resolve().parents[2]
# a one-layer, 32-wide tiny-swa for two steps: the runs' time is mostly starting Python
TINY = ["train.steps=2", "train.batch_size=2", "data.seq_len=64", "train.warmup_steps=0",
        "train.eval_every=0", "train.save_every=0", "train.eval_batches=1", "train.log_every=1",
        "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.intermediate_size=64", "train.device=cpu",
        "train.precision=fp32"]


# ------------------------------------------------------------------------------- parsing


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,3,5") == [0, 3, 5]
    assert parse_seeds(" 0-2, 7 ") == [0, 1, 2, 7]
    assert parse_seeds([4, 2]) == [4, 2]
    for bad, words in [("", "is not a seed"), ("a", "'a' is not a seed"), ("3-1", "backwards"),
                       ("0-2,2", "more than once"), ("1,,2", "is not a seed"), ("-1", "is not")]:
        with pytest.raises(ValueError, match=words):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="integers >= 0"):
        parse_seeds([-1])


def test_parse_grid_and_values():
    assert split_values("1,[a,b],{x: 1, y: 2},'p,q'") == ["1", "[a,b]", "{x: 1, y: 2}", "'p,q'"]
    assert parse_grid(["model.gca.top_k=2,4", "train.lr=1e-3"]) == {
        "model.gca.top_k": ["2", "4"], "train.lr": ["1e-3"]}
    assert parse_grid({"model.mixers": [[1, 2], "swa"], "train.fsdp": [True, None]}) == {
        "model.mixers": ["[1, 2]", "swa"], "train.fsdp": ["true", "null"]}
    for bad, words in [(["top_k=2,4"], "not a dotted key"),
                       (["model.top_k"], "expected dotted.key"),
                       (["seed=1,2"], "use --seeds"), (["train.out_dir=a,b"], "use --out"),
                       (["train.lr=1,"], "empty value"), (["train.lr=1,1"], "more than once"),
                       (["train.lr=1", "train.lr=2"], "more than once")]:
        with pytest.raises(ValueError, match=words):
            parse_grid(bad)


def test_parse_success():
    s = parse_success("probe/needle_first>=0.9")
    assert s == Success("probe/needle_first", ">=", 0.9) and str(s) == "probe/needle_first>=0.9"
    assert s.holds(0.9) and not s.holds(0.89) and not s.holds(None) and not s.holds(float("nan"))
    assert parse_success(" eval_loss < 1.5e0 ").holds(1.2)
    assert not parse_success("eval_loss<1.5").holds(1.5)
    assert parse_success("probe/x>0").holds(1) and parse_success("loss<=2").holds(2.0)
    for bad in ["probe/x=>0.9", "probe/x==1", "probe/x>=", ">=0.9", "probe/x>=0.9 and y", "x>=a"]:
        with pytest.raises(ValueError, match="bad success criterion"):
            parse_success(bad)


# ------------------------------------------------------------------------------ planning


def test_plan_names_order_and_overrides(tmp_path):
    grid = ["model.mixers.window=16,32", "train.lr=1e-3"]
    recipe, out, runs = plan_sweep("tiny-swa", "0-1", grid, TINY, tmp_path / "sw")
    assert recipe.name == "tiny-swa.yaml" and out == (tmp_path / "sw").resolve()
    assert [r.name for r in runs] == ["window=16-lr=1e-3-seed0", "window=16-lr=1e-3-seed1",
                                      "window=32-lr=1e-3-seed0", "window=32-lr=1e-3-seed1"]
    assert runs[3].overrides[:3] == ["seed=1", "model.mixers.window=32", "train.lr=1e-3"]
    assert runs[3].overrides[-1] == f"train.out_dir={out / runs[3].name}"
    assert all(r.action == "start" for r in runs)
    # keys that end the same keep their whole name; odd characters leave folder names
    _, _, runs = plan_sweep("tiny-swa", None, ["model.mixers.window=16", "model.window=8",
                                               "model.mixers={type: swa, window: 16}"],
                            TINY, tmp_path / "sw2")
    assert runs[0].name == (  # and the recipe's seed
        "model.mixers.window=16-model.window=8-mixers=type_swa_window_16-seed0")


def test_plan_errors_before_anything_runs(tmp_path):
    out = tmp_path / "sw"
    with pytest.raises(ValueError, match="run lr=oops-seed0: train.lr must be a number"):
        plan_sweep("tiny-swa", "0", ["train.lr=1e-3,oops"], TINY, out)
    with pytest.raises(ValueError, match="unknown train key"):
        plan_sweep("tiny-swa", "0", None, [*TINY, "train.stepz=3"], out)
    with pytest.raises(ValueError, match="both in --grid and --set"):
        plan_sweep("tiny-swa", "0", ["train.steps=2,3"], TINY, out)
    with pytest.raises(ValueError, match="use --out"):
        plan_sweep("tiny-swa", "0", None, [*TINY, "train.out_dir=x"], out)
    with pytest.raises(ValueError, match="use --seeds"):
        plan_sweep("tiny-swa", "0", None, [*TINY, "seed=3"], out)
    with pytest.raises(ValueError, match="--devices and a train.device setting"):
        run_sweep("tiny-swa", "0", None, TINY, devices="cpu", out=out)
    with pytest.raises(FileNotFoundError, match="not found"):
        plan_sweep("no-such-recipe", "0", None, TINY, out)
    (out / "seed1").mkdir(parents=True)
    (out / "seed1" / "train.log").write_text("an earlier run\n")
    with pytest.raises(ValueError, match="sw/seed1 already holds a run; continue the sweep with"):
        plan_sweep("tiny-swa", "0-2", None, TINY, out)
    assert [r.action for r in plan_sweep("tiny-swa", "0-2", None, TINY, out, resume=True)[2]] == [
        "start"] * 3


def test_cli_dry_run_and_bad_input(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--config", "tiny-swa", "--seeds", "0-2", "--grid", "train.lr=1e-3,2e-3",
            "--out", str(out), "--dry-run", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 runs in" in printed and "lr=2e-3-seed2" in printed and "-m longreach.train" in printed
    assert not out.exists()  # nothing started, nothing written
    assert main(["sweep", "--config", "tiny-swa", "--seeds", "2-0", "--dry-run"]) == 2
    assert "error: bad seeds '2-0'" in capsys.readouterr().err
    assert main(["sweep", "--config", "tiny-swa", "--success", "loss=2", "--dry-run"]) == 2
    assert "error: bad success criterion 'loss=2'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ results


def write_run(run_dir: Path, record: dict, metrics: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "sweep-run.json").write_text(json.dumps(record))
    lines = [json.dumps(m) for m in metrics]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')  # cut short


METRICS = [
    {"step": 10, "loss": 3.0, "lr": 1e-3},
    {"step": 10, "eval_loss": 3.2},
    {"step": 10, "probe/needle_first": 0.5, "probe/needle_weight": 0.1},
    {"step": 20, "loss": 2.0},
    {"step": 20, "probe/needle_first": 0.95, "probe/needle_in_topk": 1.0},
    {"step": 30, "loss": 1.5},
    {"step": 30, "eval_loss": 1.7, "probe/needle_first": 0.92},
]


def test_metrics_extraction(tmp_path):
    write_run(tmp_path / "r", {}, METRICS)
    got = read_run_metrics(tmp_path / "r", parse_success("probe/needle_first>=0.9"))
    assert got == {"step": 30, "loss": 1.5, "eval_loss": 1.7, "probe/needle_first": 0.92,
                   "probe/needle_in_topk": 1.0, "probe/needle_weight": 0.1, "success_step": 20}
    assert read_run_metrics(tmp_path / "r", parse_success("eval_loss<1"))["success_step"] is None
    assert read_run_metrics(tmp_path / "missing") == {"step": None, "loss": None, "eval_loss": None}


def test_summarize_sweep_rebuilds_the_tables(tmp_path):
    def record(name, index, seed, status, rc):
        return {"name": name, "index": index, "seed": seed, "grid": {"model.gca.top_k": "2"},
                "overrides": [f"seed={seed}", "model.gca.top_k=2"], "status": status,
                "exit_code": rc, "wall_s": 12.5}

    write_run(tmp_path / "top_k=2-seed1", record("top_k=2-seed1", 1, 1, "failed", 1),
              METRICS[:3])
    write_run(tmp_path / "top_k=2-seed0", record("top_k=2-seed0", 0, 0, "ok", 0), METRICS)
    with pytest.raises(ValueError, match="bad success"):
        summarize_sweep(tmp_path, "needle")
    results = summarize_sweep(tmp_path, "probe/needle_first>=0.9")
    assert [(r["name"], r["status"], r["success"], r["success_step"]) for r in results] == [
        ("top_k=2-seed0", "ok", True, 20), ("top_k=2-seed1", "failed", False, None)]
    summary = json.loads((tmp_path / SWEEP_JSON).read_text())
    assert summary["success"] == "probe/needle_first>=0.9"
    assert (summary["runs"], summary["ok"], summary["failed"], summary["succeeded"]) == (2, 1, 1, 1)
    assert summary["results"][0]["probe/needle_in_topk"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / SWEEP_CSV)))
    assert rows[0]["probe/needle_first"] == "0.92" and rows[1]["probe/needle_in_topk"] == ""
    assert rows[0]["settings"] == "model.gca.top_k=2"
    md = (tmp_path / SWEEP_MD).read_text()
    assert "| top_k=2-seed0 | ok | 30 | 1.5 | 1.7 | 0.92 | 1 | 0.1 | yes | 20 | 12.5 |" in md
    assert "| model.gca.top_k=2 | 2 | 1 | 1.5 |" in md  # by setting, over the finished seeds
    assert md.rstrip().endswith("1 of 2 runs finished, 1 failed; 1 of 2 runs succeeded")
    # without a criterion it keeps the one the sweep ran with; no temporaries left behind
    assert summarize_sweep(tmp_path)[0]["success"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="holds no sweep runs"):
        summarize_sweep(tmp_path / "top_k=2-seed0")


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two seeds x a good and a bad vocabulary size (too small for the byte tokenizer: it
    fails when the run builds its model), two at a time."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    results = run_sweep("tiny-swa", seeds="0,1", grid=["model.vocab_size=260,10"], sets=TINY,
                        parallel=2, out=out, success="eval_loss<100", echo=False)
    return out, results


@pytest.mark.slow
def test_sweep_runs_concurrently_and_reports_failures(sweep):
    out, results = sweep
    by_name = {r["name"]: r for r in results}
    assert list(by_name) == ["vocab_size=260-seed0", "vocab_size=260-seed1",
                             "vocab_size=10-seed0", "vocab_size=10-seed1"]
    for seed in (0, 1):
        ok = by_name[f"vocab_size=260-seed{seed}"]
        assert (ok["status"], ok["exit_code"], ok["step"], ok["success"]) == ("ok", 0, 2, True)
        assert ok["loss"] > 0 and ok["eval_loss"] > 0 and ok["wall_s"] > 0
        assert (out / ok["name"] / "final").is_dir()
        bad = by_name[f"vocab_size=10-seed{seed}"]
        assert (bad["status"], bad["exit_code"], bad["success"]) == ("failed", 1, False)
        assert "model.vocab_size=10 is smaller than the tokenizer" in bad["error"]
        assert "smaller than the tokenizer" in (out / bad["name"] / "train.log").read_text()
    # the two seeds trained differently; the runs' configs say so
    assert by_name["vocab_size=260-seed0"]["loss"] != by_name["vocab_size=260-seed1"]["loss"]
    assert "seed: 1" in (out / "vocab_size=260-seed1" / "config.yaml").read_text()
    summary = json.loads((out / SWEEP_JSON).read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "ok", "failed", "failed"]
    assert len(list(csv.DictReader(open(out / SWEEP_CSV)))) == 4
    assert "2 of 4 runs finished, 2 failed; 2 of 4 runs succeeded" in (out / SWEEP_MD).read_text()


@pytest.mark.slow
def test_resume_skips_finished_runs_and_adds_new_ones(sweep, capsys):
    out, results = sweep
    before = {r["name"]: r for r in results}
    argv = ["sweep", "--config", "tiny-swa", "--seeds", "0-2", "--grid", "model.vocab_size=260",
            "--parallel", "2", "--out", str(out), *TINY]
    assert main(argv) == 2  # without --resume: the folders of the first sweep are in the way
    assert "already holds a run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr()
    assert "3 of 3 runs finished" in printed.out
    assert "1 to train" in printed.err and "2 finished before (skipped)" in printed.err
    after = {r["name"]: r for r in json.loads((out / SWEEP_JSON).read_text())["results"]}
    assert list(after) == ["vocab_size=260-seed0", "vocab_size=260-seed1", "vocab_size=260-seed2"]
    for name in ("vocab_size=260-seed0", "vocab_size=260-seed1"):  # kept, not retrained
        assert after[name]["loss"] == before[name]["loss"]
        assert after[name]["wall_s"] == before[name]["wall_s"]
    assert after["vocab_size=260-seed2"]["status"] == "ok"


def _logged(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and '"loss"' in path.read_text()


@pytest.mark.slow
def test_sigterm_stops_the_runs_and_resume_continues_them(tmp_path):
    out = tmp_path / "sw"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    long = [*(o for o in TINY if not o.startswith("train.steps=")), "train.steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "longreach", "sweep", "--config", "tiny-swa",
                             "--out", str(out), *long], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not _logged(out / "seed0"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, printed
    assert "SIGTERM: asking every run to save and stop" in printed
    run = json.loads((out / SWEEP_JSON).read_text())["results"][0]
    assert (run["name"], run["status"], run["exit_code"]) == ("seed0", "stopped", 143)
    assert (out / "seed0" / "checkpoints").is_dir() and not (out / "seed0" / "final").exists()
    assert "0 of 1 runs finished, 1 stopped" in printed

    # resumed from its checkpoint; a tiny time limit then ends it (and writes final/)
    results = run_sweep("tiny-swa", sets=[*long, "train.max_time_minutes=0.001"],
                        out=out, resume=True, echo=False)
    assert [(r["status"], r["exit_code"]) for r in results] == [("ok", 0)]
    assert results[0]["step"] > run["step"]
    log = (out / "seed0" / "train.log").read_text()
    assert "--resume" in log and "resumed from" in log and (out / "seed0" / "final").is_dir()
