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
