import json
import subprocess
import sys

import pytest
import yaml

from longreach.cli import main

TINY = {
    "name": "cli-tiny",
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "mixers": {"type": "swa", "window": 16}},
    "data": {"seq_len": 32, "val_fraction": 0.05},
    "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2,
              "save_every": 2, "log_every": 1, "lr": 1e-3, "min_lr": 1e-4},
}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 8} for i in range(40)]
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return path


@pytest.fixture
def config(tmp_path, corpus):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["source"] = str(corpus)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_info_lists_versions_and_mixers(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"longreach", "torch", "transformers", "devices", "mixers", "fla-core", "recurrence path"} <= set(info)
    assert {"full", "swa"} <= set(info["mixers"])


def test_train_then_generate(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), f"train.out_dir={out}", "train.steps=5"]) == 0
    assert (out / "final" / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 5
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "final"), "--prompt", "The quick", "--max-new-tokens", "7",
                 "--greedy", "--quiet"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("The quick") and len(text.encode()) == len("The quick") + 7


def test_train_resume_continues_to_more_steps(tmp_path, config):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), f"train.out_dir={out}"]) == 0
    assert main(["train", "--config", str(config), f"train.out_dir={out}", "train.steps=6", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    # overrides work on either side of --resume (it takes an optional PATH)
    assert main(["train", "--config", str(config), f"train.out_dir={out}", "--resume", "train.steps=8"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8


def test_tokenizer_train(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("the lazy dog", add_special_tokens=False)) == "the lazy dog"


def test_demo_shows_the_length_generalization_gap(tmp_path, capsys):
    # the shipped checkpoints at L and 8L: GCA retrieves the key, the sliding window (window 64)
    # cannot see a needle hundreds of tokens back
    from longreach.demo import run_demo

    out = tmp_path / "demo"
    plan = {1: ((0.1, 0.3), 1), 8: ((0.2, 0.5), 1)}
    assert run_demo(out_dir=str(out), plan=plan, progress=False) == 0
    text = capsys.readouterr().out
    assert "GCA" in text and "sliding window" in text and "4k = 8L" in text
    # the expected time is printed before the first prompt: 2 models x 2 conditions x 4 prompts
    assert "37K prompt tokens, about" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    assert "held-out" in text and "in-distribution" in text
    gca = summary["results"]["gca-tiny"]["in-distribution"]
    swa = summary["results"]["swa-tiny"]["in-distribution"]
    assert gca["512"]["exact_match"] == 1.0 and gca["4096"]["exact_match"] == 1.0
    assert swa["4096"]["exact_match"] == 0.0
    held_out = summary["results"]["gca-tiny"]["held-out"]["4096"]
    assert held_out["n"] == 2 and 0.0 <= held_out["exact_match"] <= 1.0
    assert summary["conditions"]["held-out"] == {"options": {"split": "heldout"}, "haystack": "heldout"}
    assert (out / "passkey_heatmap.png").stat().st_size > 0
    # a second demo replaces its own earlier run, but never a folder it did not make
    assert run_demo(out_dir=str(out), plan={1: ((0.5,), 1)}, progress=False) == 0
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(ValueError, match="not made by the demo"):
        run_demo(out_dir=str(other), plan=plan, progress=False)


def test_demo_spends_one_prompt_on_the_baselines_known_zeros():
    # from 64L on the sliding window (window 64) reads one prompt per condition; GCA all of them
    from longreach.demo import _FULL, _cell_plan, _prompt_tokens

    assert _cell_plan("gca-tiny", 64, _FULL) == ((0.1, 0.3, 0.5, 0.7, 0.9), 1)
    assert _cell_plan("swa-tiny", 8, _FULL) == ((0.1, 0.3, 0.5, 0.7, 0.9), 2)
    assert _cell_plan("swa-tiny", 64, _FULL) == ((0.5,), 1)
    assert _cell_plan("swa-tiny", 1000, _FULL) == ((0.7,), 1)
    assert _prompt_tokens("swa-tiny", {1: ((0.5,), 3), 64: ((0.1, 0.9), 2)}) == 512 * 3 + 512 * 64


def test_demo_retrains_with_the_recipes(tmp_path):
    from longreach.demo import train_demo_models

    paths = train_demo_models(tmp_path, ["train.steps=1", "train.batch_size=1", "train.eval_batches=1"])
    assert sorted(paths) == ["gca-tiny", "swa-tiny"]
    for name, path in paths.items():
        assert (path / "model.safetensors").exists()
        # the second stage starts from the first stage's weights at the lower learning rate
        assert (tmp_path / f"{name}-stage1" / "final" / "model.safetensors").exists()
        recipe = yaml.safe_load((path.parent / "config.yaml").read_text())
        assert recipe["train"]["init_from"] == str(tmp_path / f"{name}-stage1" / "final")
        assert recipe["train"]["lr"] == 1e-3


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not found"):
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "stepz" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "longreach.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("train", "generate", "tokenizer", "info", "demo"):
        assert command in proc.stdout


def test_train_module_mixes_in_passkey_without_the_cli(tmp_path, config):
    # the passkey training task is registered by longreach.data, so `python -m longreach.train`
    # (and torchrun) find it without importing the evaluation package
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["synthetic"] = {"task": "passkey", "fraction": 0.5}
    cfg["data"]["seq_len"] = 512
    cfg["train"].update(steps=1, eval_every=1, save_every=1)
    path = tmp_path / "passkey.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = ("import sys; from longreach.train.__main__ import main; rc = main(sys.argv[1:]); "
            "print([m for m in sys.modules if m.startswith('longreach.eval')]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(path),
                           f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from longreach.runtime import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"longreach {__version__}"
    proc = subprocess.run([sys.executable, "-m", "longreach", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("train", "finetune", "generate", "tokenizer", "eval", "report", "bench", "info", "demo"):
        assert command in proc.stdout


def test_errors_a_user_can_fix_are_one_line(tmp_path, config, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), f"train.out_dir={out}", "train.steps=2"]) == 0
    capsys.readouterr()
    # re-running a finished run without --resume
    assert main(["train", "--config", str(config), f"train.out_dir={out}", "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longreach train: error:") and "\n" not in err and "Traceback" not in err
    # a parquet corpus without pyarrow
    import importlib.util

    parquet = tmp_path / "docs.parquet"
    parquet.write_bytes(b"not read")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert main(["train", "--config", str(config), f"train.out_dir={tmp_path / 'p'}",
                 f"data.source={parquet}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'longreach[data]'" in err and "\n" not in err


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    import longreach.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "longreach info: interrupted"



@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_tokenizer_folder_gets_the_umask_mode(tmp_path, corpus, umask):
    import os
    import stat

    out = tmp_path / "tok"
    before = os.umask(umask)
    try:
        for _ in range(2):  # a new folder, then one that replaces it
            assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
                         "--out", str(out)]) == 0
            assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
            assert stat.S_IMODE((out / "tokenizer.json").stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(before)


def test_cpu_recipe_too_big_warns_in_one_line(tmp_path, config, capsys, monkeypatch):
    from longreach.train import trainer

    monkeypatch.setattr(trainer, "CPU_TOKENS_PER_STEP", 100)  # the tiny recipe: 64 per step
    base = ["train", "--config", str(config), "train.device=cpu", "train.steps=1",
            "train.eval_batches=0"]
    assert main([*base, f"train.out_dir={tmp_path / 'small'}"]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert main([*base, "train.grad_accum=2", f"train.out_dir={tmp_path / 'big'}"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 128 tokens per optimizer step")
    assert "on the CPU" in lines[0] and "under 100" in lines[0]


def test_autotune_env_var(monkeypatch, capsys):
    """LONGREACH_AUTOTUNE=first holds Triton's first-config autotuning over a whole command;
    a value that is not a mode is a one-line error."""
    from longreach.cli import _autotune_from_env
    from longreach.ops import backend

    monkeypatch.setenv("LONGREACH_AUTOTUNE", "bogus")
    assert main(["info"]) == 2
    assert "LONGREACH_AUTOTUNE='bogus': use first or full" in capsys.readouterr().err
    pytest.importorskip("triton")
    for mode, depth in (("first", 1), ("full", 0)):
        monkeypatch.setenv("LONGREACH_AUTOTUNE", mode)
        with _autotune_from_env():
            assert backend._first_config_depth == depth
    assert backend._first_config_depth == 0  # restored after the command
