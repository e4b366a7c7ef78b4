import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import longreach
from longreach.cache import CCACache
from longreach.integrations import hf
from longreach.layers.positions import apply_rope
from longreach.models.compat import cache_kwargs, output_cache
from longreach.ops.cca import core_count

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
T = 40


def tiny(family="llama", seed=0):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model_cls(config).eval()


def ids(seed=0, length=T, batch=2):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def chunked(model, x, first=9, step=5):
    with torch.no_grad():
        out = model(x[:, :first], use_cache=True)
        pieces, cache = [out.logits], output_cache(out)
        for s in range(first, x.shape[1], step):
            out = model(x[:, s:s + step], **cache_kwargs(model, cache), use_cache=True)
            pieces.append(out.logits)
            cache = output_cache(out)
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cca_window_covering_input_is_unchanged_small_window_is_not(family):
    model, x = tiny(family), ids()
    ref = logits(model, x)
    hf.enable_cca(model, group_size=4, window=T)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    hf.enable_cca(model, group_size=3, window=7)  # enabling again updates the settings
    assert (logits(model, x) - ref).abs().max() > 1e-3
    hf.restore_attention(model)
    assert torch.equal(logits(model, x), ref)
    assert not hasattr(model.config, hf.CONFIG_KEY)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("step", [1, 5])
def test_cca_cached_decoding_equals_full_forward(family, step):
    g, s = 3, 7
    model, x = hf.enable_cca(tiny(family), group_size=g, window=s), ids()
    full = logits(model, x)
    out, cache = chunked(model, x, step=step)
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)
    assert isinstance(cache, CCACache) and cache.get_seq_length() == T
    # per layer and key/value head: floor(T/g) core tokens + the raw window from J(T-1)*g
    expected = T // g + T - core_count(T - 1, group_size=g, window=s) * g
    assert cache.num_tokens() == [expected] * 2
    assert expected <= T / g + s + g
    state = cache.state(0)
    assert state.core_k.shape[2] == model.config.num_key_value_heads


def test_cca_cache_memory_stays_bounded():
    g, s = 4, 8
    model = hf.enable_cca(tiny(), group_size=g, window=s)
    cache = hf.new_cache(model)
    with torch.no_grad():
        for t in range(1, 50):
            model(ids(t, length=1, batch=1), **cache_kwargs(model, cache), use_cache=True)
            assert max(cache.num_tokens()) <= t / g + s + g


def test_generate_uses_cca_cache_and_matches_greedy_loop():
    model = hf.enable_cca(tiny(), group_size=3, window=7)
    prompt = ids(length=12, batch=1)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, do_sample=False,
                             return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
        assert isinstance(output_cache(out), CCACache)
        seq = prompt
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, seq)


def test_two_models_keep_their_own_settings():
    a, b, x = tiny("llama", seed=0), tiny("qwen2", seed=1), ids()
    hf.enable_cca(a, group_size=3, window=7)
    a_alone = logits(a, x)
    hf.enable_streaming(b, sinks=2, window=9)
    b_alone = logits(b, x)
    hf.enable_cca(b, group_size=4, window=11)
    assert torch.equal(logits(a, x), a_alone)
    assert (logits(b, x) - b_alone).abs().max() > 1e-3
    assert a.config.longreach_attention["group_size"] == 3
    assert b.config.longreach_attention["group_size"] == 4


