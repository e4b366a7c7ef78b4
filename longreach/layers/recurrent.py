"""Recurrent token mixers: ``"mamba2"`` (Mamba-2 / SSD) and ``"gla"`` (gated linear attention).

Both run on `longreach.ops.linear_recurrence` and keep their whole memory of the past in a
fixed-size state (`longreach.cache.recurrent.RecurrentState`): the recurrent state plus the
short convolution's last inputs. With a cache, a call continues exactly where the previous
one stopped, so decoding token by token or in chunks equals one full forward. Positions are
not used: order comes from the recurrence itself.

Parameters whose published initialization matters (Mamba-2's ``A_log``, ``dt_bias``, ``D``
and the convolution) are plain ``nn.Parameter``s, which the HF weight initialization (it
re-draws every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Embedding``) leaves alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longreach.cache.recurrent import RecurrentState
from longreach.layers.base import Mixer, MixerOptions, check_bool, check_int, check_positive
from longreach.layers.registry import register_mixer
from longreach.ops import linear_recurrence, linear_recurrence_step
from longreach.ops.linear_recurrence import compute_dtype


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, with its last ``size - 1`` inputs carried in
    the cache. ``size == 0`` disables it (identity, no activation).

    Weight and bias are plain parameters initialized like ``nn.Conv1d`` (uniform in
    +-1/sqrt(size)): as an ``nn.Conv1d`` they would be re-drawn by the HF initialization.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        if size > 0:
            bound = 1.0 / math.sqrt(size)
            self.weight = nn.Parameter(torch.empty(channels, size).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, cache: RecurrentState | None) -> torch.Tensor:
        """x: [B, T, channels] -> silu(conv(x)) of the same shape."""
        if self.size == 0:
            return x
        b, t = x.shape[:2]
        weight, bias = self.weight.unsqueeze(1).to(x.dtype), self.bias.to(x.dtype)
        prefix = cache.conv_state if cache is not None else None
        if prefix is None and cache is None:  # training: zero history as the conv's padding
            y = F.conv1d(x.transpose(1, 2), weight, bias, padding=self.size - 1,
                         groups=self.channels)[..., :t]
            return F.silu(y.transpose(1, 2))
        if prefix is None:
            prefix = x.new_zeros(b, self.size - 1, self.channels)
        xp = torch.cat([prefix.to(x.dtype), x], dim=1)  # [B, size - 1 + T, C]
        cache.conv_state = xp[:, xp.shape[1] - (self.size - 1):].detach().clone()
        y = F.conv1d(xp.transpose(1, 2), weight, bias, groups=self.channels)
        return F.silu(y.transpose(1, 2))


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm over the last dim: norm(y * silu(z)) (the published default),
    or norm(y) * silu(z) with ``norm_before_gate``."""

    def __init__(self, dim: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.norm_before_gate = eps, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = F.silu(z.to(y.dtype))
        if not self.norm_before_gate:
            y = y * gate
        y = F.rms_norm(y, (y.shape[-1],), self.weight.to(y.dtype), self.eps)  # fused on CUDA
        return y * gate if self.norm_before_gate else y


def _run_recurrence(q, k, v, g, *, scale, chunk_size, cache: RecurrentState | None):
    """The op over a whole call, starting from (and updating) the cached state if any."""
    if cache is None:
        o, _ = linear_recurrence(q, k, v, g, scale=scale, chunk_size=chunk_size)
        return o
    if q.shape[1] == 1:
        o, state = linear_recurrence_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache.state, scale=scale)
        o = o.unsqueeze(1)
    else:
        o, state = linear_recurrence(
            q, k, v, g, scale=scale, initial_state=cache.state, output_final_state=True,
            chunk_size=chunk_size,
        )
    cache.state = state.detach()
    cache.num_tokens += q.shape[1]
    return o


