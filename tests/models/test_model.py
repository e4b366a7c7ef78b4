import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import longreach  # noqa: F401  (registers the Auto classes)
from longreach import LongReachConfig, LongReachForCausalLM, LongReachModel
from longreach.cache import LongReachCache
from longreach.layers import available_mixers, register_mixer
from longreach.models.compat import enable_checkpointing

MIXER_CASES = {
    "full": "full",
    "swa": {"type": "swa", "window": 6},
    "swa-sinks": {"type": "swa", "window": 5, "sinks": 2},
    "swa-alibi": {"type": "swa", "window": 7, "position": "alibi"},
    "full-nopos": {"type": "full", "position": "none"},
}


def tiny(mixers, **kw):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, intermediate_size=48, mixers=mixers)
    cfg.update(kw)
    return LongReachForCausalLM(LongReachConfig(**cfg)).eval()


def test_loss_matches_manual_shifted_cross_entropy():
    model = tiny("full")
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    manual = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_sliding_window_cache_is_bounded():
    window, sinks = 6, 2
    model = tiny({"type": "swa", "window": window, "sinks": sinks})
    out = model(torch.randint(0, 64, (1, 3)), use_cache=True)
    cache, sizes = out.past_key_values, []
    for _ in range(40):
        cache = model(torch.randint(0, 64, (1, 1)), past_key_values=cache, use_cache=True).past_key_values
        sizes.append(cache.nbytes())
    for state in cache.states:
        assert state.num_tokens == window - 1 + sinks
        assert state.positions[:sinks].tolist() == list(range(sinks))
    assert len(set(sizes[10:])) == 1  # constant once the window is full

    full = tiny("full")
    cache = full(torch.randint(0, 64, (1, 43)), use_cache=True).past_key_values
    assert all(s.num_tokens == 43 for s in cache.states)


def test_generate_matches_greedy_loop():
    model = tiny([MIXER_CASES["swa-sinks"], "full"])
    prompt = torch.randint(0, 64, (1, 9))
    gen = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    x = prompt
    for _ in range(12):
        x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, x)


def test_generate_feeds_one_new_token_per_step_through_the_cache(monkeypatch):
    """generate hands the model's cache back each step (under `cache` on newer transformers,
    `past_key_values` on older ones): after the prompt every call sees one new token."""
    model = tiny([MIXER_CASES["swa"], "full"])
    calls = []
    forward = model.model.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("past_key_values")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    model.generate(torch.randint(0, 64, (1, 9)), max_new_tokens=6, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
    assert [n for n, _ in calls] == [9, 1, 1, 1, 1, 1]
    caches = {id(c) for _, c in calls[1:]}  # the first call starts one (None) or gets it
    assert len(caches) == 1 and isinstance(calls[-1][1], LongReachCache)


def test_cache_under_either_name():
    model = tiny("full")
    ids = torch.randint(0, 64, (1, 7))
    a = model(ids[:, :4], use_cache=True)
    cache = a.past_key_values
    b = model(ids[:, 4:], cache=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), model(ids).logits)
    assert cache.get_seq_length() == 7
    with pytest.raises(ValueError, match="pass the cache once"):
        model(ids[:, :1], past_key_values=cache, cache=model.model.new_cache())


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = tiny([MIXER_CASES["swa-sinks"], MIXER_CASES["swa-alibi"]])
    ids = torch.randint(0, 64, (2, 15))
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LongReachConfig) and config.mixers == model.config.mixers
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LongReachForCausalLM)
    torch.testing.assert_close(loaded(ids).logits, ref)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, LongReachModel)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_same_loss_and_grads():
    model = tiny(MIXER_CASES["swa"]).train()
    ids = torch.randint(0, 64, (2, 19))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_checkpointing(model)  # the name this transformers has (the old one warns on 5.2x)
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_new_mixer_plugs_in_through_the_registry():
    from dataclasses import dataclass

    from longreach.layers.base import Mixer, MixerOptions
    from longreach.layers.registry import unregister_mixer

    @dataclass(frozen=True)
    class ShiftOptions(MixerOptions):
        scale: float = 1.0

    @register_mixer("test-shift")
    class Shift(Mixer):  # mixes each token with its predecessor: causal, stateless
        Options = ShiftOptions

        def __init__(self, config, layer_idx, options):
            super().__init__(config, layer_idx, options)
            self.proj = nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, x, positions, state=None):
            prev = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]
            return self.proj(prev) * self.options.scale

    try:
        assert "test-shift" in available_mixers()
        model = tiny(["full", {"type": "test-shift", "scale": 0.5}])
        assert model.model.layers[1].mixer.options.scale == 0.5
        ids = torch.randint(0, 64, (1, 9))
        assert torch.isfinite(model(ids).logits).all()
        with pytest.raises(ValueError, match=r"unknown option.*'scal'.*valid options: \['scale'\]"):
            tiny(["full", {"type": "test-shift", "scal": 0.5}])
        with pytest.raises(TypeError, match="subclass of longreach.layers.base.Mixer"):
            register_mixer("test-plain")(nn.Linear)
    finally:
        unregister_mixer("test-shift")
    assert "test-shift" not in available_mixers()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mixers="nope"), r"unknown mixer 'nope'; valid mixers: .*full.*swa"),
        (dict(mixers={"type": "swa", "windw": 4}), r"unknown option.*windw"),
        (dict(mixers=["full"]), r"mixers lists 1 layers but num_hidden_layers is 2"),
        (dict(num_key_value_heads=3), r"multiple of num_key_value_heads"),
        (dict(mixers={"window": 4}), r"no 'type' key"),
        (dict(mixers={"type": "swa", "window": 0}), r"window must be a positive integer"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"mixers": "full", **kwargs})


