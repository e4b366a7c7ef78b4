"""The token-mixer contract: what every mixer of a longreach model is and does.

A mixer is an ``nn.Module`` built as ``cls(config, layer_idx, options)``:

- ``Options``: a frozen dataclass whose fields are the mixer's options and whose defaults are
  the defaults, the one place either is written. ``validate()`` raises ``ValueError`` on a bad
  value; the registry calls it when a config names the mixer, so errors come before any
  weight is built.
- ``init_state()``: the empty generation state the mixer keeps between calls (a
  ``longreach.cache.base.State``: a KV cache, a recurrent state, ...), or None when it needs
  none.
- ``forward(x, positions, state=None)``: ``x`` ``[batch, time, hidden]``, ``positions`` the
  absolute positions ``[time]`` of its tokens; returns ``[batch, time, hidden]``, added to the
  residual stream by the block. With a state, the call continues where the previous one
  stopped (and updates the state), so cached decoding equals one full forward.

A new mixer is one file in ``longreach/layers/`` that subclasses ``Mixer`` and registers it
(``@register_mixer("name")``); the model file and the contract tests pick it up from there.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class MixerOptions:
    """Base of every mixer's options. Subclasses add fields (with defaults) and ``validate``."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


class Mixer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of token mixers (see the module docstring for the contract)."""

    Options: ClassVar[type[MixerOptions]] = MixerOptions

    def __init__(self, config, layer_idx: int, options: MixerOptions):
        super().__init__()
        self.layer_idx = layer_idx
        self.options = options

    def init_state(self):
        """The empty generation state of this layer, or None when it keeps none."""
        return None

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, positions: torch.Tensor, state=None) -> torch.Tensor:
        """``[B, T, hidden]`` at ``positions`` ``[T]`` -> ``[B, T, hidden]``."""


# ---------------------------------------------------------------- option checks


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
