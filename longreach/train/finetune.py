"""Fine-tune a pretrained Hugging Face causal LM with long-context attention switched on.

    cfg = load_finetune_config("cca-finetune", ["train.steps=200"],
                               model="path/to/llama", attention="cca")
    run_dir = finetune(cfg)          # run_dir / "final" is a save_pretrained folder

The loop, checkpoints, resume, logging and multi-GPU are the trainer's (``Trainer``); this
module only swaps the model it trains: a local model folder loaded with
``AutoModelForCausalLM``, with CCA / StreamingLLM / LM-Infinite attention enabled through
``longreach.integrations.hf`` (or none: ``full``), trained on the folder's own tokenizer.
The attention settings travel in the saved config.json; ``hf.from_pretrained(path)`` (or
``hf.enable_from_config(model)`` after a plain ``from_pretrained``) switches them back on.

The ``model:`` section of the run config holds the settings of ``FinetuneModel`` below.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

import longreach  # noqa: F401  (registers longreach's own model type with the Auto classes)
from longreach.data import vocab_bound
from longreach.integrations import hf
from longreach.models.loading import load_causal_lm
from longreach.train.config import RunConfig, _build_section, find_recipe, load_config
from longreach.train.trainer import Trainer, _quiet_hf_progress, train

ATTENTIONS = (*hf.PLUGINS, "full")  # full: the model's own attention
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


@dataclass
class FinetuneModel:
    """The ``model:`` section of a fine-tuning run."""

    path: str | None = None  # a local folder written by save_pretrained (weights + tokenizer)
    attention: str = "cca"  # cca, streaming, lm-infinite or full
    group_size: int = 16  # cca: tokens pooled into one core token
    window: int = 1024  # cca / streaming / lm-infinite: recent tokens kept exact
    sinks: int = 4  # streaming / lm-infinite: first tokens always visible
    # dtype of the trained weights: float32 keeps full-precision master weights (bf16 comes
    # from autocast, train.precision); bfloat16 halves the memory but loses small updates
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.attention != "full":
            try:  # the plug-in's own spelling (lm_infinite is read as lm-infinite)
                self.attention = hf.get_plugin(self.attention).name
            except ValueError:
                raise ValueError(f"unknown attention {self.attention!r}; choose one of "
                                 f"{', '.join(ATTENTIONS)}") from None
        if self.path is None:
            raise ValueError(
                "no model to fine-tune: pass --model PATH (a local Hugging Face causal LM "
                "folder) or set model.path"
            )
        try:  # the options the plug-in takes (the others are unused)
            self.plugin_settings()
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    def plugin_settings(self) -> dict | None:
        """The attention plug-in's settings (``hf.enable``'s argument); None for full."""
        if self.attention == "full":
            return None
        plugin = hf.get_plugin(self.attention)
        return plugin.settings(**{name: getattr(self, name) for name in plugin.options})


def load_finetune_config(
    path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    model: str | os.PathLike | None = None,
    attention: str | None = None,
) -> RunConfig:
    """``load_config`` for fine-tuning: ``model`` / ``attention`` set model.path / .attention.

    ``path`` is a YAML file or a recipe name (``"cca-finetune"``, see ``find_recipe``).

    The data is tokenized with the model's own tokenizer (data.tokenizer becomes the model
    folder). The recipe's learning rate is constant after warmup (train.min_lr = train.lr),
    so an override of train.lr alone moves train.min_lr with it.
    """
    overrides = list(overrides)
    keys = [item.partition("=")[0].strip() for item in overrides]
    if "train.lr" in keys and "train.min_lr" not in keys:
        last_lr = [item for item, key in zip(overrides, keys) if key == "train.lr"][-1]
        overrides.append("train.min_lr=" + last_lr.partition("=")[2])
    cfg = load_config(None if path is None else find_recipe(path), overrides)
    if model is not None:
        cfg.model["path"] = str(model)
    if attention is not None:
        cfg.model["attention"] = attention
    _settle(cfg)
    return cfg


def _settle(cfg: RunConfig) -> FinetuneModel:
    """Check the model section, make its path absolute and point data.tokenizer at it."""
    settings = model_settings(cfg)
    settings.path = str(Path(settings.path).expanduser().absolute())  # resumable from anywhere
    cfg.model["path"], cfg.model["attention"] = settings.path, settings.attention
    if cfg.data.tokenizer not in ("byte", settings.path):  # "byte" is the data default
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r}: fine-tuning uses the model folder's own "
            "tokenizer; leave data.tokenizer unset"
        )
    cfg.data.tokenizer = settings.path
    return settings


def model_settings(run_config: RunConfig) -> FinetuneModel:
    """The checked ``model:`` section (ValueError naming an unknown key or a bad value)."""
    return _build_section(FinetuneModel, dict(run_config.model), "model")


def finetune(
    run_config: RunConfig, *, resume: str | os.PathLike | None = None, cli: bool = False
) -> Path:
    """Fine-tune as ``run_config`` says (see ``load_finetune_config``); return the run folder.

    Checks the model folder before anything else is built; the model's own tokenizer
    encodes the data. ``resume`` and ``cli`` are as for ``train``.
    """
    read_model_config(_settle(run_config))
    return train(run_config, resume=resume, trainer_class=FineTuner, cli=cli)


class FineTuner(Trainer):
    """The trainer with a pretrained model from a folder in place of a new longreach model."""

    def model_builder(self, tokenizer):
        if self.cfg.train.initial_state != "zero":
            raise ValueError(
                f"train.initial_state={self.cfg.train.initial_state} needs longreach recurrent "
                "layers; a fine-tune of a transformers model supports only 'zero'"
            )
        settings = model_settings(self.cfg)
        config = read_model_config(settings)
        n_ids = vocab_bound(tokenizer)
        if n_ids > config.vocab_size:
            raise ValueError(
                f"the tokenizer in {settings.path} produces ids up to {n_ids - 1}, but the "
                f"model has vocab_size={config.vocab_size}"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.cfg.data.seq_len > limit:
            self.warn(
                f"data.seq_len={self.cfg.data.seq_len} is longer than the model's "
                f"max_position_embeddings={limit}: positions past it were never trained"
            )
        return partial(load_model, settings)

    def check_resume(self, saved: dict | None, path: Path) -> None:
        """Refuse a checkpoint written by a fine-tune of another model folder.

        A folder that moved (the old path is gone) is accepted when it holds a model of the
        same shape; one that still exists is another model, whatever its shape.
        """
        old = ((saved or {}).get("model") or {}).get("path")
        new = self.cfg.model.get("path")
        if not old or not new or _same_folder(old, new):
            return
        old_shape, new_shape = _shape(path), _shape(new)
        if Path(old).exists() or old_shape != new_shape:
            differs = [f"{k}: {old_shape.get(k)!r} -> {new_shape.get(k)!r}"
                       for k in _SHAPE_KEYS if old_shape.get(k) != new_shape.get(k)]
            raise ValueError(
                f"{path} is a checkpoint of a fine-tune of {old}, not of {new}"
                + (f" ({'; '.join(differs)})" if differs else "")
                + f": resume with --model {old}, or start a new run in another train.out_dir"
            )
        self.warn(f"{old} is gone; resuming the fine-tune with the same-shaped model in {new}")


_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def _same_folder(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _shape(folder: str | os.PathLike) -> dict:
    """The architecture fields of a model folder's config.json ({} when unreadable)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config.get(k) for k in _SHAPE_KEYS}


