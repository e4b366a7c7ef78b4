"""Initial recurrent states during training, for length generalization.

A recurrent model trained always from a zero state on length-T sequences only visits the
states reachable in T steps. Starting training sequences from other states (Buitrago Ruiz
and Gu, 2025) fixes much of its failure past T. ``train.initial_state`` picks how:

- ``zero``: no initial state (the plain forward, unchanged);
- ``random_noise``: iid N(0, sigma^2) states;
- ``fitted_noise``: N(mu, std^2) per (layer, head), mu and std running statistics of the
  final states seen so far (zero states until the first batch has been seen);
- ``state_passing``: the previous batch's final recurrent states (gradient stopped);
- ``tbtt``: truncated backpropagation through time: the loader's rows continue each other
  from batch to batch and the recurrent and convolution states are carried (gradient stopped).

``train.initial_state_prob`` applies the choice to each row with that probability (the other
rows start from zeros). Only recurrent layers get initial states; attention layers get no
cache at all, so they neither read nor accumulate keys and values across batches.
"""

from __future__ import annotations

import torch
from torch import nn

from longreach.cache import LongReachCache

KINDS = ("zero", "random_noise", "fitted_noise", "state_passing", "tbtt")


def check_settings(kind: str, prob: float, sigma: float) -> None:
    """Raise ``ValueError`` naming the first bad ``train.initial_state*`` value."""
    if kind not in KINDS:
        raise ValueError(f"train.initial_state must be one of {KINDS}, got {kind!r}")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"train.initial_state_prob must be in [0, 1], got {prob!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"train.initial_state_sigma must be > 0, got {sigma!r}")


