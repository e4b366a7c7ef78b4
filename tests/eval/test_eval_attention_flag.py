"""``longreach eval --attention``: a local HF Llama folder through the longreach plug-ins."""

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.cache import CCACache
from longreach.cache.sink import SinkWindowCache
from longreach.data import byte_tokenizer
from longreach.eval import runner
from longreach.eval.attention import attention_settings, resolve_attention
from longreach.eval.command import add_eval_parser
from longreach.eval.stream import new_generation_cache
from longreach.integrations import hf
from longreach.models.compat import cache_kwargs, output_cache


def _llama(seed=0, vocab=259):
    torch.manual_seed(seed)
    special = (256, 257, 258) if vocab > 258 else (None, None, None)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[2])
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_settings_are_checked():
    assert attention_settings("full") is None and resolve_attention(None) is None
    assert attention_settings("cca") == {"kind": "cca", "group_size": 16, "window": 1024}
    assert attention_settings("lm_infinite", sinks=2) == {"kind": "lm-infinite", "sinks": 2,
                                                          "window": 1024}
    assert resolve_attention({"kind": "streaming", "window": 8}) == {
        "kind": "streaming", "sinks": 4, "window": 8}
    with pytest.raises(ValueError, match="unknown attention 'sparse'"):
        attention_settings("sparse")
    with pytest.raises(ValueError, match="--group-size do"):
        attention_settings("streaming", group_size=8)
    with pytest.raises(ValueError, match="--window do"):
        attention_settings("full", window=8)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        attention_settings("cca", window=0)
    with pytest.raises(ValueError, match="sinks must be an integer >= 0"):
        attention_settings("streaming", sinks=-1)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_sink_window_cache_matches_the_full_sequence_and_stays_bounded(chunk):
    model = hf.enable_streaming(_llama(vocab=64), sinks=3, window=10)
    x = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
        cache = new_generation_cache(model)
        assert isinstance(cache, SinkWindowCache)
        pieces = []
        for start in range(0, 60, chunk):
            out = model(x[:, start : start + chunk], **cache_kwargs(model, cache), use_cache=True)
            assert output_cache(out) is cache
            assert max(cache.num_tokens()) <= 3 + 10 - 1
            pieces.append(out.logits)
    assert cache.get_seq_length() == 60
    torch.testing.assert_close(torch.cat(pieces, 1), want, atol=1e-5, rtol=1e-5)


def test_cache_estimates_follow_the_plugin():
    model = _llama()
    full = runner.cache_bytes_per_token(model)
    assert full == 2 * 2 * 2 * 8 * 4  # layers * (k, v) * kv heads * head_dim * fp32
    assert runner.cache_bytes_per_token(hf.enable_cca(model, group_size=8, window=16)) == full // 8
    assert runner.cache_bytes_per_token(hf.enable_streaming(model, window=16)) == 0
    assert runner.cache_bytes_per_token(hf.enable_lm_infinite(model, window=16)) == 0
    assert isinstance(new_generation_cache(model), SinkWindowCache)  # bounded, like streaming


@pytest.mark.parametrize("kind,options,cache_type", [
    ("streaming", {"sinks": 4, "window": 32}, SinkWindowCache),
    ("cca", {"group_size": 8, "window": 32}, CCACache),
    ("lm-infinite", {"sinks": 4, "window": 32}, SinkWindowCache),
])
def test_run_eval_streams_through_the_plugin_cache(llama_dir, tmp_path, monkeypatch, kind,
                                                   options, cache_type):
    seen = []
    real_generate = runner.generate_answer

    def recording_generate(model, *args, **kwargs):
        # the prompt is fed in segments: record the cache the model hands back
        real_forward = model.forward

        def forward(*a, **k):
            out = real_forward(*a, **k)
            seen.append(output_cache(out))
            return out

        monkeypatch.setattr(model, "forward", forward)
        try:
            return real_generate(model, *args, **kwargs)
        finally:
            monkeypatch.setattr(model, "forward", real_forward)

    monkeypatch.setattr(runner, "generate_answer", recording_generate)
    out = tmp_path / kind
    summary = runner.run_eval("passkey", llama_dir, [300], depths=[0.5], samples=1, out_dir=out,
                              progress=False, prefill_chunk=64, device="cpu",
                              attention={"kind": kind, **options})
    assert summary["evaluated"] == 1
    assert json.loads((out / "run.json").read_text())["attention"] == {"kind": kind, **options}
    record = runner.read_results(out)[0]
    assert abs(record["prompt_tokens"] - 300) <= 3 and record["generation"] is not None
    assert len(seen) >= 300 // 64 + 1
    if cache_type is not None:
        assert all(isinstance(c, cache_type) for c in seen)
    if kind in ("streaming", "lm-infinite"):
        assert max(seen[-1].num_tokens()) <= 4 + 32 - 1
    if kind == "cca":
        assert max(seen[-1].num_tokens()) <= 310 // 8 + 32 + 8
    # another attention in the same folder is another experiment
    with pytest.raises(ValueError, match="attention"):
        runner.run_eval("passkey", llama_dir, [300], depths=[0.5], samples=1, out_dir=out,
                        progress=False, device="cpu")


