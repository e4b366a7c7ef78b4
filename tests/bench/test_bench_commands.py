"""The measurement commands of ``longreach bench`` beside the attention and recurrence suites:
each one end to end on tiny CPU shapes (no timing is checked)."""

import json

import pytest
import torch

from longreach.cli import main


def test_attention_memory_measures_each_case_in_a_worker(tmp_path, capsys):
    out = tmp_path / "mem" / "m.json"
    assert main(["bench", "attention-memory", "--lengths", "256", "--window", "32", "--heads", "1",
                 "--head-dim", "8", "--cases", "window-reference,full-naive",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["torch"] == torch.__version__
    rows = data["results"]
    assert [r["case"] for r in rows] == ["window-reference", "full-naive"]
    for r in rows:
        assert r["note"] == "" and r["seconds"] > 0 and r["peak_growth_mib"] is not None


def test_cca_cache_holds_fewer_tokens(tmp_path):
    out = tmp_path / "cca.json"
    assert main(["bench", "cca-cache", "--lengths", "256,512", "--full-max", "256",
                 "--segment", "128", "--group-size", "4", "--window", "32", "--skip-check",
                 "--op-lengths", "64", "--op-heads", "1", "--repeats", "1",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["cache"]["rows"]
    assert [r["full_how"] for r in rows] == ["measured", "per-token"]
    assert all(r["cca_tokens_held"] < r["full_tokens_held"] for r in rows)
    assert data["settings"]["group_size"] == 4 and len(data["op"]) == 1


def test_cca_cache_rejects_bad_lengths(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "cca-cache", "--lengths", "4k"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_gca_memory_rows_per_length(tmp_path):
    out = tmp_path / "gca.json"
    assert main(["bench", "gca-memory", "--config", "gca-tiny", "--lengths", "256,512",
                 "--segment", "128", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["rows"]] == [256, 512]
    assert data["dtype"] == "float32" and all(r["finite"] for r in data["rows"])


def test_train_throughput_one_row_per_recipe(tmp_path):
    out = tmp_path / "tt.json"
    assert main(["bench", "train-throughput", "--configs", "swa-tiny", "--seq-len", "64",
                 "--batch-size", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["recipe"] for r in data["results"]] == ["swa-tiny"]
    assert data["results"][0]["seq_len"] == 64 and data["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_host_syncs_needs_cuda(capsys):
    assert main(["bench", "host-syncs", "--recipe", "swa-tiny"]) == 2
    assert "CUDA" in capsys.readouterr().err


def _tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(folder)
    return folder


def test_plugin_decode_rows_per_method_and_length(tmp_path):
    folder = _tiny_llama(tmp_path / "llama")
    out = tmp_path / "pd.json"
    assert main(["bench", "plugin-decode", "--model", str(folder), "--lengths", "96,160",
                 "--segment", "64", "--new-tokens", "2", "--group-size", "4", "--window", "16",
                 "--sinks", "2", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [
        (m, n) for m in ("full", "cca", "streaming", "lm-infinite") for n in (96, 160)]
    by = {(r["method"], r["length"]): r for r in rows}
    # full attention keeps every key (2 layers x k, v x 2 heads x 8 dims x fp32 per token)
    assert by["full", 160]["cache_bytes"] == 160 * 2 * 2 * 2 * 8 * 4
    # the sink caches hold the sinks and window - 1 keys (+ the decoded ones trimmed again)
    assert by["streaming", 160]["cache_bytes"] == (2 + 15) * 2 * 2 * 2 * 8 * 4
    assert by["lm-infinite", 96]["cache_bytes"] == by["lm-infinite", 160]["cache_bytes"]
    assert by["cca", 160]["cache_bytes"] < by["full", 160]["cache_bytes"]
    assert by["cca", 160]["cache_vs_full"] == round(
        by["cca", 160]["cache_bytes"] / by["full", 160]["cache_bytes"], 4)


def test_plugin_decode_times_two_kernel_paths_of_a_method_side_by_side(tmp_path, monkeypatch):
    import importlib

    cca = importlib.import_module("longreach.ops.cca")
    calls = {"sdpa": 0, "reference": 0}
    for name, key in (("sdpa_cca_decode", "sdpa"), ("blocked_cca_decode", "reference")):
        real = getattr(cca, name)
        monkeypatch.setattr(cca, name, lambda *a, _real=real, _key=key, **k:
                            calls.__setitem__(_key, calls[_key] + 1) or _real(*a, **k))
    folder = _tiny_llama(tmp_path / "llama")
    out = tmp_path / "pd.json"
    common = ["bench", "plugin-decode", "--model", str(folder), "--lengths", "96",
              "--segment", "32", "--new-tokens", "2", "--group-size", "4", "--window", "16",
              "--device", "cpu"]
    assert main([*common, "--methods", "cca", "--out", str(out)]) == 0
    assert calls["sdpa"] > 0 and calls["reference"] > 0  # segments vs single-token steps
    segments = dict(calls)
    assert main([*common, "--methods", "cca,cca@cca=reference", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["cca", "cca@cca=reference"]
    assert rows[1]["kernels"] == "cca=reference" and "kernels" not in rows[0]
    assert rows[0]["cache_bytes"] == rows[1]["cache_bytes"]
    # the forced run sent its prefill segments to the reference, not to SDPA
    assert calls["sdpa"] - segments["sdpa"] == segments["sdpa"]
    with pytest.raises(SystemExit, match="cca@nonsense"):
        main([*common, "--methods", "cca@nonsense"])


def test_plugin_decode_reports_the_fastest_of_its_repeats(tmp_path):
    folder = _tiny_llama(tmp_path / "llama")
    out = tmp_path / "pd.json"
    common = ["bench", "plugin-decode", "--model", str(folder), "--lengths", "64",
              "--segment", "32", "--new-tokens", "2", "--methods", "full", "--device", "cpu"]
    assert main([*common, "--repeats", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["settings"]["repeats"] == 3
    assert len(row["prefill_s_runs"]) == len(row["decode_tokens_per_s_runs"]) == 3
    assert row["prefill_s"] == min(row["prefill_s_runs"])
    assert row["decode_tokens_per_s"] == max(row["decode_tokens_per_s_runs"])
    with pytest.raises(SystemExit, match="--repeats"):
        main([*common, "--repeats", "0"])


def test_plugin_decode_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["bench", "plugin-decode", "--model", str(tmp_path), "--device", "cpu"])