class InitialStates:
    """Builds each training batch's cache of initial states and learns from its final ones.

    Per micro-batch: ``cache = states.cache_for(model, batch_size, device)`` (None for
    ``zero``), the forward with ``past_key_values=cache``, then ``states.observe(cache)``.
    ``reduce`` sums a tensor over data-parallel ranks (fitted statistics stay identical on
    every rank); ``state_dict`` / ``load_state_dict`` carry statistics and carried states
    through checkpoints.
    """

    def __init__(self, kind: str = "zero", *, prob: float = 1.0, sigma: float = 1.0, reduce=None):
        check_settings(kind, prob, sigma)
        self.kind, self.prob, self.sigma = kind, float(prob), float(sigma)
        self.reduce = reduce if reduce is not None else (lambda t: t)
        self.recurrent: list[int] | None = None  # indices of the recurrent layers
        self.num_layers = 0
        self.shapes: list[tuple[int, ...]] | None = None  # (heads, key, value) per recurrent layer
        # fitted_noise: per recurrent layer, [3, heads] float64 (count, sum, sum of squares)
        self.stats: list[torch.Tensor] | None = None
        # state_passing / tbtt: per recurrent layer, (state, conv_state) of the last batch
        self.carried: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    @property
    def active(self) -> bool:
        return self.kind != "zero"

    def bind(self, model: nn.Module) -> None:
        """Find the layers of ``model`` (a longreach causal LM) whose state carries a
        recurrent state, and its shape, from an empty cache of the model."""
        states = model.new_cache().states
        self.num_layers = len(states)
        self.recurrent = [i for i, s in enumerate(states) if s is not None and "state" in s.shape]
        self.shapes = [states[i].shape["state"] for i in self.recurrent]
        if self.active and not self.recurrent:
            raise ValueError(
                f"train.initial_state={self.kind} needs at least one recurrent layer "
                "(mamba2, gla); this model has none"
            )

    def reset(self) -> None:
        """Forget carried states (a new set of streams starts)."""
        self.carried = None

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Zero the carried states of the rows where ``rows`` (``[B]`` bool) is True (their
        next batch does not continue the text those states read)."""
        if self.carried is None or not bool(rows.any()):
            return
        keep = (~rows.bool()).to(self.carried[0][0].device)
        self.carried = [
            tuple(None if t is None else t * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
                  for t in pair)
            for pair in self.carried
        ]

    # ------------------------------------------------------------------------ per batch

    def cache_for(self, model: nn.Module, batch_size: int, device) -> LongReachCache | None:
        """A cache whose recurrent entries hold this batch's initial states, others None."""
        if not self.active:
            return None
        if self.recurrent is None:
            self.bind(model)
        inits = [self._initial(j, batch_size, device, model) for j in range(len(self.recurrent))]
        if self.prob < 1.0:  # one draw per row, shared by the layers
            keep = (torch.rand(batch_size, device=device) < self.prob).float()
            inits = [
                tuple(None if t is None else t * keep.view(-1, *[1] * (t.dim() - 1)) for t in pair)
                for pair in inits
            ]
        # attention layers get no state: they neither read nor keep keys across batches
        empty = model.new_cache().states
        states: list = [None] * self.num_layers
        for i, (state, conv) in zip(self.recurrent, inits):
            states[i] = empty[i]
            states[i].state, states[i].conv_state = state, conv
        return LongReachCache(states)

    def observe(self, cache: LongReachCache | None) -> None:
        """Record the final states the forward left in ``cache``."""
        if cache is None:
            return
        finals = [cache[i] for i in self.recurrent]
        if self.kind in ("state_passing", "tbtt"):
            # stored detached by the layers: the next batch's graph cannot reach this one
            self.carried = [
                (s.state.detach(), None if self.kind == "state_passing" or s.conv_state is None
                 else s.conv_state.detach())
                for s in finals
            ]
        elif self.kind == "fitted_noise":
            parts = []
            for s in finals:
                x = s.state.detach().double()
                n = x.shape[0] * x.shape[2] * x.shape[3]
                parts.append(torch.stack(
                    [torch.full_like(x[0, :, 0, 0], n), x.sum((0, 2, 3)), x.square().sum((0, 2, 3))]
                ))
            sizes = [p.shape[1] for p in parts]
            total = self.reduce(torch.cat(parts, dim=1))  # one all-reduce for every layer
            new = list(total.split(sizes, dim=1))
            self.stats = new if self.stats is None else [
                old.to(t.device) + t for old, t in zip(self.stats, new)
            ]

    def fitted_mean_std(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(mean, std) per head of each recurrent layer's final states, or None (none seen)."""
        if self.stats is None:
            return None
        out = []
        for count, total, squares in self.stats:
            mean = total / count
            out.append((mean, (squares / count - mean.square()).clamp_min(0).sqrt()))
        return out

    def _initial(self, j: int, batch_size: int, device, model: nn.Module):
        """(state, conv_state) for recurrent layer number ``j``; None means zeros."""
        if self.kind in ("state_passing", "tbtt"):
            if self.carried is None:
                return None, None
            state, conv = self.carried[j]
            if state.shape[0] != batch_size:
                raise ValueError(
                    f"train.initial_state={self.kind} needs batches of a fixed size: the carried "
                    f"states have {state.shape[0]} rows, this batch has {batch_size}"
                )
            return state, conv
        if self.kind == "fitted_noise":
            fitted = self.fitted_mean_std()
            if fitted is None:
                return None, None
            mean, std = (t.to(device=device, dtype=torch.float32).view(1, -1, 1, 1) for t in fitted[j])
            heads, k, v = self.shapes[j]
            return mean + std * torch.randn(batch_size, heads, k, v, device=device), None
        heads, k, v = self.shapes[j]  # random_noise
        return self.sigma * torch.randn(batch_size, heads, k, v, device=device), None

    # ---------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Statistics and carried states, on the CPU (torch.load(weights_only=True) reads it)."""
        return {
            "kind": self.kind,
            "stats": None if self.stats is None else [t.cpu() for t in self.stats],
            "carried": None if self.carried is None else [
                [None if t is None else t.cpu() for t in pair] for pair in self.carried
            ],
        }

    def load_state_dict(self, state: dict, *, carried: bool = True) -> None:
        """Restore ``state_dict()``; ``carried=False`` keeps only the fitted statistics."""
        if state.get("kind") != self.kind:
            return  # another intervention saved it: nothing of it applies
        stats = state.get("stats")
        if stats is not None and self.recurrent is not None and len(stats) != len(self.recurrent):
            raise ValueError(
                f"saved fitted_noise statistics cover {len(stats)} recurrent layers, "
                f"this model has {len(self.recurrent)}"
            )
        self.stats = None if stats is None else [t.clone() for t in stats]
        saved = state.get("carried") if carried else None
        self.carried = None if saved is None else [tuple(pair) for pair in saved]

    def to(self, device) -> InitialStates:
        """Move carried states and statistics to ``device`` (after loading a checkpoint)."""
        if self.stats is not None:
            self.stats = [t.to(device) for t in self.stats]
        if self.carried is not None:
            self.carried = [tuple(None if t is None else t.to(device) for t in pair)
                            for pair in self.carried]
        return self
