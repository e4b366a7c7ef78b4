"""HF ``generate(..., prefill_chunk_size=N)`` on longreach models: the same greedy tokens as
without chunking, each prompt token fed exactly once, with a new or a passed cache."""

from __future__ import annotations

import pytest
import torch

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.models.gca import GCAConfig, GCAForCausalLM

MAMBA2 = {"type": "mamba2", "state_size": 8, "head_dim": 16, "num_groups": 2, "chunk_size": 8}
MIXERS = {
    "full": ["full", "full"],
    "swa": [{"type": "swa", "window": 6, "sinks": 2}, {"type": "swa", "window": 5}],
    "cca": [{"type": "cca", "group_size": 4, "window": 8}, "full"],
    "mamba2": [MAMBA2, MAMBA2],
    "hybrid": [MAMBA2, {"type": "swa", "window": 6}],
}
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def tiny(name):
    torch.manual_seed(0)
    if name == "gca":
        return GCAForCausalLM(GCAConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            mixers=[{"type": "swa", "window": 8, "position": "rope"}] * 2 + [{"type": "gca", "window": 8}] * 2,
            gca={"chunk_size": 8, "top_k": 2, "encoder_layers": 1},
        )).eval()
    return LongReachForCausalLM(LongReachConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, intermediate_size=48, mixers=MIXERS[name],
    )).eval()


def prompt(model, n=29):
    # no id 0 (the pad id here), so generate infers an all-ones attention mask
    return torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))


def input_lengths(model, monkeypatch) -> list[int]:
    """The number of tokens each forward of the decoder is given, appended as it runs."""
    lengths, forward = [], model.model.forward

    def spy(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    return lengths


@pytest.mark.parametrize("name", [*MIXERS, "gca"])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_prefill_equals_unchunked(name, chunk, monkeypatch):
    model, ids = tiny(name), None
    ids = prompt(model)
    want = model.generate(ids, max_new_tokens=10, **GREEDY)
    lengths = input_lengths(model, monkeypatch)
    got = model.generate(ids, max_new_tokens=10, prefill_chunk_size=chunk, **GREEDY)
    assert torch.equal(got, want)
    # every prompt token once, in chunks of `chunk`; then one forward per new token after the first
    whole, rest = divmod(ids.shape[1], chunk)
    assert lengths == [chunk] * whole + [rest] * bool(rest) + [1] * 9


@pytest.mark.parametrize("name", ["swa", "gca"])
@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_chunked_prefill_with_a_passed_cache(name, argument, monkeypatch):
    model = tiny(name)
    ids = prompt(model, 23)
    want = model.generate(ids, max_new_tokens=6, **GREEDY)
    cache = model.new_cache()
    lengths = input_lengths(model, monkeypatch)
    got = model.generate(ids, max_new_tokens=6, prefill_chunk_size=7, **{argument: cache}, **GREEDY)
    assert torch.equal(got, want)
    assert lengths == [7, 7, 7, 2, 1, 1, 1, 1, 1]
    assert cache.get_seq_length() == ids.shape[1] + 5  # the passed cache is the one filled


def test_chunked_prefill_from_a_generation_config():
    from transformers import GenerationConfig

    model = tiny("hybrid")
    ids = prompt(model)
    config = GenerationConfig(max_new_tokens=8, prefill_chunk_size=4, **GREEDY)
    assert torch.equal(model.generate(ids, generation_config=config),
                       model.generate(ids, max_new_tokens=8, **GREEDY))


def test_chunked_prefill_refuses_a_used_cache():
    model = tiny("full")
    ids = prompt(model, 12)
    cache = model.new_cache()
    model(ids[:, :4], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="needs an empty cache; this one has seen 4 tokens"):
        model.generate(ids, max_new_tokens=2, prefill_chunk_size=4, cache=cache, **GREEDY)


def test_generate_continues_a_passed_cache_without_chunking(monkeypatch):
    """Without chunking a cache that has seen the prompt's start gets only the rest."""
    model = tiny("swa")
    ids = prompt(model, 15)
    want = model.generate(ids, max_new_tokens=4, **GREEDY)
    cache = model.new_cache()
    model(ids[:, :9], cache=cache, use_cache=True)
    lengths = input_lengths(model, monkeypatch)
    assert torch.equal(model.generate(ids, max_new_tokens=4, cache=cache, **GREEDY), want)
    assert lengths == [6, 1, 1, 1]
