"""The lm-evaluation-harness adapter on tiny local model folders, with hand-made requests."""

import builtins
import importlib
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longreach import LongReachConfig, LongReachForCausalLM
from longreach.data import byte_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from longreach.eval import lm_eval as adapter  # noqa: E402
from longreach.eval.lm_eval import LongReachLM, model_args  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=256, eos_token_id=257, pad_token_id=258)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def swa_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swa")
    torch.manual_seed(0)
    LongReachForCausalLM(LongReachConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         mixers={"type": "swa", "window": 16})).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _request(kind, args, idx=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx,
                    metadata=("handmade", idx, 1))


def _logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registered_and_built_from_an_arg_string(llama_dir):
    cls = get_model("longreach")
    assert cls is LongReachLM
    lm = cls.create_from_arg_string(model_args(pretrained=llama_dir, attention="streaming",
                                               window=16, sinks=2, prefill_chunk=8))
    assert lm.model.config.longreach_attention["kind"] == "streaming"
    assert lm.prefill_chunk == 8 and lm.max_length is None
    assert lm.prefix_token_id == 256 and lm.eot_token_id == 257
    with pytest.raises(ValueError, match="--group-size do"):
        cls.create_from_arg_string(f"pretrained={llama_dir},attention=streaming,group_size=4")
    with pytest.raises(ValueError, match="missing' not found .*a shipped checkpoint"):
        LongReachLM(pretrained=str(llama_dir / "missing"))


@pytest.mark.parametrize("folder,extra", [("llama_dir", {}), ("swa_dir", {}),
                                          ("llama_dir", {"attention": "cca", "group_size": 4,
                                                         "window": 8})])
def test_loglikelihood_matches_a_full_forward(request, folder, extra):
    path = request.getfixturevalue(folder)
    lm = LongReachLM(pretrained=str(path), prefill_chunk=7, device="cpu", **extra)
    tok = lm.tokenizer
    context, continuation = "The pass key is 12345. The pass key is", " 12345"
    (logprob, greedy), (empty, _) = lm.loglikelihood([
        _request("loglikelihood", (context, continuation)),
        _request("loglikelihood", ("", "hello there"), 1),
    ])
    ids = tok.encode(context + continuation)
    n = len(tok.encode(continuation, add_special_tokens=False))
    want = _logprobs(lm.model, ids)[-n:].sum()
    assert logprob == pytest.approx(float(want), abs=1e-3)
    assert logprob < 0 and isinstance(greedy, bool)
    want_empty = _logprobs(lm.model, [lm.prefix_token_id] + tok.encode("hello there")).sum()
    assert empty == pytest.approx(float(want_empty), abs=1e-3)
    # trailing context spaces move to the continuation: the same tokens are scored
    (moved, _), = lm.loglikelihood([_request("loglikelihood", (context + " ", "12345"))])
    assert moved == pytest.approx(logprob, abs=1e-4)


def test_greedy_flag(llama_dir):
    lm = LongReachLM(pretrained=str(llama_dir), device="cpu")
    # a context whose greedy next byte is printable, so it round-trips through text
    for context in ("abc abc abc", "The pass key is", "xyz", "0123456789", "Hello, world"):
        with torch.no_grad():
            best = int(lm.model(torch.tensor([lm.tokenizer.encode(context)])).logits[0, -1].argmax())
        if 33 <= best < 127:
            break
    else:
        pytest.fail("no context with a printable greedy byte")
    other = chr(best + 1 if best < 126 else best - 1)
    (_, greedy), (_, not_greedy) = lm.loglikelihood([
        _request("loglikelihood", (context, chr(best))),
        _request("loglikelihood", (context, other), 1),
    ])
    assert greedy is True and not_greedy is False


def test_loglikelihood_rolling(llama_dir):
    text = "In the beginning God created the heaven and the earth. " * 3
    lm = LongReachLM(pretrained=str(llama_dir), prefill_chunk=16, device="cpu")
    (total,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_token_id] + lm.tokenizer.encode(text, add_special_tokens=False)
    assert total == pytest.approx(float(_logprobs(lm.model, ids).sum()), abs=1e-2)
    # windows of max_length: every token scored once, with less context
    windowed = LongReachLM(pretrained=str(llama_dir), max_length=32, device="cpu")
    (short,) = windowed.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
    assert short < 0 and short != pytest.approx(total, abs=1e-3)


def test_generate_until_is_greedy_and_stops(llama_dir):
    lm = LongReachLM(pretrained=str(llama_dir), prefill_chunk=5, device="cpu")
    context = "What is the pass key? The pass key is"
    ids = lm.tokenizer.encode(context)
    with torch.no_grad():
        want = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=258)[0, len(ids):]
    want_text = lm.tokenizer.decode(want.tolist(), skip_special_tokens=True)
    (free,) = lm.generate_until([_request("generate_until", (context, {"max_gen_toks": 12,
                                                                         "until": []}))])
    assert free == want_text
    stop = want_text[3:5]
    (cut,) = lm.generate_until([_request("generate_until", (context, {"max_gen_toks": 12,
                                                                        "until": [stop]}))])
    assert cut == want_text[: want_text.index(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_request("generate_until", (context, {"do_sample": True,
                                                                 "temperature": 0.7}))])


