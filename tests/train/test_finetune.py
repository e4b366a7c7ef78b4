import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
)

import longreach  # noqa: F401  (what a user imports before loading a fine-tuned folder)
from longreach.cli import main
from longreach.data import load_tokenizer
from longreach.integrations import hf
from longreach.train import find_recipe, load_config
from longreach.train.finetune import finetune, load_finetune_config

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
SEQ = 40


def write_model(folder, family="llama", vocab_size=260, seed=0):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    tok = load_tokenizer("byte")  # 259 ids: the bytes, then <bos> <eos> <pad>
    fits = vocab_size >= len(tok)
    specials = {f"{k}_token_id": getattr(tok, f"{k}_token_id") if fits else None
                for k in ("bos", "eos", "pad")}
    config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, **specials)
    model_cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Verse {i}: the quick brown fox jumps over the lazy dog.\n\n"
                              for i in range(60)))
    return root


def overrides(work, out, steps=4):
    return [f"data.source={work / 'corpus.txt'}", f"data.cache_dir={work / 'cache'}",
            f"data.seq_len={SEQ}", "data.val_fraction=0.1", f"train.steps={steps}",
            "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=1", "train.lr=1e-3",
            "train.save_every=2", "train.eval_every=0", "train.eval_batches=1",
            f"train.out_dir={out}", "model.group_size=4", "model.window=8"]


