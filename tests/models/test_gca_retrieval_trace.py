"""GCAStack's retrieval recording: records what select_chunks chose in global chunk numbers
(also with offloaded memory, whose indices the model remaps), and costs nothing when off."""

from __future__ import annotations

import pytest
import torch

import longreach.models.gca.retrieval as retrieval
from longreach.models.gca import GCAConfig, GCAForCausalLM
from longreach.models.gca.retrieval import record_retrieval


def tiny(landmark: str, groups: int = 1) -> GCAForCausalLM:
    torch.manual_seed(0)
    gca_layers = [{"type": "gca", "window": 16}] * (2 if groups == 2 else 1)
    cfg = GCAConfig(
        hidden_size=32, num_hidden_layers=1 + len(gca_layers), num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, vocab_size=260,
        mixers=[{"type": "swa", "window": 16}, *gca_layers],
        gca={"chunk_size": 16, "top_k": 2, "landmark": landmark, "retrieval_groups": groups},
    )
    return GCAForCausalLM(cfg).eval()


def spy_on_select(monkeypatch) -> list:
    """Every (indices, weights) select_chunks returns, as [B, nq, K]."""
    seen = []
    real = retrieval.select_chunks

    def spy(*args, **kwargs):
        indices, weights = real(*args, **kwargs)
        seen.append((indices[:, :, 0].clone(), weights[:, :, 0].clone()))
        return indices, weights

    monkeypatch.setattr(retrieval, "select_chunks", spy)
    return seen


@pytest.mark.parametrize("landmark,groups", [("cls", 1), ("token", 1), ("token", 2)])
def test_records_what_select_chunks_chose(monkeypatch, landmark, groups):
    model = tiny(landmark, groups)
    seen = spy_on_select(monkeypatch)
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad(), record_retrieval(model) as records:
        model(ids, use_cache=False)
    assert len(records) == len(seen) == groups
    stack = model.model.gca
    n_chunks = stack.chunk_answering(149) + 1
    for g, (record, (indices, weights)) in enumerate(zip(records, seen)):
        assert record.group == g and record.c_lo == 0
        assert record.indices.shape == (2, n_chunks, 2)
        torch.testing.assert_close(record.indices, indices)
        torch.testing.assert_close(record.weights, weights)
        # the scores: one per chunk in memory, visible only two or more chunks back, and the
        # chosen chunks are the best-scored visible ones
        assert record.scores.shape == (2, n_chunks, stack.stream_start(150) // 16)  # whole chunks
        for c in range(n_chunks):
            row = record.scores[:, c]
            assert torch.isfinite(row[:, : max(c - 1, 0)]).all()
            assert torch.isinf(row[:, max(c - 1, 0) :]).all()
            if c >= 4:  # at least two visible chunks: the top-2 by score
                assert (record.indices[:, c] == row.topk(2).indices).all()
        assert (record.indices[:, :2] == -1).all()  # chunks 0 and 1 have nothing to read


def test_offloaded_memory_records_global_chunk_numbers(monkeypatch):
    """With chunk memory off the device the model reads copies under remapped indices; the
    records still name the chunks of the stream, as one forward with device memory does."""
    model = tiny("token", 2)
    ids = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        with record_retrieval(model) as full:
            model(ids, use_cache=False)
        cache = model.model.new_cache(memory="cpu")
        with record_retrieval(model) as parts:
            for a in range(0, 200, 37):
                model(ids[:, a : a + 37], past_key_values=cache)
    assert len(parts) > len(full)
    remapped_somewhere = False
    for record in parts:
        expect = full[record.group]
        for r in range(record.indices.shape[1]):
            c = record.c_lo + r
            got, want = record.indices[0, r], expect.indices[0, c]
            assert got[got >= 0].tolist() == want[want >= 0].tolist()
            torch.testing.assert_close(record.weights[0, r][got >= 0], expect.weights[0, c][want >= 0],
                                       atol=1e-5, rtol=1e-4)
            remapped_somewhere |= bool((got > 1).any())
    assert remapped_somewhere  # global numbers beyond the few copies a segment loads


def test_off_by_default_and_free(monkeypatch):
    model = tiny("cls")
    stack = model.model.gca
    assert stack.trace is None
    calls = []
    real = retrieval.chunk_scores
    monkeypatch.setattr(retrieval, "chunk_scores", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 100)), use_cache=False)
        assert stack.trace is None and len(calls) == 1  # select_chunks' own scores, nothing more
        with record_retrieval(model, scores=False) as records:
            model(torch.randint(0, 256, (1, 100)), use_cache=False)
        assert len(calls) == 2 and records[0].scores is None
        with record_retrieval(model) as records:
            model(torch.randint(0, 256, (1, 100)), use_cache=False)
        assert len(records) == 1 and records[0].scores is not None
    assert stack.trace is None  # the block ends the recording
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 100)), use_cache=False)
    assert len(records) == 1


def test_record_retrieval_needs_a_gca_model():
    with pytest.raises(ValueError, match="no GCA stack"):
        with record_retrieval(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("landmark", ["cls", "token"])
def test_token_to_chunk_maps_follow_the_stream(landmark):
    stack = tiny(landmark).model.gca
    embeds = torch.zeros(1, 100, 32)
    _, _, answer = stack.build_stream(embeds, 0)
    tpc = stack.text_per_chunk
    for n in range(100):
        assert stack.chunk_of_token(n) == n // tpc
        assert stack.chunk_answering(n) == int(answer[n]) // stack.chunk_size