def test_sequence_longer_than_the_model_allows():
    model = tiny("full", max_position_embeddings=16)
    model(torch.randint(0, 64, (1, 16)))
    with pytest.raises(ValueError, match="longer than this model allows"):
        model(torch.randint(0, 64, (1, 17)))
    cache = model(torch.randint(0, 64, (1, 10)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.randint(0, 64, (1, 7)), past_key_values=cache, use_cache=True)


def test_bad_inputs():
    model = tiny("full")
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, 2, 64]]))
    with pytest.raises(ValueError, match="padded batches"):
        model(torch.randint(0, 64, (2, 5)), attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(torch.randint(0, 64, (5,)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["full", "swa-sinks", "swa-alibi"])
def test_cuda_cached_decoding_and_bf16_match_cpu(name):
    model = tiny(MIXER_CASES[name])
    ids = torch.randint(0, 64, (2, 300))  # long enough for the FlexAttention path
    ref = model(ids).logits
    gpu = model.cuda()
    full = gpu(ids.cuda()).logits
    torch.testing.assert_close(full.cpu(), ref, atol=1e-3, rtol=1e-3)
    out = gpu(ids[:, :200].cuda(), use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for s in range(200, 300, 7):
        out = gpu(ids[:, s:s + 7].cuda(), past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-3, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = gpu(ids.cuda()).logits.float()
    assert ((low - full).norm() / full.norm()).item() < 2e-2


def test_compat_passes_the_cache_under_the_name_a_model_takes():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from longreach.models.compat import cache_kwargs, output_cache

    class Old(nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    marker = object()
    assert cache_kwargs(Old(), marker) == {"past_key_values": marker}
    assert cache_kwargs(New(), marker) == {"cache": marker}
    out = CausalLMOutputWithPast(logits=torch.zeros(1), past_key_values=marker)  # any version
    assert output_cache(out) is marker


def test_recipe_model_sections_refuse_unknown_settings():
    from longreach.models import GCAConfig, config_from_dict

    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['hiden_size'\].*valid settings: .*'hidden_size'"):
        config_from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="model.model_type must be one of"):
        config_from_dict({"model_type": "gpt2"})
    # transformers' own Llama / Mistral / Qwen2: their settings, checked the same way
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['hiden_size'\] for model_type 'llama'"):
        config_from_dict({"model_type": "llama", "hiden_size": 64})
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from longreach.models import causal_lm_class

    llama = config_from_dict({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4})
    assert type(llama) is LlamaConfig and llama.hidden_size == 32
    assert causal_lm_class(llama) is LlamaForCausalLM
    assert causal_lm_class(config_from_dict({"model_type": "qwen2"})) is Qwen2ForCausalLM
    assert type(config_from_dict({"model_type": "qwen2"})) is Qwen2Config
    gca = config_from_dict({"num_hidden_layers": 2, "mixers": ["swa", "gca"], "gca": {"top_k": 2}})
    assert type(gca) is GCAConfig and gca.gca["top_k"] == 2
    assert type(config_from_dict({"model_type": "longreach", "mixers": "swa"})) is LongReachConfig


def test_no_transformers_deprecation_warning_from_our_calls():
    """Outputs are built under the cache field name the installed transformers uses, so
    forward, cached decoding and generate trigger no warning of ours (5.17 and newer)."""
    import dataclasses
    import logging

    from transformers.utils import logging as hf_logging

    from longreach.models.compat import output_cache

    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()  # warned-once messages show again
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    library = hf_logging.get_logger("transformers")  # transformers' root: it does not propagate
    library.addHandler(handler)
    try:
        model = tiny("swa")
        ids = torch.randint(0, 64, (1, 9))
        out = model(ids, use_cache=True)
        model(ids[:, :1], **{"cache" if "cache" in out else "past_key_values": output_cache(out)},
              use_cache=True)
        model.generate(ids, max_new_tokens=3, do_sample=False)
        ours = list(seen)
        # the check can see the warning: where the field is renamed, the old name triggers it
        from transformers.modeling_outputs import BaseModelOutputWithPast

        renamed = "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
        if renamed:
            BaseModelOutputWithPast(last_hidden_state=ids, past_key_values=None)
    finally:
        library.removeHandler(handler)
    assert not [m for m in ours if "deprecated" in m], ours
    if renamed:
        assert any("deprecated" in m for m in seen[len(ours):])
