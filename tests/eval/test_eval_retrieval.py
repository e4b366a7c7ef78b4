"""Retrieval inspection of GCA models: the trace of one forward, its table and heatmap, and
``longreach inspect retrieval`` with its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from longreach.cli import main
from longreach.data import byte_tokenizer
from longreach.eval.retrieval import (
    min_tokens,
    plot_retrieval,
    retrieval_table,
    shown_chunks,
    trace_retrieval,
)
from longreach.models import LongReachConfig, LongReachForCausalLM
from longreach.models.gca import GCAConfig, GCAForCausalLM
from longreach.models.gca.retrieval import record_retrieval

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n"


def tiny_gca(landmark: str = "cls") -> GCAForCausalLM:
    torch.manual_seed(0)
    cfg = GCAConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=260,
        mixers=[{"type": "swa", "window": 16}, {"type": "gca", "window": 16}],
        gca={"chunk_size": 16, "top_k": 2, "landmark": landmark},
    )
    return GCAForCausalLM(cfg).eval()


@pytest.mark.parametrize("landmark", ["cls", "token"])
def test_trace_matches_the_recorded_selection(landmark):
    model, tok = tiny_gca(landmark), byte_tokenizer()
    ids = tok.encode(TEXT * 3)
    model.train()  # the trace runs in eval mode (no Gumbel noise) and restores the mode
    trace = trace_retrieval(model, ids)
    assert model.training
    model.eval()
    with torch.no_grad(), record_retrieval(model) as records:
        model(torch.tensor([ids]), use_cache=False)
    torch.testing.assert_close(trace.indices[0], records[0].indices[0])
    torch.testing.assert_close(trace.weights[0], records[0].weights[0])
    stack = model.model.gca
    assert trace.n_chunks == stack.chunk_answering(len(ids) - 1) + 1
    assert trace.n_tokens == len(ids) and trace.text_per_chunk == stack.text_per_chunk
    for c in range(trace.n_chunks):
        got = trace.retrieved(c)
        assert all(j <= c - 2 for j, _ in got)
        if got:
            assert sum(w for _, w in got) == pytest.approx(1.0, abs=1e-5)
            assert [trace.rank(c, j) for j, _ in got] == sorted(trace.rank(c, j) for j, _ in got)
        start, end = trace.token_span(c)
        assert all(trace.chunk_of_token(n) == c for n in range(start, end))
    grid = trace.weight_matrix()
    assert grid.shape == (trace.n_chunks, trace.n_chunks)
    assert torch.allclose(grid.sum(1)[2:], torch.ones(trace.n_chunks - 2), atol=1e-5)
    assert trace.rank(3, 3) is None  # not visible to its own query


def test_table_rows_name_chunks_with_their_text(tmp_path):
    model, tok = tiny_gca(), byte_tokenizer()
    ids = tok.encode(TEXT * 3)
    trace = trace_retrieval(model, ids)
    rows = retrieval_table(trace, tok, ids, width=200)
    assert [r["chunk"] for r in rows] == list(range(2, trace.n_chunks))
    row = rows[-1]
    start, end = row["tokens"]
    assert row["text"] == tok.decode(ids[start:end]).replace("\n", "\\n")
    for got in row["retrieved"]:
        a, b = trace.token_span(got["chunk"])
        assert got["text"] == tok.decode(ids[a:b]).replace("\n", "\\n")
        assert 0 < got["weight"] <= 1 and got["rank"] >= 1
    assert [r["chunk"] for r in retrieval_table(trace, tok, ids, rows=3)] == shown_chunks(trace, 3)
    assert shown_chunks(trace, 3)[-1] == trace.n_chunks - 1 and len(shown_chunks(trace, 3)) == 3
    path = plot_retrieval(trace, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "r.png"]  # no temporary left


def test_trace_refuses_short_input_and_other_models():
    model = tiny_gca()
    need = min_tokens(model.model.gca)
    assert need == 33
    with pytest.raises(ValueError, match="has 32 tokens; retrieval needs at least 33"):
        trace_retrieval(model, torch.zeros(32, dtype=torch.long))
    trace_retrieval(model, torch.zeros(33, dtype=torch.long))
    other = LongReachForCausalLM(LongReachConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 vocab_size=260, mixers=["swa"]))
    with pytest.raises(ValueError, match="is not a GCA model .*needs gca layers"):
        trace_retrieval(other, torch.zeros(40, dtype=torch.long))


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def gca_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gca-model")
    tiny_gca("token").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_inspect_retrieval_prints_and_writes(gca_folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 6)
    out = tmp_path / "out"
    argv = ["inspect", "retrieval", "--model", str(gca_folder), "--text", str(text),
            "--out", str(out), "--rows", "4", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    words = " ".join(printed.split())  # the table's title wraps on a narrow console
    assert "retrieval of" in words and "4 query chunks shown" in words
    assert f"wrote {out / 'retrieval.png'}" in printed
    assert (out / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "retrieval.json").read_text())
    n_tokens = len(byte_tokenizer().encode(TEXT * 6))
    assert record["n_tokens"] == n_tokens and record["landmark"] == "token"
    assert record["command"].startswith("longreach inspect retrieval")
    chunks = record["groups"][0]["chunks"]
    assert len(chunks) == record["n_chunks"] and chunks[0]["retrieved"] == []
    assert all(len(c["retrieved"]) == 2 for c in chunks[4:])
    assert [r["chunk"] for r in record["table"]] == list(range(2, record["n_chunks"]))
    # --max-tokens keeps the first N tokens
    assert main([*argv, "--max-tokens", "40"]) == 0
    assert json.loads((out / "retrieval.json").read_text())["n_tokens"] == 40


def test_inspect_retrieval_errors_are_one_line(gca_folder, tmp_path, capsys):
    other = tmp_path / "swa"
    LongReachForCausalLM(LongReachConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=260, mixers=["swa"])).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    text, empty, short = tmp_path / "t.txt", tmp_path / "empty.txt", tmp_path / "short.txt"
    text.write_text(TEXT * 3)
    empty.write_text("  \n")
    short.write_text("x" * 30)
    cases = [
        (other, text, "is not a GCA model (model_type 'longreach'); retrieval inspection needs gca layers"),
        (gca_folder, empty, "is empty"),
        (gca_folder, short, "has 30 tokens; retrieval needs at least 31"),
        (gca_folder, tmp_path / "missing.txt", "text file not found"),
    ]
    for model, path, message in cases:
        argv = ["inspect", "retrieval", "--model", str(model), "--text", str(path),
                "--out", str(tmp_path / "out"), "--device", "cpu"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("longreach inspect: error: ")
        assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_chunk_memory_host_check_and_disk_option(gca_folder, tmp_path, monkeypatch):
    from longreach.eval import runner

    model, _ = runner.load_model(gca_folder, device="cpu", dtype="float32")
    # chunk keys and values: 1 kv head x 16 dims, K + V, 4 bytes, per token in host memory
    assert model.host_cache_bytes_per_token() == 2 * 16 * 4
    disk, _ = runner.load_model(gca_folder, device="cpu", dtype="float32",
                                memory=f"disk:{tmp_path / 'chunks'}")
    assert disk.host_cache_bytes_per_token() == 0
    monkeypatch.setattr(runner, "available_memory", lambda device: 20_000)
    # 1,024 tokens x 128 bytes of host memory > 90% of 20,000 bytes: refused, disk suggested
    with pytest.raises(runner.InsufficientMemoryError, match="--memory disk:PATH"):
        runner.run_eval("passkey", gca_folder, [1024], [0.5], samples=1,
                        out_dir=tmp_path / "a", progress=False)
    summary = runner.run_eval("passkey", gca_folder, [1024], [0.5], samples=1,
                              out_dir=tmp_path / "b", progress=False,
                              memory=f"disk:{tmp_path / 'chunks'}")
    assert summary["evaluated"] == 1
    import gc

    gc.collect()
    assert not list((tmp_path / "chunks").iterdir())  # the eval's chunk files are gone
    with pytest.raises(ValueError, match="'cpu', 'device' or 'disk:PATH'"):
        runner.run_eval("passkey", gca_folder, [1024], [0.5], samples=1,
                        out_dir=tmp_path / "c", progress=False, memory="disk")
    assert not (tmp_path / "c").exists()  # refused before a run folder is made


def test_memory_option_needs_a_gca_model(tmp_path):
    from longreach.eval import runner

    folder = tmp_path / "swa"
    cfg = LongReachConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, vocab_size=260,
                          mixers=[{"type": "swa", "window": 16}])
    LongReachForCausalLM(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match="is for GCA models"):
        runner.load_model(folder, device="cpu", memory="cpu")


CODE = '''import os


def load_table(path):
    return open(path).read()


class Reader:
    def parse_rows(self, text):
        return text.split()

    def run(self):
        rows = self.parse_rows(load_table("x"))
        return rows


def helper(x):  # defined twice below: ambiguous, not counted
    return x


def helper(y):
    return load_table(y)
'''


def test_find_call_sites_pairs_calls_with_unique_definitions():
    from longreach.eval.call_sites import find_call_sites

    sites = find_call_sites(CODE)
    names = [(s.name, CODE[s.call : s.call + len(s.name) + 1]) for s in sites]
    assert names == [("parse_rows", "parse_rows("), ("load_table", "load_table("),
                     ("load_table", "load_table(")]
    assert all(CODE[s.definition :].lstrip().startswith(f"def {s.name}(") for s in sites)
    assert all(s.definition < s.call for s in sites)
    assert find_call_sites(CODE, max_calls=1)[-1].name == "load_table"  # one call per name
    assert len([s for s in find_call_sites(CODE, max_calls=1) if s.name == "load_table"]) == 1


def test_call_site_retrieval_counts_retrieved_definitions(gca_folder, tmp_path):
    from longreach.eval import runner
    from longreach.eval.call_sites import (
        call_site_retrieval,
        read_code_documents,
        write_call_sites,
    )

    model, tok = runner.load_model(gca_folder, device="cpu", dtype="float32")
    filler = "".join(f"    value_{i} = compute({i})\n" for i in range(40))
    text = "def target_function(a):\n    return a\n\n\ndef body():\n" + filler + \
        "    return target_function(3)\n"
    result = call_site_retrieval(model, tok, [text], max_tokens=4096, min_distance=64)
    assert result["call_sites"] == 1
    (record,) = result["records"]
    assert record["definition_chunk"] == 0 and record["query_chunk"] > 2
    assert record["in_topk"] == (0 in record["retrieved"])
    assert 0 < result["chance_in_topk"] <= 1 and record["rank"] >= 1
    # too close for the distance: none left
    assert call_site_retrieval(model, tok, [text], min_distance=10_000)["call_sites"] == 0
    path = write_call_sites(result, tmp_path / "o", {"model": "m"})
    assert json.loads(path.read_text())["call_sites"] == 1
    corpus = tmp_path / "code.jsonl"
    corpus.write_text(json.dumps({"text": "no functions here"}) + "\n"
                      + json.dumps({"text": text}) + "\n")
    assert read_code_documents(corpus, 5) == [text]
    (tmp_path / "prose.jsonl").write_text(json.dumps({"text": "just prose"}) + "\n")
    with pytest.raises(ValueError, match="no Python function definitions"):
        read_code_documents(tmp_path / "prose.jsonl", 2)
