"""Load a saved model folder, naming the broken file and what to do when one is.

Every command that loads a model comes here: a folder path or the name of a checkpoint
shipped with longreach (``gca-tiny``, ``swa-tiny``) resolves to a folder, the folder's
config.json, weight files and tokenizer are checked, and only then does
``AutoModelForCausalLM.from_pretrained`` (local files only) run. Problems raise
``ModelFolderError`` (a ``ValueError``) with one line of text, which the CLI prints as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from longreach.checkpoints import available_checkpoints, checkpoint_path
from longreach.data import load_tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_RESAVE = "save the model again (save_pretrained) or copy the folder again"


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds an unreadable one."""


def resolve_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """The model folder ``name_or_dir`` names: a folder, else a shipped checkpoint's name.

    A folder of that name in the current directory wins over the shipped checkpoint.
    """
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    if str(name_or_dir) in available_checkpoints():
        return checkpoint_path(str(name_or_dir))
    raise ModelFolderError(
        f"model folder {str(name_or_dir)!r} not found (pass a folder written by "
        f"save_pretrained, e.g. runs/tiny-swa/final, or a shipped checkpoint: "
        f"{', '.join(available_checkpoints())})"
    )


def read_model_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of model folder ``path`` (ModelFolderError if absent or bad)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder (pass a model folder written by save_pretrained)")
    file = path / "config.json"
    if not file.is_file():
        raise ModelFolderError(
            f"{path} is not a model folder: {file} is missing (pass a folder written by "
            "save_pretrained, e.g. runs/tiny-swa/final)"
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{file} is not valid JSON ({err}); {_RESAVE}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{file} does not hold a JSON object; {_RESAVE}")
    return config


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of model folder ``path``: one file or the shards its index names."""
    path = Path(path)
    for single, index in ((WEIGHTS, WEIGHTS_INDEX), (TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except Exception as err:
                raise ModelFolderError(f"{path / index} is unreadable ({err}); {_RESAVE}") from None
            missing = [name for name in shards if not (path / name).is_file()]
            if missing:
                raise ModelFolderError(f"{path / missing[0]} is missing (named by {index}); {_RESAVE}")
            return [path / name for name in shards]
    raise ModelFolderError(f"{path / WEIGHTS} is missing: {path} holds no weights; {_RESAVE}")


def check_weights(path: str | os.PathLike) -> list[Path]:
    """Check that every safetensors file of ``path`` opens; return the weight files."""
    files = weight_files(path)
    for file in files:
        if file.suffix != ".safetensors":
            continue  # a pickled .bin cannot be checked without reading all of it
        try:
            # opening parses the header and checks that the data covers it (catches truncation)
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:
            raise ModelFolderError(
                f"{file} is unreadable (truncated or not safetensors: {err}); {_RESAVE}"
            ) from None
    return files


def check_model_folder(name_or_dir: str | os.PathLike) -> Path:
    """Resolve ``name_or_dir`` and check its config.json and weights; return the folder."""
    path = resolve_model_dir(name_or_dir)
    read_model_config(path)
    check_weights(path)
    return path


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(model_dir: str | os.PathLike,
                     tokenizer: str | os.PathLike | None = None) -> str | os.PathLike:
    """Where a model's tokenizer comes from: ``tokenizer`` ("byte" or a folder) if given,
    else the model folder, which is refused with a message saying to pass one if it holds
    no tokenizer (a model saved with ``model.save_pretrained`` only)."""
    if tokenizer is not None:
        return tokenizer
    path = resolve_model_dir(model_dir)
    if not has_tokenizer(path):
        raise ModelFolderError(
            f"{path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}): pass one with "
            "--tokenizer byte (longreach's byte-level tokenizer) or --tokenizer DIR (a folder "
            "written by tokenizer.save_pretrained)"
        )
    return path


def load_model_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """The tokenizer ``tokenizer_source`` names, loaded with ``load_tokenizer``."""
    return load_tokenizer(tokenizer_source(model_dir, tokenizer))


def load_causal_lm(model_dir: str | os.PathLike, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a checked local folder (nothing is
    downloaded); ``kwargs`` go to it (``dtype=...``). Errors name the folder."""
    from transformers import AutoModelForCausalLM

    import longreach.models  # noqa: F401  (registers the longreach model types)

    path = check_model_folder(model_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFolderError(f"cannot load the model in {path}: {message}") from None
    except Exception as err:  # safetensors' SafetensorError and other reader errors
        raise ModelFolderError(
            f"cannot load the model in {path}: {type(err).__name__}: {err}; {_RESAVE}"
        ) from None


def load_model_and_tokenizer(model_dir: str | os.PathLike,
                             tokenizer: str | os.PathLike | None = None, **kwargs):
    """(model, tokenizer) of a local model folder or shipped checkpoint name, checked in
    that order: config.json and weights, the tokenizer, then the weights are loaded."""
    path = check_model_folder(model_dir)
    tok = load_model_tokenizer(path, tokenizer)
    return load_causal_lm(path, **kwargs), tok