def read_model_config(settings: FinetuneModel):
    """The folder's transformers config, once the folder is known to fit ``settings``."""
    path = Path(settings.path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder "
            "written by save_pretrained"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the model config in {path}: {err}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language "
            "model (AutoModelForCausalLM cannot load it)"
        )
    if settings.attention != "full" and config.model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"attention {settings.attention!r} supports model types "
            f"{', '.join(hf.SUPPORTED_MODEL_TYPES)}; {path} holds {config.model_type!r} "
            "(use --attention full to fine-tune it unchanged)"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES):
        raise ValueError(f"{path} holds no weights (*.safetensors or *.bin)")
    return config


def load_model(settings: FinetuneModel):
    """The folder's causal LM in ``settings.dtype`` with ``settings.attention`` enabled."""
    with _quiet_hf_progress():  # a broken file is a ValueError naming it
        model = load_causal_lm(settings.path, dtype=DTYPES[settings.dtype])
    return enable_attention(model, settings)


def enable_attention(model, settings: FinetuneModel):
    """Switch ``model`` to the attention ``settings`` name (in place); returns the model."""
    plugin = settings.plugin_settings()
    if plugin is not None:
        return hf.enable(model, plugin)
    if hf.plugin_settings(model):  # full: drop settings of an earlier fine-tune
        hf.restore_attention(model)
    return model
