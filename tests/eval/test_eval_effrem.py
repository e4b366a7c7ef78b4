"""Effective Remembrance: the TV definition, the cut-point grid, the run and its command."""

import json

import pytest
import torch

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cli import main
from longreach.data import byte_tokenizer
from longreach.eval import effrem


def _tiny(mixers):
    torch.manual_seed(0)
    config = LongReachConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, mixers=mixers)
    return LongReachForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mamba2")
    _tiny({"type": "mamba2", "state_size": 8, "head_dim": 16, "chunk_size": 8}).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_cut_points():
    ts = effrem.cut_points(4096, 16)
    assert ts[0] == 0 and ts[1] == 1 and ts[-1] == 4095
    assert ts == sorted(set(ts)) and len(ts) == 17
    assert effrem.cut_points(4, 16) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="T must be"):
        effrem.cut_points(1)


@pytest.mark.parametrize("mixers", ["full", {"type": "mamba2", "state_size": 8, "head_dim": 16,
                                              "chunk_size": 8}])
def test_matches_hand_computed_total_variation(mixers):
    model = _tiny(mixers)
    ids = torch.randint(0, 259, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    ts = [0, 1, 5, 20, 39]
    values = effrem.effective_remembrance(model, ids, ts, prefill_chunk=6)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        for t, value in zip(ts, values, strict=True):
            q = torch.softmax(model(torch.tensor([ids[t:]])).logits[0, -1].double(), -1)
            assert value == pytest.approx(0.5 * float((p - q).abs().sum()), abs=1e-5)
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) > 1e-4
    with pytest.raises(ValueError, match="cut points"):
        effrem.effective_remembrance(model, ids, [40])


def test_a_prefix_goes_in_front_of_every_cut():
    model = _tiny("full")
    ids = list(range(65, 95))
    with_bos = effrem.effective_remembrance(model, ids, [0, 10], prefix=[256])
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[256, *ids]])).logits[0, -1].double(), -1)
        q = torch.softmax(model(torch.tensor([[256, *ids[10:]]])).logits[0, -1].double(), -1)
    assert with_bos[1] == pytest.approx(effrem.total_variation(p, q), abs=1e-6)


def test_run_effrem_writes_and_resumes(model_dir, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(samples=2, points=5, out_dir=out, device="cpu", progress=False)
    summary = effrem.run_effrem(model_dir, 64, **kwargs)
    for name in ("results.jsonl", "summary.json", "summary.csv", "effrem.png", "run.json"):
        assert (out / name).is_file()
    assert [c["t"] for c in summary["cells"]] == effrem.cut_points(64, 5)
    assert all(c["n"] == 2 and 0.0 <= c["effrem"] <= 1.0 for c in summary["cells"])
    assert summary["cells"][0]["effrem"] == pytest.approx(0.0, abs=1e-6)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    means = [sum(r["effrem"][j] for r in records) / 2 for j in range(len(records[0]["t"]))]
    assert [c["effrem"] for c in summary["cells"]] == pytest.approx(means)
    again = effrem.run_effrem(model_dir, 64, **kwargs)
    assert again["evaluated"] == 0 and again["skipped"] == 2
    assert again["cells"] == summary["cells"]


def test_hf_model_folder_and_command(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "cli"
    code = main(["eval", "effrem", "--model", str(folder), "--T", "48", "--points", "4",
                 "--samples", "1", "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0
    assert "effrem T=48" in capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["task"] == "effrem" and saved["T"] == 48
    assert all(0.0 <= c["effrem"] <= 1.0 for c in saved["cells"])
