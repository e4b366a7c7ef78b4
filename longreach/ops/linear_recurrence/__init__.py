"""Gated linear recurrence (Mamba-2 / SSD scalar decay, GLA per-key decay) with initial and
final states, for training from non-zero states and for carrying state across calls.

`linear_recurrence` validates its inputs once and dispatches: for per-key decays (GLA) on
CUDA with `fla-core` installed (extra `gpu`) to its chunked Triton kernel `chunk_gla`, which
takes and returns states (checked against the reference, forward and every gradient);
otherwise to the chunked pure-PyTorch specification (`reference.linear_recurrence_reference`),
the CPU path and the test oracle. Scalar decays (Mamba-2) stay on the reference by default;
`impl="fla"` runs them through `chunk_gla` with the decay broadcast over the key channels (the
same recurrence: every row of S_t decays by exp(g_t)), because fla-core 0.6's
`chunk_simple_gla` did not match the reference in our GPU test.
`impl="reference"|"fla"` or LONGREACH_KERNELS=reference forces a path.
`linear_recurrence_step` advances one token, for decoding. The math is in `reference`'s
module docstring.
"""

from __future__ import annotations

import functools
import os

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
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, from S_{-1} = initial_state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay, <= 0): [B, T, H] (one per head) or
    [B, T, H, K] (one per key channel: S_t[i, :] decays by exp(g_t[i])); initial_state:
    [B, H, K, V] or None (zeros). Default scale 1/sqrt(K). Returns (o [B, T, H, V] in v's
    dtype, final state [B, H, K, V] in float32 (float64 for float64 inputs) if
    `output_final_state`, else None). Differentiable in q, k, v, g and initial_state.
    """
    impl = impl or os.environ.get("LONGREACH_KERNELS") or "auto"
    if impl not in ("auto", "reference", "fla", "triton"):
        raise ValueError(f"impl / LONGREACH_KERNELS must be auto, reference or fla, got {impl!r}")
    per_key = g.dim() == 4
    if impl in ("fla", "triton") or (impl == "auto" and per_key and q.is_cuda and _fla_ops() is not None):
        return _fla_recurrence(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state)
    return linear_recurrence_reference(
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


@functools.cache
def _fla_ops():
    """fla-core's chunked GLA kernel, or None when it is not installed."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    return chunk_gla


def _fla_recurrence(q, k, v, g, *, scale, initial_state, output_final_state):
    ops = _fla_ops()
    if ops is None:
        raise ValueError("impl='fla' needs fla-core (pip install 'longreach[gpu]')")
    if not q.is_cuda:
        raise ValueError("impl='fla' runs on CUDA tensors only")
    # validate exactly as the reference does (shapes, decay sign, state shape)
    scale = check_linear_recurrence_inputs(q, k, v, g, initial_state, scale)
    chunk_gla = ops
    out_dtype = v.dtype
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    h0 = None if initial_state is None else initial_state.float()
    if g.dim() == 3:  # one decay per head: the same decay for every key channel
        g = g[..., None].expand(*g.shape, q.shape[-1])
    o, final = chunk_gla(q, k, v, g.float().contiguous(), scale=scale, initial_state=h0,
                         output_final_state=output_final_state)
    return o.to(out_dtype), (final.float() if output_final_state else None)