@pytest.mark.parametrize("enable,options", [
    (hf.enable_cca, {"group_size": 3, "window": 7}),
    (hf.enable_lm_infinite, {"sinks": 2, "window": 9}),
])
def test_save_and_load_keep_the_settings(tmp_path, enable, options):
    model, x = enable(tiny(), **options), ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == hf.ATTENTION_NAME
    assert {k: loaded.config.longreach_attention[k] for k in options} == options
    torch.testing.assert_close(logits(loaded, x), expected)
    plain = hf.enable_from_config(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(logits(plain, x), expected)
    hf.restore_attention(plain)
    assert plain.config._attn_implementation != hf.ATTENTION_NAME


def dense_oracle(q0, k0, v, inv_freq, *, sinks, window, cap):
    """Loop oracle from un-rotated q0 [T, D], k0 [S, D] at positions 0..: key j is rotated at j,
    query i at j + distance, distance = min(i - j, window) when cap else i - j."""
    def rot(x, pos):
        angles = torch.tensor([float(pos)], dtype=torch.float64)[:, None] * inv_freq[None, :]
        return apply_rope(x[None, None, None], angles.cos(), angles.sin())[0, 0, 0]

    out = torch.zeros_like(q0)
    for i in range(q0.shape[0]):
        js = [j for j in range(i + 1) if j < sinks or i - j < window]
        scores = []
        for j in js:
            d = min(i - j, window) if cap else i - j
            scores.append(rot(q0[i], j + d) @ rot(k0[j], j) / math.sqrt(q0.shape[-1]))
        p = torch.softmax(torch.stack(scores), 0)
        out[i] = sum(pj * v[j] for pj, j in zip(p, js, strict=True))
    return out


@pytest.mark.parametrize("kind", ["streaming", "lm-infinite", "lm_infinite"])  # and the old name
def test_baseline_masks_match_dense_oracle(kind):
    torch.manual_seed(0)
    S, D, sinks, window = 23, 8, 3, 6
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    q0, k0, v = (torch.randn(S, D, dtype=torch.float64) for _ in range(3))
    angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]
    q = apply_rope(q0[None, :, None], angles.cos(), angles.sin())  # [1, S, 1, D]
    k = apply_rope(k0[None, :, None], angles.cos(), angles.sin())
    query, key, value = q.transpose(1, 2), k.transpose(1, 2), v[None, None]

    class Module:  # what the attention function reads from the model's attention module
        config = type("C", (), {hf.CONFIG_KEY: {"kind": kind, "sinks": sinks, "window": window}})
        layer_idx = 0

    expected = dense_oracle(q0, k0, v, inv_freq, sinks=sinks, window=window,
                            cap=kind != "streaming")
    out, _ = hf.longreach_attention_forward(Module, query, key, value,
                                            longreach_inv_freq=inv_freq)
    torch.testing.assert_close(out[0, :, 0], expected)
    # the newest queries against all keys (a decoding step) read the same rows
    out, _ = hf.longreach_attention_forward(Module, query[:, :, -4:], key, value,
                                            longreach_inv_freq=inv_freq)
    torch.testing.assert_close(out[0, :, 0], expected[-4:])


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("enable", [hf.enable_streaming, hf.enable_lm_infinite])
def test_baselines_in_models(family, enable):
    model, x = tiny(family), ids()
    ref = logits(model, x)
    enable(model, sinks=2, window=T)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    enable(model, sinks=2, window=9)
    full = logits(model, x)
    assert (full - ref).abs().max() > 1e-3
    out, cache = chunked(model, x, step=3)
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)
    # the hook's own cache is bounded: the sinks and the last window - 1 keys
    assert type(cache).__name__ == "SinkWindowCache"
    assert cache.num_tokens() == [2 + 9 - 1] * model.config.num_hidden_layers
    hf.restore_attention(model)
    assert torch.equal(logits(model, x), ref)


@pytest.mark.parametrize("kind", ["cca", "streaming", "lm-infinite"])
def test_plugins_train_under_bf16_autocast(kind):
    # transformers' RoPE leaves q, k in float32 under autocast while v is bf16: the attention
    # function brings them to one dtype (fine-tuning on a GPU failed on that before)
    options = {"group_size": 3, "window": 7} if kind == "cca" else {"sinks": 2, "window": 9}
    model, x = hf.enable(tiny(), {"kind": kind, **options}).train(), ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    with torch.no_grad():  # and it computes what float32 does, to bf16 precision
        expected = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).logits.float()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_errors():
    with pytest.raises(ValueError, match="unsupported model"):
        hf.enable_cca(longreach.LongReachForCausalLM(longreach.LongReachConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, intermediate_size=48, mixers="full")))
    model = tiny()
    with pytest.raises(ValueError, match="group_size"):
        hf.enable_cca(model, group_size=0)
    with pytest.raises(ValueError, match="window=8 is smaller than group_size=16"):
        hf.enable_cca(model, group_size=16, window=8)
    assert hf.plugin_settings(model) is None  # refused before the model changed
    with pytest.raises(ValueError, match="needs a model switched to CCA"):
        hf.new_cache(model)
    hf.enable_cca(model, group_size=3, window=7)
    with pytest.raises(ValueError, match="padded"):
        model(ids(), attention_mask=torch.tensor([[0] + [1] * (T - 1)] * 2))
    cache = hf.new_cache(model)
    hf.enable_cca(model, group_size=4, window=7)
    with pytest.raises(ValueError, match="start a new cache"):
        model(ids(), **cache_kwargs(model, cache), use_cache=True)


