"""Small checkpoints shipped with longreach, made by its own recipes (see README.md here).

``gca-tiny`` and ``swa-tiny`` are the two models of ``longreach demo``: the same width and
depth, trained at 512 tokens on the built-in corpus mixed with the passkey task.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def available_checkpoints() -> list[str]:
    return sorted(p.name for p in _HERE.iterdir() if (p / "config.json").is_file())


def checkpoint_path(name: str) -> Path:
    """The folder of shipped checkpoint ``name`` (load it with AutoModelForCausalLM)."""
    path = _HERE / name
    if not (path / "config.json").is_file():
        raise ValueError(f"no shipped checkpoint {name!r}; available: {available_checkpoints()}")
    return path