def records(run):
    """The training lines of metrics.jsonl (the end of a run adds an eval_loss line)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_run(work):
    base = write_model(work / "llama")
    run = finetune(load_finetune_config("cca-finetune", overrides(work, work / "run"),
                                        model=base, attention="cca"))
    return base, run


def test_finetune_trains_and_saves_a_cca_folder(llama_run):
    base, run = llama_run
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    final = run / "final"
    # a plain load keeps the settings in the config; hf.from_pretrained switches them on
    plain = AutoModelForCausalLM.from_pretrained(final)
    settings = plain.config.longreach_attention
    assert (settings["kind"], settings["group_size"], settings["window"]) == ("cca", 4, 8)
    loaded = hf.from_pretrained(final).eval()
    assert loaded.config._attn_implementation == hf.ATTENTION_NAME
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf.enable_cca(plain.eval(), group_size=4, window=8)(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected)
    before, after = weights(base), weights(final)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.decode(tok.encode("fox", add_special_tokens=False)) == "fox"


def test_resume_continues_from_the_checkpoint_step(work, llama_run, capsys):
    base, straight = llama_run
    out = work / "resumed"
    cfg = load_finetune_config("cca-finetune", overrides(work, out, steps=2), model=base)
    finetune(cfg)
    assert [r["step"] for r in records(out)] == [1, 2]
    cfg = load_finetune_config("cca-finetune", overrides(work, out, steps=4), model=base)
    capsys.readouterr()
    finetune(cfg, resume="latest")
    assert "warning: resuming with changed settings: train.steps: 2 -> 4" in capsys.readouterr().err
    got = records(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # the resumed run continues exactly where the uninterrupted one was
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in records(straight)])
    with pytest.raises(FileExistsError):  # starting over in the same folder is refused
        finetune(cfg)


def test_full_attention_drops_earlier_settings(work, llama_run):
    _, run = llama_run
    out = work / "full"
    cfg = load_finetune_config("cca-finetune", overrides(work, out, steps=1),
                               model=run / "final", attention="full")
    finetune(cfg)
    config = json.loads((out / "final" / "config.json").read_text())
    assert hf.CONFIG_KEY not in config


def test_lm_infinite_from_a_plain_run_config(work, llama_run):
    base, _ = llama_run
    cfg = load_config(find_recipe("cca-finetune"), overrides(work, work / "lmi", steps=1))
    cfg.model.update(path=str(base), attention="lm_infinite", sinks=2)
    run = finetune(cfg)  # finetune itself points data.tokenizer at the model folder
    assert cfg.data.tokenizer == str(base)
    assert math.isfinite(records(run)[0]["loss"])
    settings = hf.from_pretrained(run / "final").config.longreach_attention
    assert (settings["kind"], settings["sinks"], settings["window"]) == ("lm-infinite", 2, 8)  # saved in the canonical spelling


def test_cli_finetune_qwen2_streaming(work, tmp_path, capsys):
    base = write_model(tmp_path / "qwen2", "qwen2")
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(base), "--attention", "streaming", "--config",
            "cca-finetune", *overrides(work, out, steps=2), "model.sinks=2"]
    assert main(argv) == 0
    assert str(out / "final") in capsys.readouterr().out
    assert all(math.isfinite(r["loss"]) for r in records(out))
    loaded = hf.from_pretrained(out / "final")
    settings = loaded.config.longreach_attention
    assert (settings["kind"], settings["sinks"], settings["window"]) == ("streaming", 2, 8)
    assert main(argv + ["train.steps=3", "--resume"]) == 0
    changed = [line for line in capsys.readouterr().err.splitlines() if "changed settings" in line]
    assert len(changed) == 1 and "train.steps: 2 -> 3" in changed[0]  # the last override wins
    assert changed[0].startswith("warning: ")
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_bad_inputs_are_named(work, tmp_path, capsys):
    base = write_model(tmp_path / "llama")

    def error(model, *extra, attention="cca"):
        argv = ["finetune", "--model", str(model), "--attention", attention,
                *overrides(work, tmp_path / "run"), *extra]
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "model folder not found" in error(tmp_path / "missing")
    assert "unknown attention 'flash'" in error(base, attention="flash")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error(tmp_path / "empty")
    ViTConfig().save_pretrained(tmp_path / "vit")
    assert "not a causal language model" in error(tmp_path / "vit", attention="full")
    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    assert "supports model types" in error(tmp_path / "gpt2")
    assert "holds no weights" in error(tmp_path / "gpt2", attention="full")
    assert "own tokenizer" in error(base, f"data.tokenizer={tmp_path}")
    assert "model.window must be an integer >= 1" in error(base, "model.window=0")
    assert "unknown model key" in error(base, "model.hidden_size=8")
    assert "supports only 'zero'" in error(base, "train.initial_state=state_passing",
                                           "train.gradient_checkpointing=false")
    small = write_model(tmp_path / "small", vocab_size=100)
    assert "vocab_size=100" in error(small)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_learning_rate_override_keeps_the_rate_constant(work):
    cfg = load_finetune_config("cca-finetune", ["train.lr=1e-4"], model=work)
    assert cfg.train.lr == cfg.train.min_lr == 1e-4
    cfg = load_finetune_config("cca-finetune", [], model=work, attention="lm_infinite")
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps) == (2e-5, 2e-5, 20)
    assert cfg.model["attention"] == "lm-infinite" and cfg.data.tokenizer == str(work)


def test_resume_from_another_models_checkpoint_is_refused(work, llama_run, tmp_path, capsys):
    base, _ = llama_run
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(base), "--config", "cca-finetune",
            *overrides(work, out, steps=2)]
    assert main(argv) == 0
    capsys.readouterr()
    other = write_model(tmp_path / "other", seed=1)  # same shape, other weights
    wider = write_model(tmp_path / "wider", vocab_size=300)

    def resume_with(model):
        argv = ["finetune", "--model", str(model), "--config", "cca-finetune",
                *overrides(work, out, steps=3), "--resume"]
        return main(argv), capsys.readouterr().err

    code, err = resume_with(other)
    assert code == 2 and f"a fine-tune of {base}, not of {other}" in err
    assert f"resume with --model {base}" in err
    code, err = resume_with(wider)
    assert code == 2 and "vocab_size: 260 -> 300" in err
    assert [r["step"] for r in records(out)] == [1, 2]  # nothing was trained or overwritten
    # a model folder that moved is accepted when it holds the same shape
    moved = tmp_path / "moved"
    base.rename(moved)
    try:
        code, err = resume_with(moved)
    finally:
        moved.rename(base)
    assert code == 0 and f"{base} is gone" in err
    assert [r["step"] for r in records(out)] == [1, 2, 3]
