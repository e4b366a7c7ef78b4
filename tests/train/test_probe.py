"""The retrieval probe: needle chunks located exactly, metrics in range, forced retrieval read
correctly, and the trainer logging it for GCA runs only, without changing the training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import longreach.models.gca.retrieval as retrieval
from longreach.data import byte_tokenizer
from longreach.models.gca import GCAConfig, GCAForCausalLM
from longreach.train import load_config, train
from longreach.train.probe import DISTANCE_BUCKETS, RetrievalProbe, bucket_name

SEQ = 320


def tiny_gca(landmark: str = "cls") -> GCAForCausalLM:
    torch.manual_seed(0)
    cfg = GCAConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=260,
        mixers=[{"type": "swa", "window": 16}, {"type": "gca", "window": 16}],
        gca={"chunk_size": 16, "top_k": 2, "landmark": landmark},
    )
    return GCAForCausalLM(cfg)


@pytest.mark.parametrize("landmark", ["cls", "token"])
def test_prompts_end_at_the_first_digit_and_locate_the_key(landmark):
    tok = byte_tokenizer()
    model = tiny_gca(landmark)
    probe = RetrievalProbe(model, tok, SEQ, n_prompts=5, seed=3)
    assert probe.input_ids.shape == (5, SEQ)
    stack = model.model.gca
    assert probe.query_chunk == stack.chunk_answering(SEQ - 1)
    for i, key in enumerate(probe.keys):
        ids = probe.input_ids[i].tolist()
        assert tok.decode(ids).endswith("What is the pass key? The pass key is ")
        assert tok.decode([int(probe.answers[i])]) == key[0]
        # the key's tokens, both copies of it in the needle
        assert tok.decode([ids[p] for p in probe.needle_positions[i]]) == key + key
        assert probe.needle_chunks[i] == {stack.chunk_of_token(p) for p in probe.needle_positions[i]}
    first = [min(p) for p in probe.needle_positions]
    assert first == sorted(first)  # depths 0 .. 1
    again = RetrievalProbe(model, tok, SEQ, n_prompts=5, seed=3)
    assert torch.equal(again.input_ids, probe.input_ids)  # a fixed batch


def test_metrics_are_rates_on_an_untrained_model():
    tok = byte_tokenizer()
    model = tiny_gca("token")
    text = [{"input_ids": torch.randint(0, 256, (3, SEQ))}]
    probe = RetrievalProbe(model, tok, SEQ, n_prompts=4, text_batches=text, batch_size=3)
    model.train()
    metrics = probe.run(model)
    assert model.training  # the mode comes back
    names = {"probe/answer_acc", "probe/needle_in_topk", "probe/needle_first", "probe/needle_weight",
             "probe/weight_entropy", "probe/landmark_cosine"} | {bucket_name(*b) for b in DISTANCE_BUCKETS}
    assert set(metrics) == names
    for name, value in metrics.items():
        assert (-1.0 if name == "probe/landmark_cosine" else 0.0) <= value <= 1.0, name
    assert sum(metrics[bucket_name(*b)] for b in DISTANCE_BUCKETS) == pytest.approx(1.0)
    assert metrics["probe/weight_entropy"] > 0.5  # an untrained retriever spreads its weight
    assert probe.run(model) == metrics  # no noise in eval mode, no state


def test_forced_retrieval_of_the_needle_reads_as_found(monkeypatch):
    tok = byte_tokenizer()
    model = tiny_gca("cls").eval()
    probe = RetrievalProbe(model, tok, SEQ, n_prompts=4, batch_size=4)
    assert all(probe.eligible[:3])
    q = probe.query_chunk
    target = [min(c for c in chunks if c <= q - 2) if ok else 0
              for chunks, ok in zip(probe.needle_chunks, probe.eligible)]
    real = retrieval.chunk_scores

    def needle_first(queries, landmarks, first_chunk):
        scores = real(queries, landmarks, first_chunk)
        for b, c in enumerate(target):
            scores[b, q - first_chunk, c] = 1e4  # the needle chunk wins, with all the weight
        return scores

    monkeypatch.setattr(retrieval, "chunk_scores", needle_first)
    metrics = probe.run(model)
    assert metrics["probe/needle_first"] == 1.0 and metrics["probe/needle_in_topk"] == 1.0
    assert metrics["probe/needle_weight"] == pytest.approx(1.0)

    def needle_last(queries, landmarks, first_chunk):
        scores = real(queries, landmarks, first_chunk)
        for b, chunks in enumerate(probe.needle_chunks):
            for c in chunks:
                if c < scores.shape[2]:
                    scores[b, :, c] = -1e4  # visible, never picked
        return scores

    monkeypatch.setattr(retrieval, "chunk_scores", needle_last)
    metrics = probe.run(model)
    assert metrics["probe/needle_first"] == 0.0 and metrics["probe/needle_in_topk"] == 0.0
    assert metrics["probe/needle_weight"] == 0.0


def test_probe_refusals():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="no gca layers"):
        RetrievalProbe(torch.nn.Linear(2, 2), tok, SEQ)
    with pytest.raises(ValueError, match="seq_len=40 is too short for the retrieval probe"):
        RetrievalProbe(tiny_gca(), tok, 40)
    with pytest.raises(ValueError, match="seq_len=120 is too short for the retrieval probe"):
        RetrievalProbe(tiny_gca(), tok, 120)  # a prompt needs its scaffolding


def test_probe_settings_are_checked():
    assert load_config(None, []).train.probe_every is None
    with pytest.raises(ValueError, match="train.probe_every must be >= 0 or null"):
        load_config(None, ["train.probe_every=-1"])
    with pytest.raises(ValueError, match="train.probe_prompts must be >= 1"):
        load_config(None, ["train.probe_prompts=0"])


# --------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-data")
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(300):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 80)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")
    return root


GCA = [
    "model.num_key_value_heads=1",
    "model.mixers=[{type: swa, window: 16}, {type: gca, window: 16}]",
    "model.gca={chunk_size: 16, top_k: 2, landmark: cls}",
    f"data.seq_len={SEQ}",
]


def run(corpus: Path, out: Path, *extra: str) -> list[dict]:
    overrides = [
        "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", "model.mixers={type: swa, window: 16}",
        f"data.source={corpus / 'corpus.jsonl'}", f"data.cache_dir={corpus / 'cache'}",
        "data.seq_len=32", "data.val_fraction=0.05", "train.steps=4", "train.batch_size=2",
        "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
        "train.save_every=0", "train.precision=fp32", "train.device=cpu", "train.probe_prompts=3",
        f"train.out_dir={out}", *extra,
    ]
    run_dir = train(load_config(None, overrides))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_logs_the_probe_for_gca_runs_only(corpus, tmp_path, capsys):
    records = run(corpus, tmp_path / "gca", *GCA)
    probes = [r for r in records if "probe/needle_first" in r]
    assert [r["step"] for r in probes] == [2, 4]  # with the held-out loss, and at the end
    for r in probes:
        assert all(0.0 <= v <= 1.0 for k, v in r.items() if k != "step")
        assert "probe/weight_entropy" in r and "probe/distance_2" in r
    losses = [r["loss"] for r in records if "loss" in r]
    # the probe draws no random numbers and keeps no state: the same training without it
    off = run(corpus, tmp_path / "gca-off", *GCA, "train.probe_every=0")
    assert not [r for r in off if any(k.startswith("probe/") for k in r)]
    assert [r["loss"] for r in off if "loss" in r] == losses
    every = run(corpus, tmp_path / "gca-3", *GCA, "train.probe_every=3", "train.steps=3")
    assert [r["step"] for r in every if "probe/needle_first" in r] == [3]  # the end only: 3 = steps
    capsys.readouterr()
    plain = run(corpus, tmp_path / "swa", "train.probe_every=1")
    assert not [r for r in plain if any(k.startswith("probe/") for k in r)]
    err = capsys.readouterr().err
    assert err.count("train.probe_every is set, but the model has no gca layers") == 1


def test_mean_pairwise_cosine_matches_the_pairs():
    from longreach.models.gca.retrieval import mean_pairwise_cosine

    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    unit = torch.nn.functional.normalize(x, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    off = ~torch.eye(7, dtype=torch.bool)
    assert mean_pairwise_cosine(x) == pytest.approx(float(cos[:, off].mean()), abs=1e-6)
    same = torch.ones(1, 4, 3) * torch.tensor([1.0, 2.0, 3.0])
    assert mean_pairwise_cosine(same) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(torch.randn(1, 1, 3)) is None
