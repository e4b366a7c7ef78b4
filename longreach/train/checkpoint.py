"""Checkpoint folders: written atomically, validated before use, pruned to the last K.

A checkpoint is ``<run>/checkpoints/step_XXXXXXX/`` holding the model (``save_pretrained``,
safetensors), the tokenizer and ``trainer_state.pt`` (optimizer, scheduler, RNG and data
states, step, config). It is written into a temporary sibling folder and renamed into place,
so a folder with a final name is complete unless the disk itself was damaged afterwards.
This module only touches files; gathering sharded state is ``distributed``'s job.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from longreach.models.loading import ModelFolderError, check_weights, weight_files
from longreach.runtime import atomic_dir

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ModelFolderError):
    """A checkpoint folder is missing files or holds unreadable ones."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint folder in ``run_dir``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint in ``run_dir``; damaged ones are skipped with a one-line
    warning each on stderr, naming the bad file and the checkpoint used instead."""
    damaged = []
    found = None
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            validate_checkpoint(path)
        except CheckpointError as e:
            damaged.append(e)
            continue
        found = path
        break
    instead = f"using {found} instead" if found else "no older valid checkpoint"
    for e in damaged:
        print(f"warning: skipping damaged checkpoint: {e}; {instead}", file=sys.stderr)
    return found


def resolve_resume(resume: str | Path, run_dir: str | Path) -> Path:
    """Turn ``resume`` ("latest", a run folder or a checkpoint folder) into a checked folder."""
    if str(resume) == "latest":
        path = find_latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume='latest': no valid checkpoint in {Path(run_dir) / CHECKPOINTS}"
            )
        return path
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / CHECKPOINTS).is_dir():  # a run folder: take its newest checkpoint
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no valid checkpoint in {path / CHECKPOINTS}")
        return latest
    try:
        validate_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (resume from another checkpoint, or pass --resume alone / resume='latest' "
            "to take the newest valid one)"
        ) from None
    return path


def validate_checkpoint(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming the first missing or unreadable file in ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    for name in ("config.json", TRAINER_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
    try:
        check_weights(path)
    except ModelFolderError as e:
        raise CheckpointError(str(e)) from None
    read_trainer_state(path, mmap=True)  # mmap: checks the archive without reading all of it


def read_trainer_state(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} does not hold a trainer state")
    return state


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint (single or sharded safetensors) as one CPU state dict."""
    state: dict[str, torch.Tensor] = {}
    try:
        files = weight_files(path)
    except ModelFolderError as e:
        raise CheckpointError(str(e)) from None
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except Exception as e:
            raise CheckpointError(f"{file} is unreadable: {e}") from None
    return state


def write_checkpoint(
    path: str | Path,
    *,
    save_model: Callable[[Path], None],
    tokenizer,
    trainer_state: dict[str, Any] | None,
) -> Path:
    """Write a checkpoint folder atomically and return it.

    ``save_model(folder)`` writes the weights and config (``save_pretrained``); the tokenizer
    and ``trainer_state`` (if given) go beside them. An existing folder of the same name is
    replaced only once the new one is complete.
    """
    path = Path(path)
    # temporary names start with _TMP_PREFIX: listing skips them, remove_stale_temporaries clears them
    with atomic_dir(path, prefix=f"{_TMP_PREFIX}{path.name}-", fsync=True) as tmp:
        save_model(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return path


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; return the deleted folders."""
    removed = [p for _, p in list_checkpoints(run_dir)[:-keep_last]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Remove half-written folders left behind by a run that was killed while saving."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
