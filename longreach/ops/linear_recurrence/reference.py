r"""Gated linear recurrence in pure PyTorch: the specification of `longreach.ops.linear_recurrence`.

For every batch row and head, with a state S_t of shape [K, V]:

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

g is a log-decay (<= 0). It is either one value per head and step (scalar decay, as in
Mamba-2 / SSD) or one value per key channel (GLA), in which case row i of the state decays by
exp(g_t[i]). S_{-1} is `initial_state` (zeros if None).

The sequence is processed in chunks: inside a chunk, a decay-masked attention over the chunk's
own tokens plus the contribution of the state entering it; then the state is carried to the
next chunk. Autograd runs through the chunk loop, so memory grows linearly with T.

Numerical stability: every decay factor used is exp of a sum of g over a range of steps, and
each such sum is formed directly (never as a difference of two running sums), so it is <= 0
and its exp lies in [0, 1]. Strongly negative g (even -inf, a hard reset of the state)
underflows to zero instead of overflowing.
"""

from __future__ import annotations

import math

import torch

from longreach.ops.backend import compute_dtype, needs_value_check


def check_linear_recurrence_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None,
    *,
    step: bool = False,
    state_name: str = "initial_state",
) -> float:
    """Validate the arguments of `linear_recurrence` (or of `linear_recurrence_step` when
    `step`, whose tensors have no time axis); return the scale with its default filled in.

    That g <= 0 (and not NaN) is checked when g is on the CPU or under LONGREACH_CHECKS=1:
    the check reads a boolean back from the device, a synchronization on GPU.
    """
    lead = ("batch", "heads") if step else ("batch", "time", "heads")
    ndim = len(lead) + 1
    for name, t, last in (("q", q, "key_dim"), ("k", k, "key_dim"), ("v", v, "value_dim")):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a {ndim}-D tensor [{', '.join(lead)}, {last}], got {shape}"
            )
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    prefix = tuple(q.shape[:-1])
    if tuple(v.shape[:-1]) != prefix:
        raise ValueError(
            f"v must match q in ({', '.join(lead)}): q has {prefix}, v has {tuple(v.shape[:-1])}"
        )
    K, V = q.shape[-1], v.shape[-1]
    if K == 0 or V == 0:
        raise ValueError(f"key_dim and value_dim must be >= 1, got {K} and {V}")

    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        what = g.dtype if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g must be a floating-point tensor, got {what}")
    if tuple(g.shape) not in (prefix, prefix + (K,)):
        raise ValueError(
            f"g must have shape {prefix} (one log-decay per head) or {prefix + (K,)} "
            f"(one per key channel), got {tuple(g.shape)}"
        )

    B, H = q.shape[0], q.shape[-2]
    if state is not None:
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, H, K, V):
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(
                f"{state_name} must have shape [batch, heads, key_dim, value_dim] = "
                f"{(B, H, K, V)}, got {shape}"
            )
        if not state.is_floating_point():
            raise ValueError(f"{state_name} must be floating point, got {state.dtype}")

    devices = {t.device for t in (q, k, v, g, state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"q, k, v, g and {state_name} must be on one device, got {devices}")
    # `not (g <= 0).all()` also catches NaN.
    if needs_value_check(g) and not bool((g <= 0).all()):
        raise ValueError("g is a log-decay and must be <= 0 everywhere (and not NaN)")
    if scale is None:
        scale = 1.0 / math.sqrt(K)
    return float(scale)


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def segment_sums(g: torch.Tensor, *, per_key: bool) -> torch.Tensor:
    """D[..., t, s, *] = sum of g[..., r, *] over s < r <= t for s <= t, and -inf for s > t.

    g: [..., L] (scalar decay) or, when `per_key`, [..., L, K]. Each entry is accumulated
    directly from the g values in its range, so D <= 0 exactly and -inf inputs give -inf,
    never NaN (a difference of running sums would lose both properties).
    """
    L = g.shape[-2] if per_key else g.shape[-1]
    idx = torch.arange(L, device=g.device)
    below = idx[:, None] > idx[None, :]  # [r, s]: r > s
    at_or_below = idx[:, None] >= idx[None, :]  # [t, s]: t >= s
    if per_key:
        x = g.unsqueeze(-2).expand(*g.shape[:-2], L, L, g.shape[-1])  # x[r, s] = g[r]
        below, at_or_below = below[..., None], at_or_below[..., None]
        dim = -3
    else:
        x = g.unsqueeze(-1).expand(*g.shape, L)
        dim = -2
    x = x.masked_fill(~below, 0.0)
    return torch.cumsum(x, dim=dim).masked_fill(~at_or_below, float("-inf"))


def linear_recurrence_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear recurrence (see the module docstring for the math).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] or [B, T, H, K], <= 0;
    initial_state: [B, H, K, V] or None (zeros). Default scale 1/sqrt(K).
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] or None). The state is
    kept and returned in float32 (float64 for float64 inputs), whatever the input dtypes.

    Memory per chunk: B*H*C*C for scalar decay, B*H*C*C*K for per-key decay (C = chunk_size).
    """
    scale = check_linear_recurrence_inputs(q, k, v, g, initial_state, scale)
    check_chunk_size(chunk_size)
    return chunked_recurrence(
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


def chunked_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linear_recurrence_reference` on inputs `check_linear_recurrence_inputs` and
    `check_chunk_size` have validated (scale filled in)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_key = g.dim() == 4
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)

    # [B, H, T, ...]: time next to the feature axes, so per-chunk products are batched matmuls.
    q = q.transpose(1, 2).to(dtype) * scale
    k = k.transpose(1, 2).to(dtype)
    v = v.transpose(1, 2).to(dtype)
    g = g.transpose(1, 2).to(dtype)
    if initial_state is None:
        state = torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)

    outputs = []
    for t0 in range(0, T, chunk_size):
        t1 = min(t0 + chunk_size, T)
        qc, kc, vc, gc = q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], g[:, :, t0:t1]
        decay = segment_sums(gc, per_key=per_key)  # [B, H, L, L(, K)]: sum of g over (s, t]
        from_start = gc.cumsum(dim=2)  # [B, H, L(, K)]: sum of g over [0, t]
        to_end = decay[:, :, -1]  # [B, H, L(, K)]: sum of g over (s, L-1]
        if per_key:
            # scores[t, s] = sum_i q_t[i] k_s[i] exp(decay[t, s, i])
            weighted_q = decay.exp() * qc.unsqueeze(3)  # [B, H, L, L, K]
            scores = torch.einsum("bhtsk,bhsk->bhts", weighted_q, kc)
            out = (qc * from_start.exp()) @ state + scores @ vc
            chunk_decay = from_start[:, :, -1].exp().unsqueeze(-1)  # [B, H, K, 1]
            state = state * chunk_decay + (kc * to_end.exp()).transpose(-1, -2) @ vc
        else:
            scores = (qc @ kc.transpose(-1, -2)) * decay.exp()
            out = (qc @ state) * from_start.exp().unsqueeze(-1) + scores @ vc
            chunk_decay = from_start[:, :, -1].exp()[..., None, None]  # [B, H, 1, 1]
            state = state * chunk_decay + (kc * to_end.exp().unsqueeze(-1)).transpose(-1, -2) @ vc
        outputs.append(out)

    if outputs:
        o = torch.cat(outputs, dim=2).transpose(1, 2).to(out_dtype)
    else:  # T == 0: nothing to emit, the state passes through unchanged
        o = torch.zeros(B, 0, H, V, dtype=out_dtype, device=q.device)
    return o, (state if output_final_state else None)


def linear_recurrence_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence, for decoding.

    q, k: [B, H, K]; v: [B, H, V]; g: [B, H] or [B, H, K], <= 0; state: [B, H, K, V] or None
    (zeros). Returns (o [B, H, V] in v's dtype, new state [B, H, K, V] in float32, or float64
    for float64 inputs). Agrees with `linear_recurrence` run over the same tokens one by one.
    """
    scale = check_linear_recurrence_inputs(q, k, v, g, state, scale, step=True, state_name="state")
    dtype = compute_dtype(v.dtype)
    B, H, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
    decay = g.to(dtype).exp()
    decay = decay.unsqueeze(-1) if g.dim() == 3 else decay[..., None, None]
    kd, vd = k.to(dtype), v.to(dtype)
    new_state = state.to(dtype) * decay + kd.unsqueeze(-1) * vd.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q.to(dtype) * scale, new_state)
    return o.to(v.dtype), new_state
