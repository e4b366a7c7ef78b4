"""Initial recurrent states in training (zero, random/fitted noise, state passing, TBTT), the
loader's stream mode and starting a run from pretrained weights."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from longreach.cache import LongReachCache
from longreach.data import BatchLoader, PackedSequences
from longreach.models import LongReachConfig, LongReachForCausalLM
from longreach.train import load_config, train
from longreach.train.checkpoint import read_trainer_state
from longreach.train.interventions import InitialStates

MAMBA2 = {"type": "mamba2", "state_size": 8, "expand": 2, "head_dim": 16, "chunk_size": 8}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(mixers=None, seed=0) -> LongReachForCausalLM:
    torch.manual_seed(seed)
    config = LongReachConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, mixers=mixers or MAMBA2,
    )
    return LongReachForCausalLM(config)


# --------------------------------------------------------------------------- stream loader


def test_stream_loader_rows_continue_and_resume():
    tokens = np.arange(1000)
    loader = BatchLoader(PackedSequences(tokens, 10), 2, stream=True, world_size=2, rank=1)
    # 4 streams of 25 chunks (250 tokens each); rank 1 holds streams 2 and 3
    first, second = next(loader)["input_ids"], next(loader)["input_ids"]
    assert loader.stream_chunks == 25
    assert first[:, 0].tolist() == [500, 750] and second[:, 0].tolist() == [510, 760]
    assert torch.equal(second[:, 0], first[:, -1] + 1)  # row b continues row b
    state = loader.state_dict()
    resumed = BatchLoader(PackedSequences(tokens, 10), 2, stream=True, world_size=2, rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(next(resumed)["input_ids"], next(loader)["input_ids"])
    for _ in range(22):
        next(loader)
    assert not loader.stream_start
    wrapped = next(loader)["input_ids"]  # a new epoch walks the streams from their starts
    assert loader.stream_start and wrapped[:, 0].tolist() == [500, 750]
    plain = BatchLoader(PackedSequences(tokens, 10), 4)
    with pytest.raises(ValueError, match="stream"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match="streams"):
        BatchLoader(PackedSequences(tokens, 10), 2, stream=True).load_state_dict(state)
    with pytest.raises(ValueError, match="tokens"):
        BatchLoader(PackedSequences(tokens, 10), 200, stream=True)


def test_stream_segments_jump_to_random_places_and_resume():
    tokens = np.arange(10_000)

    def loader(**kw):
        return BatchLoader(PackedSequences(tokens, 10), kw.pop("batch_size", 2), stream=True,
                           stream_batches=3, seed=5, **kw)

    one = loader(world_size=2, rank=1)
    rows = [next(one)["input_ids"] for _ in range(7)]
    starts = [one_batch[:, 0].tolist() for one_batch in rows]
    # three consecutive pieces per segment, then every row elsewhere
    assert starts[1] == [s + 10 for s in starts[0]] and starts[2] == [s + 20 for s in starts[0]]
    assert all(abs(a - b) != 30 for a, b in zip(starts[3], starts[2]))
    assert len({s for batch in starts for s in batch}) == 14  # 2 rows x 7 batches, all distinct
    # the same rows at the same global batch size on one process
    single = loader(batch_size=4)
    assert next(single)["input_ids"][2:].tolist() == rows[0].tolist()
    # stream_start marks the first batch of each segment; a resume continues exactly
    fresh = loader(world_size=2, rank=1)
    flags = []
    for _ in range(4):
        next(fresh)
        flags.append(fresh.stream_start)
    assert flags == [True, False, False, True]
    state = json.loads(json.dumps(fresh.state_dict()))
    resumed = loader(world_size=2, rank=1)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["input_ids"], rows[4])
    whole = BatchLoader(PackedSequences(tokens, 10), 2, stream=True, world_size=2, rank=1)
    with pytest.raises(ValueError, match="stream_batches"):
        whole.load_state_dict(state)
    with pytest.raises(ValueError, match="stream_batches"):
        BatchLoader(PackedSequences(tokens, 10), 2, stream=True, stream_batches=2000)
    with pytest.raises(ValueError, match="stream_batches"):
        BatchLoader(PackedSequences(tokens, 10), 2, stream=True, stream_batches=-1)


@pytest.mark.parametrize("stream_batches", [0, 4])
def test_stream_with_synthetic_rows_resets_their_states(stream_batches):
    from longreach.data import load_tokenizer

    tok = load_tokenizer("byte")
    tokens = np.arange(20_000) % 250

    def loader(**kw):
        return BatchLoader(PackedSequences(tokens, 32), 4, stream=True, stream_batches=stream_batches,
                           synthetic={"task": "copy", "fraction": 0.3, "loss_weight": 2.0},
                           tokenizer=tok, seed=3, **kw)

    plain = BatchLoader(PackedSequences(tokens, 32), 4, stream=True, stream_batches=stream_batches,
                        seed=3)
    mixed = loader()
    previous = None
    for _ in range(12):
        text, batch = next(plain), next(mixed)
        synthetic = (batch["input_ids"] != text["input_ids"]).any(dim=1)
        # a synthetic row replaces the stream's piece; the other rows are the stream's text
        assert torch.equal(batch["input_ids"][~synthetic], text["input_ids"][~synthetic])
        assert torch.equal(batch["loss_weights"][synthetic] == 2.0,
                           torch.ones_like(batch["loss_weights"][synthetic], dtype=torch.bool))
        expected = synthetic.clone()
        if previous is not None and not mixed.stream_start:
            expected |= previous
        if not mixed.stream_start:
            assert torch.equal(batch["state_reset"], expected)
        previous = synthetic
    seen = sum(bool(batch["state_reset"].any()) for batch in (next(mixed) for _ in range(20)))
    assert seen > 0
    # resumable with workers too: the same batches from a saved position
    state = json.loads(json.dumps(mixed.state_dict()))
    again = loader(workers=1)
    again.load_state_dict(state)
    for _ in range(3):
        a, b = next(mixed), next(again)
        assert all(torch.equal(a[k], b[k]) for k in a)
    again.close()


def test_reset_rows_zeroes_only_those_rows():
    model = tiny_model()
    states = InitialStates("tbtt")
    cache = states.cache_for(model, 3, "cpu")
    with torch.no_grad():
        model(torch.randint(0, 50, (3, 16)), past_key_values=cache, use_cache=False)
    states.observe(cache)
    before = [t.clone() for t in states.carried[0] if t is not None]
    states.reset_rows(torch.tensor([False, True, False]))
    after = [t for t in states.carried[0] if t is not None]
    for old, new in zip(before, after):
        assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2])
        assert not new[1].any() and old[1].any()


# ------------------------------------------------------------------------- model-level


def test_tbtt_batches_equal_one_pass_over_the_whole_sequence():
    model = tiny_model().eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=2 * 4 * 12)
    loader = BatchLoader(PackedSequences(tokens, 12), 2, stream=True)  # 2 rows of 4 chunks
    states = InitialStates("tbtt")
    pieces = []
    with torch.no_grad():
        for _ in range(4):
            batch = next(loader)
            if loader.stream_start:
                states.reset()
            cache = states.cache_for(model, 2, "cpu")
            pieces.append(model(batch["input_ids"], past_key_values=cache, use_cache=False).logits)
            states.observe(cache)
            assert states.carried[0][1] is not None  # the conv state is carried too
        whole = model(torch.from_numpy(tokens.reshape(2, 48)), use_cache=False).logits
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-4)
    # without carrying, the chunks differ from the whole pass
    with torch.no_grad():
        alone = model(torch.from_numpy(tokens.reshape(2, 48)[:, 12:24])).logits
    assert not torch.allclose(alone, whole[:, 12:24], atol=1e-3)


def test_state_passing_detaches_between_batches():
    model = tiny_model().train()
    states = InitialStates("state_passing")
    gen = torch.Generator().manual_seed(0)
    ids1, ids2 = (torch.randint(0, 50, (2, 16), generator=gen) for _ in range(2))
    cache = states.cache_for(model, 2, "cpu")
    assert all(cache[i].state is None for i in range(2))  # nothing carried yet: zeros
    model(ids1, labels=ids1, past_key_values=cache).loss.backward()
    states.observe(cache)
    cache2 = states.cache_for(model, 2, "cpu")
    init = cache2[0].state
    assert init is not None and not init.requires_grad and init.grad_fn is None
    assert cache2[0].conv_state is None  # only the recurrent state is passed
    model.zero_grad()
    out = model(ids2, labels=ids2, past_key_values=cache2)
    # backward of batch 2 would fail on batch 1's freed graph if it reached it
    out.loss.backward()
    with torch.no_grad():
        zero_start = model(ids2).logits
    assert (out.logits.detach() - zero_start).abs().max() > 1e-5  # the passed state is used


def test_hybrid_gives_attention_layers_no_cache():
    model = tiny_model([MAMBA2, {"type": "swa", "window": 8}])
    states = InitialStates("random_noise", sigma=0.5)
    cache = states.cache_for(model, 3, "cpu")
    assert isinstance(cache, LongReachCache) and cache[1] is None
    assert cache[0].state.shape == (3, 4, 8, 16) and model.training  # the probe restores it
    assert cache[0].state.std().item() == pytest.approx(0.5, rel=0.1)


def test_bad_values_raise():
    for override in (
        "train.initial_state=noise",
        "train.initial_state_prob=1.5",
        "train.initial_state_sigma=0",
    ):
        with pytest.raises(ValueError, match="train.initial_state"):
            load_config(None, [override])
    with pytest.raises(ValueError, match="train.tbtt_batches"):
        load_config(None, ["train.tbtt_batches=-1"])
    with pytest.raises(ValueError, match="recurrent layer"):
        InitialStates("state_passing").bind(tiny_model({"type": "swa", "window": 8}))
    InitialStates("zero").bind(tiny_model({"type": "swa", "window": 8}))  # zero needs none


# ------------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(200):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")
    return root


def run(data_dir, out_dir, *extra, resume=None, mixers=None) -> Path:
    mixers = json.dumps(mixers or MAMBA2)
    overrides = [
        "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", f"model.mixers={mixers}",
        f"data.source={data_dir / 'corpus.jsonl'}", f"data.cache_dir={data_dir / 'cache'}",
        "data.seq_len=32", "data.val_fraction=0.05", "train.steps=6", "train.batch_size=2",
        "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "train.save_every=3", "train.precision=fp32", "train.device=cpu",
        f"train.out_dir={out_dir}", *extra,
    ]
    return train(load_config(None, overrides), resume=resume)


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_zero_keeps_the_plain_forward_and_noise_changes_it(data_dir, tmp_path, monkeypatch):
    calls = []
    forward = LongReachForCausalLM.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("past_key_values"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LongReachForCausalLM, "forward", spy)
    zero = train_losses(run(data_dir, tmp_path / "zero"))
    assert calls and all(c is None for c in calls)  # today's call, unchanged
    monkeypatch.setattr(LongReachForCausalLM, "forward", forward)
    # probability 0: every row starts from zeros, through the cache path
    none_drawn = train_losses(
        run(data_dir, tmp_path / "p0", "train.initial_state=random_noise",
            "train.initial_state_prob=0")
    )
    assert none_drawn == pytest.approx(zero, rel=1e-5)
    noisy = [
        train_losses(run(data_dir, tmp_path / f"noise{i}", "train.initial_state=random_noise"))
        for i in range(2)
    ]
    assert noisy[0] == noisy[1]  # deterministic under the seed
    assert noisy[0][0] != pytest.approx(zero[0], rel=1e-3)


SYNTHETIC = 'data.synthetic={"task": "copy", "fraction": 0.5}'


@pytest.mark.parametrize("kind,extra", [("fitted_noise", ()), ("tbtt", ()),
                                        ("tbtt", (SYNTHETIC, "train.tbtt_batches=2"))])
def test_resume_is_exact_with_initial_states(data_dir, tmp_path, kind, extra):
    ref = run(data_dir, tmp_path / "ref", f"train.initial_state={kind}", *extra)
    state = read_trainer_state(ref / "checkpoints" / "step_0000003")["initial_states"][0]
    if kind == "fitted_noise":
        count, total, squares = state["stats"][0]
        assert count.shape == (4,) and float(count[0]) == 3 * 2 * 8 * 16  # 3 batches of 2 rows
    else:
        assert state["carried"][0][0].shape == (2, 4, 8, 16)
        assert state["carried"][0][1] is not None
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        ref / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003"
    )
    shutil.copy(ref / "metrics.jsonl", resumed / "metrics.jsonl")
    run(data_dir, resumed, f"train.initial_state={kind}", *extra, resume="latest")
    assert train_losses(resumed) == train_losses(ref)


def test_hybrid_trains_with_state_passing(data_dir, tmp_path):
    mixers = [MAMBA2, {"type": "swa", "window": 8}]
    losses = train_losses(
        run(data_dir, tmp_path / "sp", "train.initial_state=state_passing", mixers=mixers)
    )
    assert len(losses) == 6 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        run(data_dir, tmp_path / "gc", "train.initial_state=state_passing",
            "train.gradient_checkpointing=true", mixers=mixers)


def test_init_from_starts_from_saved_weights(data_dir, tmp_path):
    base = run(data_dir, tmp_path / "base")
    post = run(data_dir, tmp_path / "post", f"train.init_from={base / 'final'}",
               "train.initial_state=state_passing")
    first_base, first_post = train_losses(base)[0], train_losses(post)[0]
    assert first_post < first_base - 0.5  # it starts where the base run ended, not from scratch
    with pytest.raises(FileNotFoundError):
        run(data_dir, tmp_path / "missing", f"train.init_from={tmp_path / 'nowhere'}")


def test_compile_scope_mixers_compiles_each_mixer_and_trains_alike(data_dir, tmp_path,
                                                                   monkeypatch):
    from longreach.train import trainer as trainer_module

    compiled = []
    real = trainer_module.compile_mixers
    monkeypatch.setattr(trainer_module, "compile_mixers",
                        lambda model: compiled.append(real(model)) or compiled[-1])
    eager = train_losses(run(data_dir, tmp_path / "eager", "train.steps=2"))
    fused = train_losses(run(data_dir, tmp_path / "mixers", "train.steps=2", "train.compile=true",
                             "train.compile_scope=mixers"))
    assert compiled == [2]  # both layers' mixers
    assert fused == pytest.approx(eager, rel=1e-4)
    with pytest.raises(ValueError, match="has none"):
        real(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="train.compile_scope"):
        load_config(None, ["train.compile_scope=layers"])