def test_cca_training_forward_backward():
    model, x = hf.enable_cca(tiny(), group_size=3, window=7), ids()
    expected = logits(model, x)
    out = model.train()(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_registry_names_options_and_the_old_spelling(tmp_path):
    assert list(hf.PLUGINS) == ["cca", "streaming", "lm-infinite"]
    assert hf.PLUGINS["cca"].options == {"group_size": 16, "window": 1024}
    assert hf.get_plugin("lm_infinite") is hf.PLUGINS["lm-infinite"]
    assert hf.get_plugin("streaming").settings(window=8) == {"kind": "streaming", "sinks": 4,
                                                              "window": 8}
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        hf.get_plugin("flash")
    with pytest.raises(ValueError, match="takes group_size, window; got sinks"):
        hf.PLUGINS["cca"].settings(sinks=2)
    with pytest.raises(ValueError, match="sinks must be an integer >= 0"):
        hf.PLUGINS["streaming"].settings(sinks=-1)
    # a config.json saved by an earlier version spells the kind lm_infinite: it still loads
    model, x = hf.enable_lm_infinite(tiny(), sinks=2, window=9), ids()
    expected = logits(model, x)
    model.config.longreach_attention = {**model.config.longreach_attention, "kind": "lm_infinite"}
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert loaded.config.longreach_attention["kind"] == "lm-infinite"
    torch.testing.assert_close(logits(loaded, x), expected)


def test_registry_caches_and_growth():
    from longreach.cache.sink import SinkWindowCache

    model = tiny()
    assert hf.plugin_settings(model) is None and hf.generation_cache(model) is None
    assert hf.cache_bytes_per_token(model) is None
    full = hf.kv_cache_bytes_per_token(model)
    assert full == 2 * 2 * 2 * 8 * 4  # layers * (k, v) * kv heads * head_dim * fp32
    hf.enable_cca(model, group_size=3, window=7)
    assert isinstance(hf.generation_cache(model), CCACache)
    assert hf.cache_bytes_per_token(model) == -(-full // 3)
    hf.enable_streaming(model, sinks=2, window=7)
    assert isinstance(hf.generation_cache(model), SinkWindowCache)
    assert hf.cache_bytes_per_token(model) == 0
    hf.enable(model, {"kind": "lm-infinite", "window": 7})
    assert isinstance(hf.generation_cache(model), SinkWindowCache)
    assert hf.cache_bytes_per_token(model) == 0


def test_integrations_import_nothing_above_them():
    import subprocess
    import sys

    code = ("import sys, longreach.integrations.hf; "
            "print([m for m in sys.modules if m.startswith(('longreach.eval', 'longreach.train'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lm_infinite_positions_come_with_their_bounds_as_ints():
    """The plug-in hands LM-Infinite the bounds of its positions, so the op reads nothing back
    from the device: they must be the ones the op would read."""
    class Seen:
        def __init__(self, seen):
            self.seen = seen

        def get_seq_length(self, layer):
            return self.seen

    for seen, n_keys, n_queries, sinks in [(10, 10, 10, 4), (10, 10, 1, 0), (100, 13, 1, 4),
                                           (100, 13, 5, 4), (100, 9, 2, 0), (7, 7, 3, 9),
                                           (30, 30, 30, 0)]:
        cache = Seen(seen) if seen != n_keys else None
        q_pos, k_pos, bounds = hf._positions(cache, 0, n_queries, n_keys, sinks, "cpu")
        assert len(q_pos) == n_queries and len(k_pos) == n_keys
        expected = (int(q_pos[0]), int(q_pos[-1]), int(k_pos[0]), int(k_pos[-1]),
                    int((k_pos < sinks).sum()))
        assert bounds == expected and all(type(b) is int for b in bounds), (seen, n_keys)
