"""Position-bucketed perplexity: streamed loss, buckets, documents, resume, command."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cli import main
from longreach.data import byte_tokenizer
from longreach.eval import ppl

MIXERS = {
    "mamba2": {"type": "mamba2", "state_size": 8, "head_dim": 16, "chunk_size": 8},
    "swa": {"type": "swa", "window": 16},
}


def _tiny(mixers):
    torch.manual_seed(0)
    config = LongReachConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, mixers=mixers)
    return LongReachForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mamba2")
    _tiny(MIXERS["mamba2"]).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _one_pass_nll(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").double()


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_streamed_nll_equals_one_forward(name):
    model = _tiny(MIXERS[name])
    ids = torch.randint(0, 259, (101,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = _one_pass_nll(model, ids)
    for chunk in (7, 32, 1000):  # segments shorter than, across and longer than the window
        pieces = list(ppl.stream_nll(model, ids, prefill_chunk=chunk))
        assert [first for first, _ in pieces] == [1] + list(range(chunk, 101, chunk))[: len(pieces) - 1]
        streamed = torch.cat([nll for _, nll in pieces]).double()
        assert streamed.shape == reference.shape
        torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-4)

    sums, counts = ppl.bucket_nll(model, ids, 25, prefill_chunk=9)
    assert counts == [24, 25, 25, 25, 1]  # position 0 has no prediction; 101 = 4 * 25 + 1
    expected = [float(reference[max(k * 25 - 1, 0) : (k + 1) * 25 - 1].sum()) for k in range(5)]
    assert sums == pytest.approx(expected, rel=1e-4)
    assert math.exp(sum(sums) / sum(counts)) == pytest.approx(
        math.exp(float(reference.mean())), rel=1e-4)


def test_context_windows_cover_every_position_once():
    for length, limit in ((101, 16), (101, 17), (16, 16), (10, 16), (33, 2)):
        windows = ppl.context_windows(length, limit)
        scored = [p for s, e, f in windows for p in range(f, e)]
        assert scored == list(range(1, length))
        for s, e, f in windows:
            assert e - s <= limit and s <= f - 1
            if s:  # past the first window, every position sees limit // 2 .. limit - 1 tokens
                assert all(limit // 2 <= p - s <= limit - 1 for p in range(f, e))
    with pytest.raises(ValueError, match="max_context"):
        ppl.context_windows(10, 1)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_window_nll_is_each_window_on_its_own(name):
    model = _tiny(MIXERS[name])
    ids = torch.randint(0, 259, (101,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = torch.full((101,), float("nan"), dtype=torch.float64)
    for s, e, f in ppl.context_windows(101, 24):
        expected[f:e] = _one_pass_nll(model, ids[s:e])[f - s - 1 :]
    for batch_tokens in (24, 10_000):  # one window per batch; all of one length together
        got = torch.full((101,), float("nan"), dtype=torch.float64)
        for first, nll in ppl.window_nll(model, ids, 24, batch_tokens=batch_tokens):
            assert torch.isnan(got[first : first + len(nll)]).all()  # each position once
            got[first : first + len(nll)] = nll.double()
        torch.testing.assert_close(got[1:], expected[1:], rtol=1e-4, atol=1e-4)
    # inside the first window the control is the full-context loss; past it, it differs
    full = torch.cat([n for _, n in ppl.stream_nll(model, ids)]).double()
    torch.testing.assert_close(got[1:24], full[:23], rtol=1e-4, atol=1e-4)
    if name == "swa":  # past 24, some positions see fewer than the 16 tokens of its window
        assert (got[24:] - full[23:]).abs().max() > 1e-2


def test_long_document_concatenates_and_is_a_prefix(tmp_path):
    tok = byte_tokenizer()
    short = ppl.long_document(tok, 300, seed=3, index=1)
    long = ppl.long_document(tok, 9000, seed=3, index=1)
    assert len(short.ids) == 300 and len(long.ids) == 9000
    assert long.ids[:300] == short.ids and long.first_document == short.first_document
    assert long.documents > 1  # built-in documents are chapters of a few thousand bytes
    assert ppl.long_document(tok, 300, seed=3, index=2).ids != short.ids
    book = tmp_path / "book.txt"
    book.write_text("First paragraph here.\n\nSecond one.\n")
    with pytest.raises(ValueError, match="only"):
        ppl.long_document(tok, 500, haystack=str(book))
    with pytest.raises(ValueError, match="does not exist"):
        ppl.long_document(tok, 50, haystack=str(tmp_path / "missing.txt"))


def test_run_ppl_summary_matches_one_forward_and_resumes(model_dir, tmp_path, monkeypatch):
    calls = []
    real = ppl.bucket_nll
    monkeypatch.setattr(ppl, "bucket_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    kwargs = dict(bucket=128, seed=0, out_dir=out, device="cpu", prefill_chunk=100,
                  progress=False)
    summary = ppl.run_ppl(model_dir, [300, 512], samples=2, **kwargs)
    assert len(calls) == 4 and summary["evaluated"] == 4
    for name in ("results.jsonl", "summary.json", "summary.csv", "ppl.png", "run.json"):
        assert (out / name).is_file()
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert "documents_per_sample" in summary["totals"][0] and summary["note"]

    # the 512-token cells pool both documents; check them against plain forward passes
    model = LongReachForCausalLM.from_pretrained(model_dir).eval()
    tok = byte_tokenizer()
    nlls = [_one_pass_nll(model, ppl.long_document(tok, 512, seed=0, index=i).ids)
            for i in range(2)]
    cells = [c for c in summary["cells"] if c["length"] == 512]
    assert [(c["start"], c["end"], c["tokens"]) for c in cells] == [
        (0, 128, 254), (128, 256, 256), (256, 384, 256), (384, 512, 256)]
    for k, cell in enumerate(cells):
        pooled = torch.cat([n[max(k * 128 - 1, 0) : (k + 1) * 128 - 1] for n in nlls])
        assert cell["ppl"] == pytest.approx(math.exp(float(pooled.mean())), rel=1e-4)
    total = [t for t in summary["totals"] if t["length"] == 512][0]
    assert total["ppl"] == pytest.approx(math.exp(float(torch.cat(nlls).mean())), rel=1e-4)
    assert [c["end"] for c in summary["cells"] if c["length"] == 300] == [128, 256, 300]

    # the same command again: nothing recomputed; one more sample: only it runs
    before = (out / "results.jsonl").read_text()
    again = ppl.run_ppl(model_dir, [300, 512], samples=2, **kwargs)
    assert len(calls) == 4 and again["evaluated"] == 0 and again["skipped"] == 4
    assert (out / "results.jsonl").read_text() == before
    assert again["cells"] == summary["cells"]
    more = ppl.run_ppl(model_dir, [300, 512], samples=3, **kwargs)
    assert len(calls) == 6 and more["evaluated"] == 2
    with pytest.raises(ValueError, match="different run"):
        ppl.run_ppl(model_dir, [300], **{**kwargs, "bucket": 64})


def test_run_ppl_max_context_is_its_own_run(model_dir, tmp_path):
    kwargs = dict(bucket=128, seed=0, device="cpu", progress=False)
    full = ppl.run_ppl(model_dir, [512], samples=2, out_dir=tmp_path / "full", **kwargs)
    cut = ppl.run_ppl(model_dir, [512], samples=2, out_dir=tmp_path / "cut", max_context=128,
                      **kwargs)
    assert cut["max_context"] == 128 and full["max_context"] is None
    assert [c["tokens"] for c in cut["cells"]] == [c["tokens"] for c in full["cells"]]
    assert cut["cells"][0]["ppl"] == pytest.approx(full["cells"][0]["ppl"], rel=1e-4)
    records = [json.loads(line) for line in (tmp_path / "cut" / "results.jsonl").open()]
    assert [r["max_context"] for r in records] == [128, 128]
    with pytest.raises(ValueError, match="different run"):  # not resumed as the full run
        ppl.run_ppl(model_dir, [512], samples=2, out_dir=tmp_path / "full", max_context=128,
                    **kwargs)
    with pytest.raises(ValueError, match="max_context"):
        ppl.run_ppl(model_dir, [512], out_dir=tmp_path / "bad", max_context=1, **kwargs)


def test_bad_arguments(model_dir, tmp_path):
    with pytest.raises(ValueError, match="bucket"):
        ppl.run_ppl(model_dir, [512], bucket=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="lengths"):
        ppl.run_ppl(model_dir, [1], out_dir=tmp_path)
    with pytest.raises(ValueError, match="not a model folder"):
        ppl.run_ppl(tmp_path, [512], out_dir=tmp_path / "o")


def test_eval_ppl_command(model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["eval", "ppl", "--model", str(model_dir), "--lengths", "1k", "--bucket", "256",
                 "--samples", "1", "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ppl per 256-token bucket" in printed and "ppl.png" in printed
    saved = json.loads((out / "summary.json").read_text())
    assert saved["task"] == "ppl" and len(saved["cells"]) == 4
    assert saved["command"].startswith("longreach ")  # the command line as typed
