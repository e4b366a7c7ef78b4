"""The eval runner and the ``eval`` subcommand, end to end on tiny untrained models."""

import argparse
import json
import re

import pytest
import torch

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.data import byte_tokenizer
from longreach.eval import runner
from longreach.eval.command import add_eval_parser, parse_length, parse_lengths


def _save_model(folder, mixers):
    torch.manual_seed(0)
    config = LongReachConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             mixers=mixers)
    LongReachForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("swa"), {"type": "swa", "window": 32})


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("full"), "full")


def _count_calls(monkeypatch):
    calls = []
    real = runner.generate_answer

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_answer", counting)
    return calls


def test_run_eval_end_to_end_and_resume(swa_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = _count_calls(monkeypatch)
    kwargs = dict(depths=[0, 1], seed=0, out_dir=out, progress=False, prefill_chunk=100)
    summary = runner.run_eval("passkey", swa_model, [256, 512], samples=2, **kwargs)
    assert len(calls) == 8 and summary["evaluated"] == 8 and summary["skipped"] == 0
    for name in ("results.jsonl", "summary.json", "summary.csv", "heatmap.png", "run.json"):
        assert (out / name).is_file()
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = runner.read_results(out)
    assert len(records) == 8
    assert {(r["length"], r["depth"], r["index"]) for r in records} == {
        (n, d, i) for n in (256, 512) for d in (0, 1) for i in (0, 1)}
    for r in records:
        assert abs(r["prompt_tokens"] - r["length"]) <= 0.01 * r["length"]
        assert set(r["scores"]) == {"exact_match", "contains", "recall", "first_token"}
        assert r["score"] == r["scores"]["exact_match"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["metric"] == "exact_match" and len(saved["cells"]) == 4
    assert all(cell["n"] == 2 for cell in saved["cells"])
    assert {"torch", "transformers", "longreach", "python"} <= set(saved["versions"])
    assert "run_eval('passkey'" in saved["command"]
    csv_text = (out / "summary.csv").read_text()
    assert csv_text.startswith("# command:") and "length,depth,n," in csv_text

    # the same command again: nothing is re-run, nothing is appended
    before = (out / "results.jsonl").read_text()
    summary = runner.run_eval("passkey", swa_model, [256, 512], samples=2, **kwargs)
    assert len(calls) == 8 and summary["evaluated"] == 0 and summary["skipped"] == 8
    assert (out / "results.jsonl").read_text() == before
    # more samples per cell: only the new ones run
    summary = runner.run_eval("passkey", swa_model, [256, 512], samples=3, **kwargs)
    assert len(calls) == 12 and summary["evaluated"] == 4
    assert all(cell["n"] == 3 for cell in summary["cells"])


def test_resume_after_torn_line(swa_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    kwargs = dict(depths=[0.5], samples=2, out_dir=out, progress=False)
    runner.run_eval("copy", swa_model, [512], **kwargs)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    # a run killed while writing its second sample
    (out / "results.jsonl").write_text(lines[0] + lines[1][:40])
    calls = _count_calls(monkeypatch)
    summary = runner.run_eval("copy", swa_model, [512], **kwargs)
    assert len(calls) == 1 and summary["cells"][0]["n"] == 2


def test_perfect_answers_score_one(swa_model, tmp_path, monkeypatch):
    tok = byte_tokenizer()

    def oracle(model, prompt_ids, max_new_tokens, **kwargs):
        key = re.search(r"The pass key is (\d+)\.", tok.decode(prompt_ids)).group(1)
        return tok.encode(f" {key}. The grass", add_special_tokens=False)[:max_new_tokens]

    monkeypatch.setattr(runner, "generate_answer", oracle)
    summary = runner.run_eval("passkey", swa_model, [512], [0.0, 0.5, 1.0], samples=2,
                              out_dir=tmp_path, progress=False, max_new_tokens=12)
    assert summary["overall"] == 1.0
    assert all(c["exact_match"] == 1.0 and c["first_token"] == 1.0 for c in summary["cells"])


def test_segmented_prefill_matches_one_pass(swa_model):
    model, tok = runner.load_model(swa_model, device="cpu", dtype="float32")
    ids = tok.encode("In the beginning God created the heaven and the earth. " * 3)
    whole = runner.generate_answer(model, ids, 8, prefill_chunk=4096)
    pieces = runner.generate_answer(model, ids, 8, prefill_chunk=7)
    assert len(whole) == 8 and whole == pieces
    with torch.no_grad():  # the same greedy tokens as the plain forward pass
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert whole[0] == int(logits.argmax())


def test_memory_check(swa_model, full_model, tmp_path, monkeypatch):
    full, _ = runner.load_model(full_model, device="cpu")
    swa, _ = runner.load_model(swa_model, device="cpu")
    # 2 layers x (K + V) x 2 heads x 16 dims x 4 bytes + the int64 position, per layer
    assert runner.cache_bytes_per_token(full) == 2 * (2 * 2 * 16 * 4 + 8)
    assert runner.cache_bytes_per_token(swa) == 0  # bounded: never refused
    monkeypatch.setattr(runner, "available_memory", lambda device: 10_000)
    with pytest.raises(runner.InsufficientMemoryError, match="--force"):
        runner.run_eval("passkey", full_model, [512], [0.5], samples=1, out_dir=tmp_path / "a",
                        progress=False)
    summary = runner.run_eval("passkey", full_model, [512], [0.5], samples=1,
                              out_dir=tmp_path / "b", progress=False, force=True)
    assert summary["evaluated"] == 1
    summary = runner.run_eval("passkey", swa_model, [512], [0.5], samples=1,
                              out_dir=tmp_path / "c", progress=False)
    assert summary["evaluated"] == 1


def test_bad_arguments(swa_model, tmp_path):
    def run(task="passkey", model=swa_model, lengths=(512,), depths=(0.5,), **kw):
        return runner.run_eval(task, model, lengths, depths, samples=1, out_dir=tmp_path / "x",
                               progress=False, **kw)

    with pytest.raises(ValueError, match="too short"):
        run(lengths=(64,))
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        run(depths=(0.5, 1.2))
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        run(task="nope")
    with pytest.raises(ValueError, match="unknown option"):
        run(options={"colour": "red"})
    with pytest.raises(ValueError, match="not a model folder"):
        run(model=tmp_path)
    with pytest.raises(ValueError, match="samples"):
        runner.run_eval("passkey", swa_model, [512], samples=0, out_dir=tmp_path / "y")
    run(seed=0)
    with pytest.raises(ValueError, match="different run"):
        run(seed=1)  # the same folder holds seed 0's results


def test_parse_lengths():
    assert parse_lengths("1k,4k,16k") == [1024, 4096, 16384]
    assert parse_length("1m") == 1048576 and parse_length("1M") == 1048576
    assert parse_length("1.5k") == 1536 and parse_length("300") == 300
    for bad in ("abc", "0", "-1k", "1.3"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_cli_subcommand(swa_model, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="longreach")
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args([
        "eval", "passkey", "--model", str(swa_model), "--lengths", "256", "--depths", "0,1",
        "--samples", "1", "--seed", "3", "--out", str(out), "--digits", "3", "--quiet",
        "--haystack", "noise",
    ])
    assert args.command == "eval"
    assert args.func(args) == 0
    records = runner.read_results(out)
    assert len(records) == 2 and all(len(r["answer"]) == 3 for r in records)
    assert all(r["metadata"]["haystack"] == "noise" and r["seed"] == 3 for r in records)
    assert "overall exact_match" in capsys.readouterr().out
    args = parser.parse_args(["eval", "niah", "--model", str(swa_model), "--out", str(out),
                              "--digits", "3"])
    with pytest.raises(ValueError, match="--digits"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "unknown-task", "--model", "m", "--out", "o"])
