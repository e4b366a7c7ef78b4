"""The generation-state contract: what every per-layer (or model-level) state offers.

A state is whatever a mixer keeps between calls so that the next call continues exactly where
the last one stopped (``longreach.layers.base.Mixer.init_state``). Whatever its kind, it can
say how much device memory it holds, how fast that grows with the context, and what fixed
shapes it carries, and it can follow a beam search:

- ``nbytes()``: bytes of tensors held on the compute device now;
- ``bytes_per_token(dtype)``: bytes added on the compute device per further token, once the
  state holds many (0 when bounded: sliding windows, recurrent states, memory kept off the
  device); the eval memory check and the benchmarks read this instead of naming types;
- ``shape``: per-row shapes of the fixed-size tensors the state carries from call to call,
  by name (a recurrent state and its convolution window); empty for caches of tokens, whose
  size depends on what they have seen. Training interventions read the shapes from here;
- ``reorder(beam_idx)``: keep the batch rows ``beam_idx`` (beam search).
"""

from __future__ import annotations

import abc

import torch


class State(metaclass=abc.ABCMeta):
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensors this state holds on the compute device."""

    @abc.abstractmethod
    def reorder(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows ``beam_idx``, in that order."""

    def bytes_per_token(self, dtype: torch.dtype) -> float:
        """Device bytes added per further token with tensors of ``dtype`` (0: bounded)."""
        return 0.0

    @property
    def shape(self) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the fixed-size tensors carried between calls, by name."""
        return {}


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Total bytes of the tensors given (None entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def reorder_rows(t: torch.Tensor | None, beam_idx: torch.LongTensor) -> torch.Tensor | None:
    """``t`` with its batch rows ``beam_idx`` (None stays None)."""
    return None if t is None else t.index_select(0, beam_idx.to(t.device))