def test_streaming_plugin_generation_matches_plain_chunking(llama_dir):
    # the window covers the whole input: streaming attention equals the model's own
    plain = LongReachLM(pretrained=str(llama_dir), device="cpu")
    streaming = LongReachLM(pretrained=str(llama_dir), attention="streaming", window=512, sinks=4,
                            prefill_chunk=9, device="cpu")
    args = ("The pass key is 4242. What is the pass key?", {"max_gen_toks": 6})
    assert (streaming.generate_until([_request("generate_until", args)])
            == plain.generate_until([_request("generate_until", args)]))


def test_clear_error_without_lm_eval(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    monkeypatch.delitem(sys.modules, "longreach.eval.lm_eval")
    with pytest.raises(ImportError, match=r"pip install 'longreach\[eval\]'"):
        importlib.import_module("longreach.eval.lm_eval")
    monkeypatch.setitem(sys.modules, "longreach.eval.lm_eval", adapter)


@pytest.fixture
def offline_sentence_splitter(tmp_path, monkeypatch):
    """lm-eval's RULER generators split text with nltk's Punkt, whose trained English tables
    are a download: an empty parameter set (Punkt without learned abbreviations) is found
    first, which splits RULER's haystack sentences the same way."""
    nltk = pytest.importorskip("nltk")
    pytest.importorskip("wonderwords")
    english = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk_data"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data"), *nltk.data.path])


@pytest.fixture
def bpe_llama_dir(tmp_path):
    """A tiny random Llama with a local BPE tokenizer: RULER sizes prompts in tokens, and its
    variable-tracking example does not fit 500 byte-level tokens."""
    from longreach.data.tokenizer import train_bpe_tokenizer

    text = tmp_path / "text.txt"
    text.write_text((
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
        "again.\nOne of the special magic numbers for lively-river is: 1234567.\n"
        "VAR ABCDE = 12345\nVAR FGHIJ = VAR ABCDE\nWhat are all the special magic numbers for "
        "quiet-stone mentioned in the provided text? Answer: According to the chain(s) of "
        "variable assignment\n") * 50)
    folder = tmp_path / "model"
    tok = train_bpe_tokenizer(str(text), 400, folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, pad_token_id=2)).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_ruler_tasks_run_offline(offline_sentence_splitter, bpe_llama_dir):
    """lm-eval's own RULER tasks (no hub: they build their data) through the adapter."""
    from transformers import AutoTokenizer

    results = lm_eval.simple_evaluate(
        model="longreach", model_args=model_args(pretrained=bpe_llama_dir, prefill_chunk=1024),
        tasks=["niah_single_1", "ruler_vt"], limit=2, log_samples=True,
        metadata={"max_seq_lengths": [4096], "tokenizer": str(bpe_llama_dir)},
    )
    tok = AutoTokenizer.from_pretrained(bpe_llama_dir)
    for task in ("niah_single_1", "ruler_vt"):
        scores = results["results"][task]
        assert scores["sample_len"] == 2
        assert 0.0 <= scores["4096,none"] <= 1.0  # an untrained model: the pipeline, not the score
        samples = results["samples"][task]
        assert len(samples) == 2
        for sample in samples:
            context = sample["arguments"][0][0]
            # the generators filled the context close to the requested length
            assert 3000 < len(tok(context).input_ids) <= 4096
            assert isinstance(sample["resps"][0][0], str)


def test_pretrained_takes_a_checkpoint_name_and_names_a_broken_file(swa_dir, tmp_path,
                                                                   monkeypatch):
    import shutil

    from longreach.checkpoints import checkpoint_path
    from longreach.models.loading import ModelFolderError

    monkeypatch.chdir(tmp_path)  # no folder called swa-tiny here: the shipped checkpoint
    lm = LongReachLM(pretrained="swa-tiny", device="cpu")
    assert lm.tokenizer_name == str(checkpoint_path("swa-tiny"))
    broken = shutil.copytree(swa_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match=f"{weights} is unreadable .*save the model again"):
        LongReachLM(pretrained=str(broken), device="cpu")
    with pytest.raises(ModelFolderError, match="'nope' not found .*gca-tiny, swa-tiny"):
        LongReachLM(pretrained="nope", device="cpu")


def test_a_folder_saved_with_cca_runs_with_it(llama_dir, tmp_path):
    from longreach.integrations import hf

    folder = tmp_path / "cca"
    hf.enable_cca(hf.from_pretrained(llama_dir), group_size=4, window=16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    lm = LongReachLM(pretrained=str(folder), device="cpu")
    assert lm.model.config._attn_implementation == hf.ATTENTION_NAME
    assert hf.plugin_settings(lm.model)["group_size"] == 4
