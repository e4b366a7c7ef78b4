"""save_pretrained -> from_pretrained keeps every shipped recipe's model: its config (mixers
and their options, the GCA settings, CCA plug-in settings of a fine-tune), its outputs and
its tokenizer. Recipes of ~100M parameters are built at a tiny width (their layer count,
mixers and every other setting as written), so no 128M model is made here."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import longreach
from longreach.data import load_tokenizer, train_bpe_tokenizer
from longreach.integrations import hf
from longreach.models import causal_lm_class
from longreach.models.loading import load_model_and_tokenizer
from longreach.train import find_recipe, load_config
from longreach.train.finetune import load_finetune_config, model_settings
from longreach.train.finetune import load_model as load_finetune_model
from longreach.train.trainer import _model_config

CONFIGS = Path(longreach.__file__).parent / "configs"
RECIPES = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CONFIGS.glob("*.yaml"))}
FINETUNE = sorted(name for name, raw in RECIPES.items() if "path" in raw["model"])
TRAIN = sorted(set(RECIPES) - set(FINETUNE))
# the width of a large recipe, shrunk; everything else (layers, mixers, gca) stays the recipe's
TINY_WIDTH = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
# where a config was loaded from, not a setting
NOT_SETTINGS = ("_name_or_path",)
TEXT = "In the beginning God created the heaven and the earth. 0123456789 <eos>"


def test_every_recipe_is_covered():
    assert len(TRAIN) >= 10 and FINETUNE == ["cca-finetune", "cca-finetune-small"]
    assert {"gca-tiny", "gca-128m", "cca-tiny", "mamba2-130m", "llama-small"} <= set(TRAIN)


def shrunk(raw: dict) -> dict[str, object]:
    """Width overrides for a large recipe (none for a tiny one: it is built as written)."""
    return TINY_WIDTH if raw["model"]["hidden_size"] > 256 else {}


def tokens(length: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))


def settings_of(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in NOT_SETTINGS}


def recipe_fields_kept(raw_model: dict, saved: dict, overridden: dict) -> None:
    """Every setting the recipe's model section writes is in the reloaded config."""
    for key, value in raw_model.items():
        if key in overridden:
            assert saved[key] == overridden[key], key
        elif key == "mixers":
            specs = [value] * saved["num_hidden_layers"] if isinstance(value, dict) else value
            assert len(saved["mixers"]) == len(specs)
            for layer, (kept, spec) in enumerate(zip(saved["mixers"], specs, strict=True)):
                assert {k: kept[k] for k in spec} == spec, (key, layer)
        elif isinstance(value, dict):  # gca: the recipe's keys, the rest the defaults
            assert {k: saved[key][k] for k in value} == value, key
        else:
            assert saved[key] == value, key


@pytest.mark.parametrize("name", TRAIN)
def test_recipe_model_round_trips(name, tmp_path):
    raw = RECIPES[name]
    overridden = shrunk(raw)
    cfg = load_config(find_recipe(name), [f"model.{k}={v}" for k, v in overridden.items()])
    if cfg.data.tokenizer == "byte":
        tok = load_tokenizer("byte")
    else:  # a recipe for a corpus the user builds (gca-small): a small BPE stands in for its own
        tok = train_bpe_tokenizer("builtin", 512, tmp_path / "bpe", max_chars=200_000)
    config = _model_config(cfg, tok)  # what the trainer builds and saves
    torch.manual_seed(0)
    model = causal_lm_class(config)(config).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    saved = json.loads((folder / "config.json").read_text())
    recipe_fields_kept(raw["model"], saved, overridden)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(model)
    before = settings_of(model.config)
    assert settings_of(loaded.config) == before
    ours, ours_tok = load_model_and_tokenizer(folder)  # the CLI's and eval's loader
    assert type(ours) is type(model) and settings_of(ours.config) == before

    gca = raw["model"].get("gca")
    ids = tokens(3 * gca["chunk_size"] + 5 if gca else 40)  # GCA: earlier chunks to retrieve
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(ours.eval()(ids).logits, want, rtol=0, atol=0)

    for reloaded in (AutoTokenizer.from_pretrained(folder), ours_tok):
        assert reloaded(TEXT).input_ids == tok(TEXT).input_ids
        assert reloaded.decode(tok(TEXT).input_ids) == tok.decode(tok(TEXT).input_ids)
        assert [reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id] == [
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
        assert len(reloaded) == len(tok)
    # generation stops on the tokenizer's ids
    assert [loaded.config.bos_token_id, loaded.config.eos_token_id] == [tok.bos_token_id,
                                                                       tok.eos_token_id]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tok = load_tokenizer("byte")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_recipe_attention_round_trips(name, llama_dir, tmp_path):
    """A fine-tune's model (the recipe's plug-in switched on, as `longreach finetune` trains
    and saves it) loads again with the plug-in on, through hf.from_pretrained and through
    the loaders of eval, lm-eval and generate."""
    from longreach.cli import load_model_and_tokenizer as cli_loader
    from longreach.eval.runner import load_model as eval_loader

    raw = RECIPES[name]["model"]
    cfg = load_finetune_config(name, [], model=llama_dir, attention=raw["attention"])
    settings = model_settings(cfg)
    model = load_finetune_model(settings).eval()
    expected = settings.plugin_settings()
    assert expected["kind"] == raw["attention"]
    assert {k: expected[k] for k in expected if k != "kind"} == {
        k: raw[k] for k in hf.get_plugin(raw["attention"]).options}
    folder = tmp_path / name
    model.save_pretrained(folder)
    load_tokenizer(llama_dir).save_pretrained(folder)

    # longer than the recipe's window, so the plug-in changes the outputs
    ids = tokens(raw["window"] + 4 * raw.get("group_size", 16) + 3)
    with torch.no_grad():
        want = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()(ids).logits
        assert not torch.allclose(want, plain, atol=1e-4)
        for loaded in (hf.from_pretrained(folder), eval_loader(folder, "cpu")[0],
                       cli_loader(str(folder), device="cpu")[0]):
            assert loaded.config._attn_implementation == hf.ATTENTION_NAME
            assert {k: v for k, v in hf.plugin_settings(loaded).items() if k != "previous"} == expected
            torch.testing.assert_close(loaded.eval()(ids).logits, want)
    assert AutoTokenizer.from_pretrained(folder)(TEXT).input_ids == load_tokenizer(llama_dir)(TEXT).input_ids