def test_cli_flags(llama_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["eval", "niah", "--model", str(llama_dir), "--out", str(out),
                              "--lengths", "400", "--depths", "0", "--samples", "1",
                              "--attention", "cca", "--group-size", "4", "--window", "16",
                              "--quiet", "--device", "cpu"])
    assert args.func(args) == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["config"]["attention"] == {"kind": "cca", "group_size": 4, "window": 16}
    bad = parser.parse_args(["eval", "niah", "--model", str(llama_dir), "--out", str(out),
                             "--attention", "streaming", "--group-size", "4"])
    with pytest.raises(ValueError, match="--group-size do"):
        bad.func(bad)


def test_plugin_refuses_a_longreach_model_before_loading(tmp_path, monkeypatch):
    folder = tmp_path / "lr"
    LongReachForCausalLM(LongReachConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         mixers="full")).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runner, "load_model", no_load)
    with pytest.raises(ValueError, match="plugs into transformers models of type"):
        runner.run_eval("passkey", folder, [300], depths=[0.5], samples=1,
                        out_dir=tmp_path / "o", progress=False, attention="cca")


@pytest.fixture(scope="module")
def cca_saved_dir(tmp_path_factory):
    """A Llama folder saved with CCA switched on (what `longreach finetune --attention cca`
    writes): the settings are in config.json, plain from_pretrained does not re-apply them."""
    folder = tmp_path_factory.mktemp("cca-saved")
    hf.enable_cca(_llama(), group_size=4, window=16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_a_folder_saved_with_a_plugin_is_evaluated_with_it(cca_saved_dir, tmp_path):
    from longreach.eval.attention import saved_attention

    settings = {"kind": "cca", "group_size": 4, "window": 16}
    assert saved_attention(cca_saved_dir) == settings
    model, _ = runner.load_model(cca_saved_dir, "cpu")
    assert model.config._attn_implementation == hf.ATTENTION_NAME
    assert hf.plugin_settings(model)["window"] == 16
    assert isinstance(new_generation_cache(model), CCACache)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf.from_pretrained(cca_saved_dir)(ids).logits)
    out = tmp_path / "eval"
    summary = runner.run_eval("passkey", cca_saved_dir, [300], depths=[0.5], samples=1,
                              out_dir=out, progress=False, device="cpu")
    assert summary["evaluated"] == 1
    assert json.loads((out / "run.json").read_text())["attention"] == settings
    # a plug-in asked for wins over the saved one
    model, _ = runner.load_model(cca_saved_dir, "cpu", attention=attention_settings("streaming"))
    assert hf.plugin_settings(model)["kind"] == "streaming"


def test_saved_plugin_settings_that_are_wrong_name_the_file(cca_saved_dir, tmp_path):
    from longreach.eval.attention import saved_attention

    config = json.loads((cca_saved_dir / "config.json").read_text())
    config[hf.CONFIG_KEY]["window"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: longreach_attention: .*window"):
        saved_attention(tmp_path)


def test_generate_runs_a_folder_saved_with_a_plugin_with_it(cca_saved_dir, capsys):
    from longreach.cli import load_model_and_tokenizer, main

    model, _ = load_model_and_tokenizer(str(cca_saved_dir), device="cpu")
    assert model.config._attn_implementation == hf.ATTENTION_NAME
    assert main(["generate", "--model", str(cca_saved_dir), "--prompt", "The",
                 "--max-new-tokens", "4", "--greedy", "--device", "cpu"]) == 0
    ids = torch.tensor([byte_tokenizer().encode("The", add_special_tokens=False)])
    want = hf.from_pretrained(cca_saved_dir).generate(ids, max_new_tokens=4, do_sample=False)
    assert capsys.readouterr().out.startswith(byte_tokenizer().decode(want[0],
                                                                      skip_special_tokens=True))
