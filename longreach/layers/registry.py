"""The token-mixer registry.

A model's ``mixers`` list names one mixer per layer. Each entry is a registered name or a
dict ``{"type": name, **options}``; options left out take the mixer's registered defaults.
New mixers register here (``@register_mixer("name", window=512, ...)``) and never touch the
model file.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

_MIXERS: dict[str, MixerEntry] = {}


@dataclass(frozen=True)
class MixerEntry:
    name: str
    cls: type[nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


def register_mixer(name: str, **defaults: Any):
    """Class decorator: make ``cls`` available as mixer ``name`` with option ``defaults``.

    The class is built as ``cls(config, layer_idx, **options)``. The same class may be
    registered under several names with different defaults.
    """

    def wrap(cls):
        if name in _MIXERS and _MIXERS[name].cls is not cls:
            raise ValueError(f"mixer {name!r} is already registered to {_MIXERS[name].cls.__name__}")
        _MIXERS[name] = MixerEntry(name, cls, dict(defaults))
        return cls

    return wrap


def available_mixers() -> list[str]:
    return sorted(_MIXERS)


def resolve_mixer(spec: str | dict) -> tuple[MixerEntry, dict[str, Any]]:
    """Turn a ``mixers`` entry into (registry entry, complete options). Raises ValueError."""
    if isinstance(spec, str):
        name, given = spec, {}
    elif isinstance(spec, dict):
        if "type" not in spec:
            raise ValueError(f"mixer entry {spec!r} has no 'type' key")
        name = spec["type"]
        given = {k: v for k, v in spec.items() if k != "type"}
    else:
        raise ValueError(f"a mixer entry must be a name or a dict, got {type(spec).__name__}: {spec!r}")
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(available_mixers())}")
    entry = _MIXERS[name]
    accepted = _accepted_options(entry.cls)
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ValueError(
            f"mixer {name!r} got unknown option(s) {unknown}; valid options: {sorted(accepted)}"
        )
    return entry, {**entry.defaults, **given}


def build_mixer(spec: str | dict, config, layer_idx: int) -> nn.Module:
    entry, options = resolve_mixer(spec)
    return entry.cls(config, layer_idx, **options)


def _accepted_options(cls) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
