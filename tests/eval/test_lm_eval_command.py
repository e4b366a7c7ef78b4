"""`longreach lm-eval` and `python -m longreach.eval.lm_eval`: lm-eval's own command line with
the longreach model registered, run offline on a local multiple-choice task (lm_eval_tasks/)."""

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longreach.checkpoints import checkpoint_path
from longreach.cli import main

TASKS = Path(__file__).parent / "lm_eval_tasks"
REPO = Path(__file__).resolve().parents[2]
TASK = "longreach_tiny_mc"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """The task folder copied to a scratch folder, made the working directory (the task's
    data_files path is relative to it), with the hub switched off and caches kept inside."""
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    monkeypatch.chdir(folder)
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets")}.items():
        monkeypatch.setenv(name, value)
    return folder


def _results(output_path: Path) -> dict:
    (path,) = output_path.glob("**/results_*.json")
    return json.loads(path.read_text())


def _expected_accuracy(pretrained: Path) -> float:
    """The task's accuracy from the adapter's own log-likelihoods (lm-eval joins the question
    and a choice with a space and picks the most likely choice)."""
    from lm_eval.api.instance import Instance

    from longreach.eval.lm_eval import LongReachLM

    lm = LongReachLM(pretrained=str(pretrained), device="cpu")
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs:
        scores = [lm.loglikelihood([Instance(request_type="loglikelihood", doc=doc, idx=i,
                                             arguments=(doc["question"], " " + choice))])[0][0]
                  for i, choice in enumerate(doc["choices"])]
        right += scores.index(max(scores)) == doc["answer"]
    return right / len(docs)


def test_module_command_runs_a_local_task_offline(task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    pretrained = checkpoint_path("swa-tiny")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # no --model (longreach is the default) and no --device (the one longreach picks, not cuda:0)
    proc = subprocess.run(
        [sys.executable, "-m", "longreach.eval.lm_eval", "--model_args", f"pretrained={pretrained}",
         "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out)
    assert results["config"]["model"] == "longreach" and results["config"]["device"] == "auto"
    assert results["n-samples"][TASK]["effective"] == 6
    assert results["results"][TASK]["acc,none"] == pytest.approx(_expected_accuracy(pretrained))


def test_longreach_command_passes_lm_eval_options_through(task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    # device= in the model args wins over lm-eval's --device (cuda:0 fails on a CPU machine)
    assert main(["lm-eval", "--model", "longreach", "--model_args",
                 f"pretrained={checkpoint_path('swa-tiny')},device=cpu,prefill_chunk=8",
                 "--device", "cuda:0", "--tasks", TASK, "--include_path", str(task_dir),
                 "--limit", "2", "--output_path", str(out)]) == 0
    results = _results(out)
    assert results["n-samples"][TASK]["effective"] == 2
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    assert results["config"]["model_args"]["prefill_chunk"] == 8


def test_lm_eval_errors_are_one_line(task_dir, capsys):
    pytest.importorskip("lm_eval")
    assert main(["lm-eval", "--model_args", "pretrained=x", "--tasks", "no_such_task"]) == 2
    assert "longreach lm-eval: error: " in capsys.readouterr().err


def test_default_arguments():
    pytest.importorskip("lm_eval")
    from longreach.eval.lm_eval import lm_eval_argv

    tasks = ["--tasks", "hellaswag"]
    assert lm_eval_argv(tasks) == [*tasks, "--model", "longreach", "--device", "auto"]
    assert lm_eval_argv(["run", *tasks]) == ["run", *tasks, "--model", "longreach", "--device", "auto"]
    assert lm_eval_argv(["--model=longreach", *tasks]) == ["--model=longreach", *tasks, "--device", "auto"]
    assert lm_eval_argv(["-M", "longreach", "--device", "cpu"]) == ["-M", "longreach", "--device", "cpu"]
    assert lm_eval_argv(["--model", "hf", *tasks]) == ["--model", "hf", *tasks]  # hf's own default
    for unchanged in ([], ["run"], ["ls", "tasks"], ["validate", *tasks], ["--help"], [*tasks, "-h"]):
        assert lm_eval_argv(unchanged) == unchanged


def test_default_arguments_read_a_config_file(tmp_path):
    pytest.importorskip("lm_eval")
    from longreach.eval.lm_eval import lm_eval_argv

    config = tmp_path / "run.yaml"
    config.write_text("model: hf\ntasks: [hellaswag]\n")
    assert lm_eval_argv(["--config", str(config)]) == ["--config", str(config)]
    config.write_text("model: longreach\ndevice: cpu\n")
    assert lm_eval_argv(["-C", str(config)]) == ["-C", str(config)]
    config.write_text("tasks: [hellaswag]\n")
    assert lm_eval_argv([f"--config={config}"]) == [f"--config={config}", "--model", "longreach",
                                                    "--device", "auto"]


def test_install_hint_without_lm_eval(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    monkeypatch.delitem(sys.modules, "longreach.eval.lm_eval", raising=False)
    assert main(["lm-eval", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("longreach lm-eval: error: ") and "pip install 'longreach[eval]'" in err


def test_longreach_command_does_not_import_lm_eval():
    code = "import sys, longreach.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