def _heads_of_groups(u: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, G, N] -> [B, T, heads, N], group i serving heads i * heads/G onwards (a view
    for one group)."""
    b, t, groups, n = u.shape
    if groups == 1:
        return u.expand(b, t, heads, n)
    return u.repeat_interleave(heads // groups, dim=2)


@dataclass(frozen=True)
class Mamba2Options(MixerOptions):
    state_size: int = 64
    expand: int = 2
    head_dim: int = 64
    num_groups: int = 1
    conv_size: int = 4
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    a_min: float = 1.0
    a_max: float = 16.0
    norm_before_gate: bool = False
    norm_eps: float = 1e-5

    def validate(self) -> None:
        for name, minimum in (("state_size", 1), ("expand", 1), ("head_dim", 1), ("num_groups", 1),
                              ("conv_size", 0), ("chunk_size", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("dt_min", "dt_max", "a_min", "a_max", "norm_eps"):
            check_positive(name, getattr(self, name))
        check_bool("norm_before_gate", self.norm_before_gate)
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        if self.a_min > self.a_max:
            raise ValueError(f"a_min ({self.a_min}) must be <= a_max ({self.a_max})")


@register_mixer("mamba2")
class Mamba2Mixer(Mixer):
    """Mamba-2 (Dao and Gu, 2024): in-projection to (z, x, B, C, dt), short causal conv + SiLU
    over (x, B, C), SSD with one decay per head, D skip, gated RMSNorm, out-projection.

    With ``d_inner = expand * hidden_size`` and ``heads = d_inner / head_dim``, per head h:
    dt = softplus(dt_raw + dt_bias), log-decay g = -exp(A_log) * dt, and the recurrence runs
    with q = C, k = B, v = x * dt (scale 1); y = out + D * x. B and C are shared by the heads
    of each of ``num_groups`` groups.

    Init (as published): A = -uniform(a_min, a_max) per head (stored as A_log), dt_bias the
    inverse softplus of a log-uniform draw in [dt_min, dt_max] (floored at 1e-4), D = 1.
    """

    Options = Mamba2Options

    def __init__(self, config, layer_idx: int, options: Mamba2Options):
        super().__init__(config, layer_idx, options)
        o = options
        state_size, expand, head_dim, num_groups = o.state_size, o.expand, o.head_dim, o.num_groups
        conv_size, chunk_size = o.conv_size, o.chunk_size
        dt_min, dt_max, a_min, a_max = o.dt_min, o.dt_max, o.a_min, o.a_max
        hidden = config.hidden_size
        d_inner = expand * hidden
        if d_inner % head_dim:
            raise ValueError(
                f"layer {layer_idx}: expand * hidden_size = {expand} * {hidden} = {d_inner} must be "
                f"a multiple of head_dim ({head_dim})"
            )
        num_heads = d_inner // head_dim
        if num_heads % num_groups:
            raise ValueError(
                f"layer {layer_idx}: the number of heads ({num_heads} = {d_inner} / head_dim "
                f"{head_dim}) must be a multiple of num_groups ({num_groups})"
            )
        self.d_inner, self.num_heads, self.head_dim = d_inner, num_heads, head_dim
        self.state_size, self.num_groups, self.chunk_size = state_size, num_groups, chunk_size
        conv_channels = d_inner + 2 * num_groups * state_size
        self.in_proj = nn.Linear(hidden, d_inner + conv_channels + num_heads, bias=False)
        self.conv = ShortConv(conv_channels, conv_size)

        # log-uniform dt in [dt_min, dt_max]; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(a_min, a_max)))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GatedRMSNorm(d_inner, o.norm_eps, o.norm_before_gate)
        self.out_proj = nn.Linear(d_inner, hidden, bias=False)

    def init_state(self) -> RecurrentState:
        return RecurrentState(self.num_heads, self.state_size, self.head_dim,
                              conv_size=self.conv.size, conv_channels=self.conv.channels)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                state: RecurrentState | None = None) -> torch.Tensor:
        cache = state
        b, t, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.num_groups, self.state_size
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xbc = self.conv(xbc, cache)
        ct = compute_dtype(x.dtype)  # float32 (float64 for float64 inputs), as the op computes
        # q, k, v go to the op in the projections' dtype (bf16 under autocast: the kernel reads
        # half the bytes and accumulates in float32); decays and the residual math in ct
        xs, B, C = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(b, t, H, P)
        # each group's B and C serve H / G consecutive heads
        B, C = (_heads_of_groups(u.reshape(b, t, G, N), H) for u in (B, C))
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))  # [B, T, H]
        g = -torch.exp(self.A_log.to(ct)) * dt
        xs = xs.to(ct)
        v = (xs * dt.unsqueeze(-1)).to(xbc.dtype)
        y = _run_recurrence(C, B, v, g, scale=1.0, chunk_size=self.chunk_size, cache=cache)
        y = y.to(ct) + xs * self.D.to(ct)[:, None]
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y.to(x.dtype))


@dataclass(frozen=True)
class GLAOptions(MixerOptions):
    num_heads: int | None = None  # None: the model's num_attention_heads
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    conv_size: int = 0
    chunk_size: int = 64
    norm_eps: float = 1e-5

    def validate(self) -> None:
        if self.num_heads is not None:
            check_int("num_heads", self.num_heads, 1)
        for name, minimum in (("gate_low_rank_dim", 1), ("conv_size", 0), ("chunk_size", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("expand_k", "expand_v", "gate_logit_normalizer", "norm_eps"):
            check_positive(name, getattr(self, name))


@register_mixer("gla")
class GLAMixer(Mixer):
    """Gated linear attention (Yang et al., 2024), as in its reference implementation.

    q, k: [heads, key_dim / heads] with key_dim = expand_k * hidden_size; v: value_dim =
    expand_v * hidden_size. Per-key log-decay from a low-rank projection,
    g = logsigmoid(W2 W1 x + b) / gate_logit_normalizer; recurrence scale 1/sqrt(head key dim);
    output: RMSNorm per head (weights shared by heads) times silu(output gate), out-projection.

    ``conv_size``: a short causal conv (+ SiLU) over q, k, v, as optional in the reference
    implementation; off (0) by default, like the published GLA. Its state is cached.
    """

    Options = GLAOptions

    def __init__(self, config, layer_idx: int, options: GLAOptions):
        super().__init__(config, layer_idx, options)
        o = options
        num_heads = config.num_attention_heads if o.num_heads is None else o.num_heads
        expand_k, expand_v, gate_low_rank_dim = o.expand_k, o.expand_v, o.gate_low_rank_dim
        gate_logit_normalizer, conv_size, chunk_size, norm_eps = (
            o.gate_logit_normalizer, o.conv_size, o.chunk_size, o.norm_eps)
        hidden = config.hidden_size
        dims = {}
        for name, expand in (("expand_k", expand_k), ("expand_v", expand_v)):
            dim = expand * hidden
            if dim != int(dim) or int(dim) % num_heads:
                raise ValueError(
                    f"layer {layer_idx}: {name} * hidden_size = {expand} * {hidden} = {dim} must be "
                    f"an integer multiple of num_heads ({num_heads})"
                )
            dims[name] = int(dim)
        key_dim, value_dim = dims["expand_k"], dims["expand_v"]
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.head_k, self.head_v = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer, self.chunk_size = float(gate_logit_normalizer), chunk_size
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)  # output gate
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, key_dim, bias=True),
        )
        self.conv = ShortConv(2 * key_dim + value_dim, conv_size)
        self.head_norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.norm_eps = norm_eps
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    def init_state(self) -> RecurrentState:
        return RecurrentState(self.num_heads, self.head_k, self.head_v,
                              conv_size=self.conv.size, conv_channels=self.conv.channels)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                state: RecurrentState | None = None) -> torch.Tensor:
        cache = state
        b, t, _ = x.shape
        H = self.num_heads
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        ct = compute_dtype(x.dtype)  # float32 (float64 for float64 inputs), as the op computes
        # q, k, v in the projections' dtype (bf16 under autocast), decays and norms in ct
        q, k, v = self.conv(qkv, cache).split([self.key_dim, self.key_dim, self.value_dim], -1)
        gk = F.logsigmoid(self.gk_proj(x).to(ct)) / self.gate_logit_normalizer
        o = _run_recurrence(
            q.reshape(b, t, H, self.head_k), k.reshape(b, t, H, self.head_k),
            v.reshape(b, t, H, self.head_v), gk.reshape(b, t, H, self.head_k),
            scale=self.head_k ** -0.5, chunk_size=self.chunk_size, cache=cache,
        ).to(ct)
        o = F.rms_norm(o, (self.head_v,), self.head_norm_weight.to(ct), self.norm_eps)
        o = o.reshape(b, t, self.value_dim) * F.silu(self.g_proj(x).to(ct))
        return self.o_proj(o.to(x.dtype))
