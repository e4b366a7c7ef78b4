"""The mixer contract (longreach.layers.base), checked for every registered mixer and every
model family: options from one dataclass, states that describe themselves, gradients reach
every parameter, causality, and cached decoding (any step size, with a beam reorder) equal to
one full forward.

A new mixer is picked up from the registry with its default options; add small-window cases
to CASES to exercise what its defaults would hide on short inputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import longreach  # noqa: F401  (registers the Auto classes)
from longreach.cache import LongReachCache
from longreach.cache.base import State
from longreach.layers import available_mixers, resolve_mixer
from longreach.layers.base import Mixer, MixerOptions
from longreach.models import causal_lm_class, config_from_dict

MAMBA2 = {"type": "mamba2", "state_size": 8, "head_dim": 16, "num_groups": 2, "chunk_size": 8}
GLA = {"type": "gla", "chunk_size": 8}
# name -> mixers list of a tiny model (one entry: used for both layers)
CASES = {
    "full": "full",
    "full-nopos": {"type": "full", "position": "none"},
    "swa": {"type": "swa", "window": 6},
    "swa-sinks": {"type": "swa", "window": 5, "sinks": 2},
    "swa-alibi": {"type": "swa", "window": 7, "position": "alibi"},
    "cca": {"type": "cca", "group_size": 3, "window": 5},
    "cca-query": {"type": "cca", "group_size": 4, "window": 8, "core_heads": "query"},
    "cca-g4": {"type": "cca", "group_size": 4, "window": 8},
    "cca-g1": {"type": "cca", "group_size": 1, "window": 6},
    "mamba2": MAMBA2,
    "mamba2-noconv": {**MAMBA2, "conv_size": 0, "norm_before_gate": True},
    "gla": GLA,
    "gla-conv": {**GLA, "conv_size": 3, "num_heads": 2},
    "hybrid": [MAMBA2, {"type": "swa", "window": 6}, GLA],
}
# every registered mixer is covered: by its cases above, or else with its defaults
for _name in available_mixers():
    if not any(_name == (c if isinstance(c, str) else c.get("type", c))
               for case in CASES.values() for c in (case if isinstance(case, list) else [case])):
        CASES[f"{_name}-defaults"] = _name
GCA = {
    "model_type": "longreach-gca",
    "mixers": [{"type": "swa", "window": 8}] * 2 + [{"type": "gca", "window": 8}] * 2,
    "gca": {"chunk_size": 8, "top_k": 2, "encoder_layers": 1, "retrieval_groups": 2, "gumbel": False},
}
FAMILIES = {f"longreach:{name}": {"mixers": mixers} for name, mixers in CASES.items()}
FAMILIES["longreach-gca:token"] = GCA
FAMILIES["longreach-gca:cls"] = {**GCA, "gca": {**GCA["gca"], "landmark": "cls"}}


def build(section: dict):
    mixers = section["mixers"]
    layers = len(mixers) if isinstance(mixers, list) else 2
    config = config_from_dict(dict(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, intermediate_size=48, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **section))
    return causal_lm_class(config)(config).eval()


@pytest.mark.parametrize("name", available_mixers())
def test_registered_mixer_follows_the_contract(name):
    entry, options = resolve_mixer(name)
    assert issubclass(entry.cls, Mixer)
    assert issubclass(entry.options, MixerOptions) and dataclasses.is_dataclass(entry.options)
    assert dataclasses.asdict(options) == dataclasses.asdict(entry.options())  # defaults: one place
    with pytest.raises(ValueError, match=rf"layer 3: mixer '{name}' got unknown option\(s\) \['nope'\]"):
        resolve_mixer({"type": name, "nope": 1}, 3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_reach_every_parameter(family):
    model = build(FAMILIES[family]).train()
    ids = torch.randint(0, 64, (2, 45))
    out = model(ids, labels=ids, use_cache=False)
    assert out.logits.shape == (2, 45, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad, bad


@pytest.mark.parametrize("family", list(FAMILIES))
def test_causality(family):
    model = build(FAMILIES[family])
    ids = torch.randint(0, 64, (1, 40))
    t = 27
    edited = ids.clone()
    edited[:, t + 1 :] = (ids[:, t + 1 :] + 1) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(edited).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("step", [1, 3, 4, 7, 8])
def test_cached_decoding_equals_full_forward(family, step):
    model = build(FAMILIES[family])
    ids = torch.randint(0, 64, (2, 37))  # past every window, several chunks
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for s in range(5, 37, step):
            out = model(ids[:, s : s + step], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)
    assert isinstance(cache, LongReachCache) and cache.get_seq_length() == 37


@pytest.mark.parametrize("family", list(FAMILIES))
def test_states_describe_themselves_and_follow_a_beam_reorder(family):
    model = build(FAMILIES[family])
    ids = torch.randint(0, 64, (2, 40))
    flipped = ids.flip(0)
    with torch.no_grad():
        want = model(flipped).logits[:, 30:]
        cache = model.new_cache()
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        states = cache.all_states()
        assert all(isinstance(s, State) for s in states) and states
        for s in states:
            assert isinstance(s.nbytes(), int) and s.nbytes() >= 0
            assert s.bytes_per_token(torch.float32) >= 0
            assert all(isinstance(v, tuple) for v in s.shape.values())
        cache.reorder_cache(torch.tensor([1, 0]))
        got = model(flipped[:, 30:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cache_grows_as_bytes_per_token_says(family):
    """A cache reporting 0 bytes per token keeps its device size flat (past its windows); one
    reporting growth grows by no more than it says (buffers may grow in steps: GCA landmarks)."""
    model = build(FAMILIES[family])
    per_token = model.cache_bytes_per_token()
    cache, sizes = model.new_cache(), []
    with torch.no_grad():
        for _ in range(2):
            for _ in range(8):
                model(torch.randint(0, 64, (1, 8)), past_key_values=cache, use_cache=True)
            sizes.append(cache.nbytes())
    if per_token == 0:
        assert sizes[1] == sizes[0], sizes
    else:
        assert 0 <= sizes[1] - sizes[0] <= 2 * per_token * 64, (sizes, per_token)
