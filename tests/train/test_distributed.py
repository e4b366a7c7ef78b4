"""Two CPU processes under torchrun (gloo): DDP and FSDP2 train, checkpoint once and resume."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import longreach  # noqa: F401  (registers the model with the Auto classes)
from longreach.train import list_checkpoints, load_config, train, validate_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS = 4

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    words = "river stone light north wind song over under quiet bright field grey".split()
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    return root


def overrides(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
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
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_batches=3",  # odd: one rank pads its share of the held-out batches
        "train.save_every=2",
        "train.precision=fp32",
        "train.device=cpu",
        f"train.out_dir={out_dir}",
        *extra,
    ]


def torchrun(data_dir, out_dir, *extra, resume=False) -> str:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "longreach.train",
        *overrides(data_dir, out_dir, *extra),
    ] + (["--resume"] if resume else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:  # a hang: show how far the processes got
        partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (err.stdout, err.stderr))
        pytest.fail(f"torchrun did not finish in 300 s; its output so far:\n{partial[-4000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def one_process_double_batch(data_dir, tmp_path_factory):
    """The same optimizer steps in one process: batch 4 = two ranks x batch 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            None,
            overrides(data_dir, tmp_path_factory.mktemp("single") / "run", "train.batch_size=4"),
        )
        return train_losses(train(cfg))
    finally:
        torch.set_num_threads(before)


def check_run(run_dir: Path, output: str, expected: list[tuple[int, float]]) -> None:
    got = train_losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # rank 0 alone writes: no duplicates
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]
    for _, path in list_checkpoints(run_dir):
        validate_checkpoint(path)
        assert output.count(f"saved {path}") == 1  # written once, by rank 0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_ddp_two_processes(data_dir, tmp_path, one_process_double_batch):
    run_dir = tmp_path / "run"
    output = torchrun(data_dir, run_dir)
    check_run(run_dir, output, one_process_double_batch)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow
def test_fsdp_two_processes_and_resume(data_dir, tmp_path, one_process_double_batch):
    run_dir = tmp_path / "run"
    # 2 ranks x 1 sequence x 2 micro-steps: the same 4 sequences per step as one process
    accum = ("train.fsdp=true", "train.batch_size=1", "train.grad_accum=2")
    output = torchrun(data_dir, run_dir, *accum)
    check_run(run_dir, output, one_process_double_batch)
    full = train_losses(run_dir)

    # drop everything after step 2 and continue from the step-2 checkpoint, still sharded
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    shutil.rmtree(run_dir / "final")
    output = torchrun(data_dir, run_dir, *accum, resume=True)
    assert "resumed from" in output and "step_0000002" in output
    assert train_losses(run_dir) == full  # bitwise: same processes, same shards
    assert (run_dir / "final" / "model.safetensors").is_file()
