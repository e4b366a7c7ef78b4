"""Gated linear recurrence (Mamba-2 / SSD scalar decay, GLA per-key decay) with initial and
final states, for training from non-zero states and for carrying state across calls.

`linear_recurrence` validates its inputs once and runs the chunked pure-PyTorch specification
(`reference.linear_recurrence_reference`); `linear_recurrence_step` advances one token, for
decoding. The math is in `reference`'s module docstring.
"""

from __future__ import annotations

import torch

from .reference import (
    check_linear_recurrence_inputs,
    compute_dtype,
    linear_recurrence_reference,
    linear_recurrence_step,
)

__all__ = [
    "check_linear_recurrence_inputs",
    "compute_dtype",
    "linear_recurrence",
    "linear_recurrence_reference",
    "linear_recurrence_step",
]


def linear_recurrence(
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
    """S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, from S_{-1} = initial_state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay, <= 0): [B, T, H] (one per head) or
    [B, T, H, K] (one per key channel: S_t[i, :] decays by exp(g_t[i])); initial_state:
    [B, H, K, V] or None (zeros). Default scale 1/sqrt(K). Returns (o [B, T, H, V] in v's
    dtype, final state [B, H, K, V] in float32 (float64 for float64 inputs) if
    `output_final_state`, else None). Differentiable in q, k, v, g and initial_state.
    """
    return linear_recurrence_reference(
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )
