import pytest
import torch

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cache.cca import CCAState
from longreach.layers import available_mixers, resolve_mixer
from longreach.ops.cca import cca_attention, core_count


def tiny(mixers, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, intermediate_size=48, mixers=mixers, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    return LongReachForCausalLM(LongReachConfig(**cfg)).eval()


def test_registered_with_defaults():
    assert "cca" in available_mixers()
    _, options = resolve_mixer("cca")
    assert (options.group_size, options.window, options.position, options.core_heads) == (16, 1024, "rope", "kv")
    _, options = resolve_mixer({"type": "cca", "window": 64})
    assert (options.group_size, options.window) == (16, 64)


def test_large_window_equals_full_attention():
    full = tiny("full")
    cca = tiny({"type": "cca", "group_size": 4, "window": 64})
    cca.load_state_dict(full.state_dict())
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(cca(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)
        small = tiny({"type": "cca", "group_size": 4, "window": 8})
        small.load_state_dict(full.state_dict())
        assert (small(ids).logits - full(ids).logits).abs().max() > 1e-3


def test_cache_is_bounded_by_formula():
    g, s = 4, 8
    model = tiny({"type": "cca", "group_size": g, "window": s})
    cache = model(torch.randint(0, 64, (1, 3)), use_cache=True).past_key_values
    T = 3
    with torch.no_grad():
        for _ in range(60):
            cache = model(torch.randint(0, 64, (1, 1)), past_key_values=cache,
                          use_cache=True).past_key_values
            T += 1
            for state in cache.states:
                assert isinstance(state, CCAState)
                # core: one per complete group; raw: from J(T-1) * g to the newest token
                assert state.num_core == T // g
                assert state.num_raw == T - core_count(T - 1, group_size=g, window=s) * g
                assert state.num_tokens <= T / g + s + g
                assert state.core_k.shape[2] == 2  # pooled per key/value head


def test_state_matches_op_on_random_tensors():
    torch.manual_seed(1)
    B, T, HQ, H, D = 2, 53, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (HQ, H, H))
    ref = cca_attention(q, k, v, group_size=5, window=9, core_heads="kv")
    state = CCAState(group_size=5, window=9)
    outs = [state.step(q[:, a:a + 6], k[:, a:a + 6], v[:, a:a + 6]) for a in range(0, T, 6)]
    torch.testing.assert_close(torch.cat(outs, 1), ref)


@pytest.mark.parametrize("options,match", [
    ({"group_size": 0}, "group_size"),
    ({"window": "big"}, "window"),
    ({"position": "alibi"}, "position"),
    ({"core_heads": "all"}, "core_heads"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        tiny({"type": "cca", **options})
