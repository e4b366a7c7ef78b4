"""The training loop on CPU with a tiny model: schedule, exact resume, signals, divergence,
damaged checkpoints, pruning and the final model folder."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longreach  # noqa: F401  (registers the model with the Auto classes)
from longreach.train import (
    CheckpointError,
    TrainingDiverged,
    find_latest_checkpoint,
    list_checkpoints,
    load_config,
    train,
    validate_checkpoint,
)
from longreach.train.checkpoint import resolve_resume
from longreach.train.schedule import build_scheduler, lr_at

REPO = Path(__file__).resolve().parents[2]
STEPS = 80  # long enough that a killed subprocess is caught mid-run
TIME_FIELDS = ("tokens_per_s", "elapsed")


# ----------------------------------------------------------------------------- schedule


def test_schedule_warmup_cosine_and_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, steps=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0  # cosine starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(1000, **kw) == pytest.approx(0.1)  # stays at min_lr past the end
    values = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_schedule_against_transformers_cosine_with_min_lr():
    """Why longreach keeps its own schedule (train/schedule.py's docstring): transformers'
    warmup + cosine-to-min-lr agrees on the cosine, but its first step has lr 0 and it climbs
    again after the last step. If transformers changes either, this fails: switch to it."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    kw = dict(lr=3e-3, min_lr=3e-5, warmup_steps=10, steps=60)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=kw["lr"])
    theirs_schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=kw["warmup_steps"], num_training_steps=kw["steps"],
        min_lr=kw["min_lr"])
    theirs = []
    for _ in range(70):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs_schedule.step()
    ours = [lr_at(step, **kw) for step in range(70)]
    assert ours[10:61] == pytest.approx(theirs[10:61], rel=1e-12)  # the cosine: the same
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(3e-4)  # a first step that learns
    assert ours[:10] == pytest.approx([3e-4 * (s + 1) for s in range(10)])
    assert theirs[1:10] == pytest.approx(ours[:9])  # theirs: one step later
    assert all(lr == pytest.approx(3e-5) for lr in ours[60:])  # ours stays at min_lr
    assert all(b > a for a, b in zip(theirs[60:], theirs[61:], strict=False))  # theirs climbs


def test_schedule_without_warmup_or_decay():
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup_steps=0, steps=10) == 2.0
    assert lr_at(5, lr=2.0, min_lr=2.0, warmup_steps=0, steps=10) == 2.0
    assert lr_at(3, lr=2.0, min_lr=0.0, warmup_steps=10, steps=10) == pytest.approx(0.8)


