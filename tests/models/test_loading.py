"""Loading a model folder: broken or missing files are one line naming the file (rc 2 from
the CLI, no traceback), a folder without a tokenizer asks for --tokenizer, and a shipped
checkpoint's name resolves to it."""

import json
import shutil

import pytest
import torch

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cli import main
from longreach.data import byte_tokenizer
from longreach.models.loading import (
    ModelFolderError,
    check_model_folder,
    load_model_and_tokenizer,
    resolve_model_dir,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny longreach model folder with the byte tokenizer."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    config = LongReachConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             mixers={"type": "swa", "window": 32})
    LongReachForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def model(saved, tmp_path):
    """A fresh copy of ``saved`` that a test may damage."""
    return shutil.copytree(saved, tmp_path / "model")


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def generate(model, *extra):
    return main(["generate", "--model", str(model), "--prompt", "The", "--max-new-tokens", "3",
                 "--greedy", "--quiet", "--device", "cpu", *extra])


def evaluate(model, tmp_path, task="passkey", *extra):
    grid = {"passkey": ["--lengths", "256", "--depths", "0.5"],
            "ppl": ["--lengths", "256", "--bucket", "128"],
            "effrem": ["--T", "64", "--points", "2"]}[task]
    return main(["eval", task, "--model", str(model), *grid, "--samples", "1", "--quiet",
                 "--device", "cpu", "--out", str(tmp_path / f"eval-{task}"), *extra])


def one_error_line(capsys, command) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"longreach {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_truncated_weights_name_the_file(model, tmp_path, capsys, command):
    truncate(model / "model.safetensors")
    rc = generate(model) if command == "generate" else evaluate(model, tmp_path)
    assert rc == 2
    line = one_error_line(capsys, command)
    assert f"{model / 'model.safetensors'} is unreadable" in line and "save the model again" in line
    assert not (tmp_path / "eval-passkey").exists()  # refused before a run folder is made


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_or_missing_config_names_the_file(model, tmp_path, capsys, command):
    run = (lambda: generate(model)) if command == "generate" else (lambda: evaluate(model, tmp_path))
    (model / "config.json").write_text('{"model_type": "longreach", ')
    assert run() == 2
    assert f"{model / 'config.json'} is not valid JSON" in one_error_line(capsys, command)
    (model / "config.json").unlink()
    assert run() == 2
    assert f"{model / 'config.json'} is missing" in one_error_line(capsys, command)


def test_missing_weights_and_shards(model):
    weights = model / "model.safetensors"
    weights.rename(model / "model-00001-of-00001.safetensors")
    with pytest.raises(ModelFolderError, match="model.safetensors is missing: .* holds no weights"):
        check_model_folder(model)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors is missing"):
        check_model_folder(model)


def test_broken_tokenizer_names_the_file(model, capsys):
    (model / "tokenizer.json").write_text('{"version": ')
    assert generate(model) == 2
    assert f"{model / 'tokenizer.json'} is not valid JSON" in one_error_line(capsys, "generate")


def test_weights_without_a_tokenizer_need_the_tokenizer_flag(model, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    for task in ("passkey", "ppl", "effrem"):
        assert evaluate(model, tmp_path, task) == 2
        line = one_error_line(capsys, "eval")
        assert f"{model} holds no tokenizer" in line and "--tokenizer byte" in line
        assert not (tmp_path / f"eval-{task}").exists()
    for task in ("passkey", "ppl", "effrem"):
        assert evaluate(model, tmp_path, task, "--tokenizer", "byte") == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / f"eval-{task}" / "summary.json").read_text())
        assert summary["config"]["tokenizer"] == "byte" and summary["evaluated"] == 1
    # a tokenizer folder works too; generate takes the same flag
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    assert evaluate(model, tmp_path / "dir", "passkey", "--tokenizer", str(tmp_path / "tok")) == 0
    capsys.readouterr()
    assert generate(model, "--tokenizer", "byte") == 0
    assert capsys.readouterr().out.startswith("The")


def test_a_saved_tokenizer_is_still_the_default(saved, tmp_path):
    loaded, tok = load_model_and_tokenizer(saved)
    assert isinstance(loaded, LongReachForCausalLM) and len(tok) == 259
    assert evaluate(saved, tmp_path) == 0
    config = json.loads((tmp_path / "eval-passkey" / "summary.json").read_text())["config"]
    assert "tokenizer" not in config  # earlier runs' folders (no such key) still resume


def test_shipped_checkpoints_by_name(tmp_path, monkeypatch, capsys, saved):
    from longreach.checkpoints import checkpoint_path

    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("gca-tiny") == checkpoint_path("gca-tiny")
    assert generate("gca-tiny") == 0
    assert capsys.readouterr().out.startswith("The")
    assert evaluate("swa-tiny", tmp_path, "passkey") == 0
    summary = json.loads((tmp_path / "eval-passkey" / "summary.json").read_text())
    assert summary["config"]["model"] == str(checkpoint_path("swa-tiny"))
    # a folder of that name in the current directory wins
    shutil.copytree(saved, tmp_path / "gca-tiny")
    truncate(tmp_path / "gca-tiny" / "model.safetensors")
    assert generate("gca-tiny") == 2
    assert "gca-tiny/model.safetensors is unreadable" in one_error_line(capsys, "generate")
    assert str(checkpoint_path("gca-tiny")) not in capsys.readouterr().err
    with pytest.raises(ModelFolderError, match="'nope' not found .*gca-tiny, swa-tiny"):
        resolve_model_dir("nope")
