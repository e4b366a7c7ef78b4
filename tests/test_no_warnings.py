"""What a user runs (generate on the shipped models, greedy and sampled, HF generate with
prefill chunks, the demo's evaluation) shows no warning that our calls trigger: no Python
warning and no transformers log line. Run on the installed transformers; .ci/lowest-transformers
runs it again on 5.17, the lowest supported."""

import contextlib
import logging
import warnings

import pytest
import torch

from longreach.cli import main


@contextlib.contextmanager
def everything_warned():
    """Python warnings (each one, even if shown before) and transformers' log records at
    WARNING and above (warned-once messages shown again), collected in a list."""
    from transformers.utils import logging as hf_logging

    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(f"{record.name}: {record.getMessage()}")
    library = hf_logging.get_logger("transformers")  # transformers' root: it does not propagate
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught)
    finally:
        library.removeHandler(handler)


def test_the_check_sees_warnings():
    from transformers.utils import logging as hf_logging

    with everything_warned() as seen:
        hf_logging.get_logger("transformers.generation.utils").warning_once("a deprecation")
        warnings.warn("a future change", FutureWarning, stacklevel=1)
    assert len(seen) == 2 and "a deprecation" in seen[0] and "FutureWarning" in seen[1]


@pytest.mark.parametrize("name", ["gca-tiny", "swa-tiny"])
@pytest.mark.parametrize("sampling", [[], ["--greedy"]], ids=["sampled", "greedy"])
def test_generate_on_the_shipped_models_warns_nothing(name, sampling, capsys):
    with everything_warned() as seen:
        assert main(["generate", "--model", name, "--prompt", "In the beginning",
                     "--max-new-tokens", "12", "--device", "cpu", *sampling]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("In the beginning")
    assert seen == [] and out.err == "", (seen, out.err)


@pytest.mark.parametrize("name", ["gca-tiny", "swa-tiny"])
def test_hf_generate_with_prefill_chunks_warns_nothing(name):
    from longreach.checkpoints import checkpoint_path
    from longreach.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(checkpoint_path(name))
    ids = torch.tensor([tok.encode("The passkey is 123. " * 20, add_special_tokens=False)])
    with everything_warned() as seen, torch.no_grad():
        chunked = model.eval().generate(ids, max_new_tokens=6, do_sample=False,
                                        prefill_chunk_size=64)
        whole = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert seen == [], seen
    assert torch.equal(chunked, whole)


def test_the_demos_evaluation_warns_nothing(tmp_path, capsys):
    from longreach.demo import run_demo

    with everything_warned() as seen:
        assert run_demo(out_dir=str(tmp_path / "demo"), plan={1: ((0.5,), 1)}, progress=False) == 0
    assert seen == [], seen
    assert capsys.readouterr().err == ""


def test_checkpointing_and_the_cca_cache_bench_warn_nothing(tmp_path):
    """Two more places that drive transformers' API: gradient checkpointing (renamed in
    5.2x; the old name warns) and `bench cca-cache` (a Llama's cache argument)."""
    from longreach import LongReachConfig, LongReachForCausalLM
    from longreach.bench import cca_cache
    from longreach.models.compat import enable_checkpointing

    model = LongReachForCausalLM(LongReachConfig(hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, mixers="swa"))
    with everything_warned() as seen:
        enable_checkpointing(model)
        model.train()(torch.randint(0, 64, (1, 16)), labels=torch.randint(0, 64, (1, 16))).loss.backward()
        for cca in (False, True):
            llama = cca_cache.build_model(hidden=32, heads=2, kv_heads=1, cca=cca, group_size=4,
                                          window=16)
            cca_cache.prefill(llama, 96, 32, cca=cca)
    assert seen == [], seen
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
