"""Every way a run starts: `python -m longreach.train`, `torchrun -m longreach.train`, and the
Python API on every shipped recipe in longreach/configs/ (one cheap step each, the recipe's
architecture as it is)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from longreach.data import load_tokenizer
from longreach.train import find_recipe, load_config, train
from longreach.train.finetune import finetune, load_finetune_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((REPO / "longreach" / "configs").glob("*.yaml"))}
# a fine-tune recipe names a pretrained model folder (model.path) instead of an architecture
FINETUNE_RECIPES = sorted(name for name, raw in RECIPES.items() if "path" in raw["model"])
TRAIN_RECIPES = sorted(set(RECIPES) - set(FINETUNE_RECIPES))
# recipes whose one step is still seconds on a small CPU (about 100M parameters)
LARGE = {name for name, raw in RECIPES.items() if raw["model"].get("hidden_size", 0) >= 512}

# one step, one held-out batch at the end, no periodic eval or checkpoint
CHEAP = ["train.steps=1", "train.batch_size=1", "train.grad_accum=1", "train.warmup_steps=0",
         "train.eval_every=0", "train.save_every=0", "train.eval_batches=1", "train.log_every=1",
         "train.device=cpu"]


def user_corpus(tmp_path) -> list[str]:
    """Overrides pointing a recipe at a small stand-in for the corpus and BPE it names: this
    package's own source, one document per file, and a BPE of 512 tokens trained on it."""
    import gzip
    import json

    from longreach.data import train_bpe_tokenizer

    corpus = tmp_path / "corpus" / "train.jsonl.gz"
    corpus.parent.mkdir()
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for path in sorted((REPO / "longreach").rglob("*.py")):
            f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
    train_bpe_tokenizer(corpus, 512, tmp_path / "corpus" / "bpe", max_chars=400_000)
    return [f"data.source={corpus}", f"data.tokenizer={tmp_path / 'corpus' / 'bpe'}",
            f"data.cache_dir={tmp_path / 'cache'}"]


def seq_len(raw: dict) -> int:
    """Short, but a few GCA chunks (retrieval needs earlier chunks) and at most the recipe's;
    the recipe's own where it mixes in a synthetic task (its prompts need the length)."""
    if raw["data"].get("synthetic"):
        return raw["data"]["seq_len"]
    gca = raw["model"].get("gca")
    return min(raw["data"]["seq_len"], 4 * gca["chunk_size"] if gca else 128)


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    return sorted(losses)


def check_saved_architecture(run_dir: Path, raw: dict) -> None:
    saved = json.loads((run_dir / "final" / "config.json").read_text())
    for key, value in raw["model"].items():
        if key == "mixers" and isinstance(value, dict):  # one spec: every layer
            value = [value] * raw["model"]["num_hidden_layers"]
        if isinstance(value, dict):
            assert {k: saved[key][k] for k in value} == value, key
        elif key == "mixers":
            assert [{k: s[k] for k in v} for s, v in zip(saved[key], value, strict=True)] == value
        else:
            assert saved[key] == value, key


def run_module(args: list[str], out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args, "--config", str(REPO / "longreach" / "configs" / "gca-tiny.yaml"), *CHEAP,
           "train.steps=2", f"data.seq_len={seq_len(RECIPES['gca-tiny'])}",
           f"train.out_dir={out_dir}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
def test_python_dash_m_longreach_train(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module(["-m", "longreach.train"], run_dir)
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)  # the run folder, last
    assert train_steps(run_dir) == [1, 2]
    check_saved_architecture(run_dir, RECIPES["gca-tiny"])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_torchrun_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "longreach.train"], run_dir)
    # rank 0 alone prints the run folder and writes the metrics
    assert proc.stdout.count(str(run_dir) + "\n") == 1
    assert train_steps(run_dir) == [1, 2]
    check_saved_architecture(run_dir, RECIPES["gca-tiny"])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in TRAIN_RECIPES]
)
def test_every_recipe_trains_one_step(name, tmp_path):
    raw = RECIPES[name]
    overrides = [*CHEAP, f"data.seq_len={seq_len(raw)}", f"train.out_dir={tmp_path / 'run'}"]
    if raw["data"]["source"] != "builtin":  # a corpus the user builds (gca-small): a stand-in
        overrides += user_corpus(tmp_path)
    cfg = load_config(find_recipe(name), overrides)
    assert cfg.train.gradient_checkpointing == raw["train"].get("gradient_checkpointing", False)
    run_dir = train(cfg)
    assert train_steps(run_dir) == [1]
    check_saved_architecture(run_dir, raw)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer("byte")
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FINETUNE_RECIPES)
def test_every_finetune_recipe_trains_one_step(name, tiny_llama, tmp_path):
    raw = RECIPES[name]
    group = raw["model"]["group_size"]
    # the recipe's group size; a window short enough that core tokens exist at 96 tokens
    overrides = [*CHEAP, "data.seq_len=96", f"model.window={96 - 4 * group}",
                 f"train.out_dir={tmp_path / 'run'}"]
    if raw["data"]["source"] != "builtin":  # the corpus, not its BPE: the model's tokenizer
        overrides += [o for o in user_corpus(tmp_path) if not o.startswith("data.tokenizer=")]
    if raw["data"].get("synthetic"):  # its prompts do not fit 96 tokens
        overrides.append("data.synthetic=null")
    cfg = load_finetune_config(name, overrides, model=tiny_llama,
                               attention=raw["model"]["attention"])
    assert cfg.train.gradient_checkpointing == raw["train"].get("gradient_checkpointing", False)
    run_dir = finetune(cfg)
    assert train_steps(run_dir) == [1]
    saved = json.loads((run_dir / "final" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["hidden_size"] == 32
