"""``--resume`` over a damaged newest checkpoint falls back to the previous good one and says
so; a damaged checkpoint named explicitly is a one-line error. A broken model folder given to
``finetune`` names the file."""

import json
import warnings

import pytest

from longreach.cli import main
from longreach.train import list_checkpoints
from longreach.train.finetune import FinetuneModel, load_model


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 6}
            for i in range(40)]
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return path


def tiny_swa(corpus, out, steps):
    """The tiny-swa recipe, shrunk to seconds on a CPU, checkpointing every 2 steps."""
    return ["train", "--config", "tiny-swa", "model.hidden_size=32", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=1",
            "model.intermediate_size=64", f"data.source={corpus}", "data.seq_len=32",
            "data.val_fraction=0.05", f"train.steps={steps}", "train.batch_size=2",
            "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
            "train.save_every=2", "train.keep_last=5", "train.log_every=1", "train.device=cpu",
            f"train.out_dir={out}"]


def test_resume_skips_a_truncated_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_swa(corpus, out, steps=4)) == 0
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    older, newest = (path for _, path in list_checkpoints(out))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])

    # named explicitly: an error naming the file, no fallback
    capsys.readouterr()
    assert main([*tiny_swa(corpus, out, steps=6), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("longreach train: error: ")
    assert f"{weights} is unreadable" in err and "--resume alone" in err

    # latest: one warning naming the skipped checkpoint and the one used, then the run completes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*tiny_swa(corpus, out, steps=6), "--resume"]) == 0
    assert not [w for w in caught if "damaged" in str(w.message)]  # a line, not a UserWarning
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipping damaged checkpoint: ")
    assert f"{weights} is unreadable" in skipped[0] and f"using {older} instead" in skipped[0]
    assert f"resumed from {older} at step 2" in err
    assert [step for step, _ in list_checkpoints(out)] == [2, 4, 6]
    assert (out / "final" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 were trained again from step 2


def test_finetune_names_a_truncated_weights_file(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_swa(corpus, out, steps=2)) == 0
    weights = out / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{weights} is unreadable"):
        load_model(FinetuneModel(path=str(out / "final"), attention="full"))
