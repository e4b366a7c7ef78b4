"""stream.greedy_generate (model.generate with prefill chunking) equals the token-by-token
greedy loop, feeds the prompt in segments, and passes a plug-in's bounded cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cache import CCACache
from longreach.cache.sink import SinkWindowCache
from longreach.eval.stream import greedy_generate, greedy_tokens
from longreach.integrations import hf

PROMPT = torch.randint(0, 64, (37,), generator=torch.Generator().manual_seed(3)).tolist()


def longreach_model():
    torch.manual_seed(0)
    return LongReachForCausalLM(LongReachConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, intermediate_size=48, mixers=[{"type": "swa", "window": 6}, "full"],
    )).eval()


def llama(attention):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )).eval()
    if attention == "cca":
        hf.enable_cca(model, group_size=4, window=8)
    elif attention == "streaming":
        hf.enable_streaming(model, sinks=2, window=8)
    return model


MODELS = {"longreach": longreach_model, "llama": lambda: llama("full"),
          "llama-cca": lambda: llama("cca"), "llama-streaming": lambda: llama("streaming")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [1, 8, 4096])
def test_greedy_generate_equals_the_greedy_loop(name, chunk):
    model = MODELS[name]()
    want = list(itertools.islice(greedy_tokens(model, PROMPT, prefill_chunk=chunk), 12))
    assert greedy_generate(model, PROMPT, 12, prefill_chunk=chunk) == want
    # up to and including the end token; a stop callback ends after the token it sees
    eos = want[5]
    assert greedy_generate(model, PROMPT, 12, prefill_chunk=chunk, eos_token_id=eos) == want[: want.index(eos) + 1]
    assert greedy_generate(model, PROMPT, 12, prefill_chunk=chunk, stop=lambda t: len(t) == 3) == want[:3]


@pytest.mark.parametrize("attention, kind", [("cca", CCACache), ("streaming", SinkWindowCache)])
def test_a_plugged_model_generates_through_its_bounded_cache(attention, kind, monkeypatch):
    model = llama(attention)
    seen, forward = [], model.model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], type(cache)))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    greedy_generate(model, PROMPT, 4, prefill_chunk=10)
    assert [n for n, _ in seen] == [10, 10, 10, 7, 1, 1, 1]
    assert all(t is kind for _, t in seen)


def test_the_checkpoints_generation_settings_are_left_out():
    model = longreach_model()
    want = greedy_generate(model, PROMPT, 10, prefill_chunk=8)
    model.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1)
    assert greedy_generate(model, PROMPT, 10, prefill_chunk=8) == want
    assert model.generation_config.repetition_penalty == 5.0  # given back unchanged


def test_bad_arguments_are_clear():
    model = longreach_model()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_generate(model, PROMPT, 0)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        greedy_generate(model, PROMPT, 3, prefill_chunk=0)