def test_scheduler_drives_the_optimizer():
    cfg = load_config(
        None, ["train.lr=0.5", "train.min_lr=0.05", "train.warmup_steps=2", "train.steps=6"]
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = build_scheduler(opt, cfg.train)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    kw = dict(lr=0.5, min_lr=0.05, warmup_steps=2, steps=6)
    assert seen == pytest.approx([lr_at(s, **kw) for s in range(8)])


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny matmuls run fastest on one thread (and the subprocesses use one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small JSONL corpus and a token cache shared by this module's runs."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")
    return root


def tiny_overrides(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "name=tiny",
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=2",
        "model.mixers={type: swa, window: 16}",
        f"data.source={data_dir / 'corpus.jsonl'}",
        f"data.cache_dir={data_dir / 'cache'}",
        "data.seq_len=32",
        "data.val_fraction=0.05",
        f"train.steps={STEPS}",
        "train.batch_size=2",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.warmup_steps=5",
        "train.log_every=1",
        "train.eval_every=10",
        "train.eval_batches=2",
        "train.save_every=5",
        "train.keep_last=100",
        "train.precision=fp32",
        "train.device=cpu",
        f"train.out_dir={out_dir}",
        *extra,
    ]


def run(data_dir, out_dir, *extra, resume=None) -> Path:
    return train(load_config(None, tiny_overrides(data_dir, out_dir, *extra)), resume=resume)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[tuple]:
    """(step, kind, value) of every line, without the wall-clock fields."""
    out = []
    for r in records:
        kind = "eval_loss" if "eval_loss" in r else "loss"
        out.append((r["step"], kind, r[kind]))
    return out


def steps_of(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run that the resumed ones must reproduce."""
    run_dir = run(data_dir, tmp_path_factory.mktemp("reference") / "run")
    return run_dir, read_metrics(run_dir)


# ----------------------------------------------------------------------- runs and resume


def test_reference_run_outputs(reference):
    run_dir, records = reference
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, STEPS + 1))
    assert set(train_lines[0]) == {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed",
    }
    assert [r["step"] for r in records if "eval_loss" in r] == list(range(10, STEPS + 1, 10))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 1.0  # it learns
    assert train_lines[0]["lr"] == pytest.approx(3e-3 / 5)  # the rate step 1 used
    assert steps_of(run_dir) == list(range(5, STEPS + 1, 5))
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == STEPS and saved.model["hidden_size"] == 32


def test_resume_is_exact(data_dir, reference, tmp_path):
    ref_dir, ref_records = reference
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        ref_dir / "checkpoints" / "step_0000020", run_dir / "checkpoints" / "step_0000020"
    )
    shutil.copy(ref_dir / "metrics.jsonl", run_dir / "metrics.jsonl")  # the lines past 20 must go

    run(data_dir, run_dir, resume="latest")

    assert losses(read_metrics(run_dir)) == losses(ref_records)  # bitwise, step for step


def _launch(data_dir, out_dir, *extra, command=("-m", "longreach.train")) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    log = open(out_dir.parent / "stderr.txt", "w")
    return subprocess.Popen(
        [sys.executable, *command, *tiny_overrides(data_dir, out_dir, *extra)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=out_dir.parent,
    )


def _wait_for(proc, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _logged_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"loss"' in line)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_subprocess_resumes_exactly(data_dir, reference, tmp_path, sig):
    _, ref_records = reference
    run_dir = tmp_path / "run"
    if sig == signal.SIGKILL:
        proc = _launch(data_dir, run_dir)
        # a few steps past the checkpoint, so the resumed run must drop and redo them
        _wait_for(
            proc,
            lambda: (
                (run_dir / "checkpoints" / "step_0000010").is_dir() and _logged_steps(run_dir) >= 12
            ),
            "the step-10 checkpoint and two more steps",
        )
    else:  # no periodic checkpoints: the one SIGTERM writes is the only one
        proc = _launch(data_dir, run_dir, "train.save_every=0")
        _wait_for(proc, lambda: _logged_steps(run_dir) >= 3, "three logged steps")
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=120)
    logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]

    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, "the run finished before it could be killed"
        assert 12 <= logged[-1] < STEPS
    else:
        log = (tmp_path / "stderr.txt").read_text()
        assert rc == 128 + signal.SIGTERM, log  # 143: saved, but not finished
        stopped = logged[-1]
        assert stopped < STEPS
        assert steps_of(run_dir) == [stopped]  # saved exactly where it stopped
        assert not (run_dir / "final").exists()  # a signal is not the end of the run
        assert "saving a checkpoint after this step" in log
        assert f"stopped at step {stopped}/{STEPS} (SIGTERM); continue with --resume" in log

    run(data_dir, run_dir, resume="latest")

    got, want = losses(read_metrics(run_dir)), losses(ref_records)
    assert [g[:2] for g in got] == [w[:2] for w in want]  # every step once, in order
    # the steps before the checkpoint ran in another process (possibly other CPU threads)
    worst = max(abs(g[2] - w[2]) / abs(w[2]) for g, w in zip(got, want))
    assert worst <= 1e-6, f"resumed losses differ by up to {worst:.3g} (relative)"


def _cli_launch(data_dir, run_dir, *extra) -> subprocess.Popen:
    """``longreach train --config FILE ...`` (the tiny settings) in a subprocess."""
    recipe = run_dir.parent / "tiny.yaml"
    recipe.write_text("name: tiny\n")
    return _launch(
        data_dir, run_dir, *extra, command=("-m", "longreach", "train", "--config", str(recipe))
    )


@pytest.mark.slow
def test_sigint_through_the_cli_exits_130_and_resumes(data_dir, tmp_path):
    from longreach.cli import main

    run_dir = tmp_path / "run"
    proc = _cli_launch(data_dir, run_dir, "train.save_every=0")
    _wait_for(proc, lambda: _logged_steps(run_dir) >= 3, "three logged steps")
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=120)
    log = (tmp_path / "stderr.txt").read_text()
    assert rc == 130, log  # 128 + SIGINT, as for any command stopped by Ctrl-C
    stopped = [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1]
    assert stopped < STEPS and steps_of(run_dir) == [stopped]
    assert f"stopped at step {stopped}/{STEPS} (SIGINT); continue with --resume" in log
    assert "resume='latest'" not in log  # the API's wording is not the command's
    recipe = tmp_path / "tiny.yaml"
    argv = ["train", "--config", str(recipe), *tiny_overrides(data_dir, run_dir), "--resume"]
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))


def test_signal_stop_through_the_api_returns_the_run_folder(data_dir, tmp_path, capsys):
    """No exception for API users: a signal stop returns like a finished run, and says
    resume='latest'."""
    from longreach.train import trainer

    class SignalledAtStep2(trainer.Trainer):
        def _train_step(self, signals, micro_batch_done):
            if self.step == 1:
                signals._handle(signal.SIGTERM, None)
            return super()._train_step(signals, micro_batch_done)

    cfg = load_config(None, tiny_overrides(data_dir, tmp_path / "run", "train.save_every=0"))
    assert train(cfg, trainer_class=SignalledAtStep2) == (tmp_path / "run").resolve()
    assert steps_of(tmp_path / "run") == [2]
    assert "stopped at step 2/80 (SIGTERM); continue with resume='latest'" in capsys.readouterr().err
    cfg = load_config(None, tiny_overrides(data_dir, tmp_path / "cli", "train.save_every=0"))
    with pytest.raises(trainer.StoppedBySignal) as stop:
        train(cfg, trainer_class=SignalledAtStep2, cli=True)
    assert (stop.value.exit_code, stop.value.step) == (143, 2)
    assert "continue with --resume" in capsys.readouterr().err


def test_signal_between_micro_batches_saves_the_last_whole_step(data_dir, tmp_path, capsys):
    """A signal while a step's micro-batches run drops that step's partial gradients and
    saves the step before: the resumed run matches an uninterrupted one."""
    from longreach.train import trainer

    accum = ("train.grad_accum=4", "train.steps=4", "train.save_every=0", "train.eval_batches=0")

    class SignalledInStep3(trainer.Trainer):
        def _train_step(self, signals, micro_batch_done):
            def done(n):
                micro_batch_done(n)
                if self.step == 2 and n == 2:  # half of step 3's micro-batches
                    signals._handle(signal.SIGTERM, None)

            return super()._train_step(signals, done)

    straight = run(data_dir, tmp_path / "straight", *accum)
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(data_dir, run_dir, *accum))
    train(cfg, trainer_class=SignalledInStep3)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert steps_of(run_dir) == [2]  # the step saved is the last completed one
    assert "stopped at step 2/4 (SIGTERM)" in capsys.readouterr().err
    run(data_dir, run_dir, *accum, resume="latest")
    assert losses(read_metrics(run_dir)) == losses(read_metrics(straight))  # same process: bitwise


def test_second_signal_aborts():
    from longreach.train.signals import StopOnSignal

    for sig, aborts in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)):
        with StopOnSignal(announce=False) as signals:
            signals._handle(sig, None)
            assert signals.requested == sig.name and signals.signum == sig
            with pytest.raises(aborts) as abort:
                signals._handle(sig, None)
        if aborts is SystemExit:
            assert abort.value.code == 143


# ------------------------------------------------------------- failures and checkpoints


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    # an absurd rate blows the weights up after one step: step 2 goes NaN
    with pytest.raises(TrainingDiverged, match=r"step 2.*last good checkpoint is .*step_0000001"):
        run(
            data_dir,
            run_dir,
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.min_lr=0",
            "train.save_every=1",
        )
    assert steps_of(run_dir) == [1]
    validate_checkpoint(run_dir / "checkpoints" / "step_0000001")
    assert not (run_dir / "final").exists()
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def warning_lines(capsys) -> list[str]:
    """The one-line ``warning: ...`` messages printed on stderr since the last call."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


def test_pruning_and_damaged_checkpoints(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(data_dir, run_dir, "train.steps=6", "train.save_every=2", "train.keep_last=2")
    assert steps_of(run_dir) == [4, 6]

    newest = run_dir / "checkpoints" / "step_0000006"
    weights = newest / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100])  # truncated
    with pytest.raises(CheckpointError, match="step_0000006/model.safetensors"):
        resolve_resume(newest, run_dir)
    capsys.readouterr()
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_0000004"
    (line,) = warning_lines(capsys)
    assert re.match(r"warning: skipping damaged checkpoint.*step_0000006", line)

    weights.write_bytes(good)
    (newest / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="step_0000006/trainer_state.pt is unreadable"):
        train(load_config(None, tiny_overrides(data_dir, run_dir, "train.steps=6")), resume=newest)
    (newest / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="step_0000006/trainer_state.pt is missing"):
        validate_checkpoint(newest)

    # "latest" skips the damaged one and continues from step 4, rewriting step 6
    capsys.readouterr()
    run(
        data_dir,
        run_dir,
        "train.steps=6",
        "train.save_every=2",
        "train.keep_last=2",
        resume="latest",
    )
    assert [line for line in warning_lines(capsys) if "skipping damaged" in line]
    validate_checkpoint(newest)
    assert steps_of(run_dir) == [4, 6]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_refuses_a_folder_with_checkpoints(data_dir, reference):
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(data_dir, reference[0])


def test_resume_without_checkpoints(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        run(data_dir, tmp_path / "run", resume="latest")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(data_dir, tmp_path / "run", resume=tmp_path / "nowhere")


def test_final_folder_loads_through_auto_classes(data_dir, reference):
    run_dir, _ = reference
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.vocab_size == len(tok) == 259  # taken from the byte tokenizer
    last = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step_{STEPS:07d}")
    for (name, a), b in zip(model.state_dict().items(), last.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tok.encode("The end of the")])
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape == (1, ids.shape[1], 259)


def test_time_limit_saves_and_writes_final(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run(data_dir, run_dir, "train.max_time_minutes=1e-9")  # the first step is already late
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1]
    assert steps_of(run_dir) == [1]
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_model_and_tokenizer_mismatches_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the tokenizer"):
        run(data_dir, tmp_path / "a", "model.vocab_size=100")
    with pytest.raises(ValueError, match="data.seq_len=32 .*model.max_position_embeddings=16"):
        run(data_dir, tmp_path / "b", "model.max_position_embeddings=16")


def test_tensorboard_missing_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        run(data_dir, tmp_path / "run", "train.tensorboard=true")


# --------------------------------------------------------------------- loop variants


def _three_steps(data_dir, out_dir, *extra) -> list[float]:
    run(data_dir, out_dir, "train.steps=3", "train.eval_batches=0", *extra)
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def test_grad_accumulation_matches_a_bigger_batch(data_dir, tmp_path):
    big = _three_steps(data_dir, tmp_path / "big", "train.batch_size=4")
    accum = _three_steps(data_dir, tmp_path / "accum", "train.batch_size=2", "train.grad_accum=2")
    # the loader hands out consecutive sequences, so 2 x 2 sees the same data as 1 x 4
    assert accum == pytest.approx(big, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    plain = _three_steps(data_dir, tmp_path / "plain")
    ckpt = _three_steps(data_dir, tmp_path / "ckpt", "train.gradient_checkpointing=true")
    assert ckpt == pytest.approx(plain, rel=1e-6)


def test_synthetic_loss_weight_changes_the_training_loss(data_dir, tmp_path):
    synthetic = "data.synthetic={task: copy, fraction: 0.5, min_length: 4, max_length: 8}"
    weighted = synthetic[:-1] + ", loss_weight: 50}"
    plain = read_metrics(run(data_dir, tmp_path / "a", synthetic, "train.steps=3"))
    heavy = read_metrics(run(data_dir, tmp_path / "b", weighted, "train.steps=3"))
    last = [r["loss"] for r in plain if "loss" in r][-1], [r["loss"] for r in heavy if "loss" in r][-1]
    # same data and initial weights; at initialisation every token's loss is about log(vocab),
    # so the runs part once the weighted answers have steered the updates
    assert math.isfinite(last[1]) and last[0] != pytest.approx(last[1], rel=1e-3)


def test_synthetic_workers_train_and_resume_exactly(data_dir, tmp_path):
    # data.workers builds the synthetic rows in worker processes: the same run as without them,
    # and a resume from a checkpoint continues it bit for bit
    mix = ("data.synthetic={task: copy, fraction: 0.5, min_length: 3, max_length: 8}",
           "train.steps=12", "train.save_every=6", "train.eval_every=6")
    serial = run(data_dir, tmp_path / "serial", *mix)
    pooled = run(data_dir, tmp_path / "pooled", *mix, "data.workers=2")
    assert losses(read_metrics(pooled)) == losses(read_metrics(serial))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(pooled / "checkpoints" / "step_0000006",
                    resumed / "checkpoints" / "step_0000006")
    run(data_dir, resumed, *mix, "data.workers=2", resume="latest")
    assert losses([r for r in read_metrics(resumed) if r["step"] > 6]) == \
        [x for x in losses(read_metrics(serial)) if x[0] > 6]
