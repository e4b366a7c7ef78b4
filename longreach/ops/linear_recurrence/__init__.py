"""Gated linear recurrence (Mamba-2 / SSD scalar decay, GLA per-key decay) with initial and
final states, for training from non-zero states and for carrying state across calls.

`linear_recurrence` validates its inputs once and dispatches: on CUDA with `fla-core` installed
(extra `gpu`) to its chunked Triton kernels, which take and return states. Per-key decays (GLA)
go to `chunk_gla`. Scalar decays (Mamba-2: one log-decay per head and step, [B, T, H]) go to
`chunk_simple_gla` when no gradient is needed (evaluation, prefill, decoding: 2.2x faster than
the broadcast) and to `chunk_gla` with the decay broadcast over the key channels when one is
(the same recurrence: every row of S_t decays by exp(g_t); a [B, T, H, K] float32 tensor).
Training stays on `chunk_gla` because `chunk_simple_gla`'s backward is computed wrongly by
Triton 3.4-3.7.0 on Hopper GPUs (fla-core refuses it there, fla-core issue #640; torch 2.11
ships Triton 3.6). Paths: "fla" (that rule), "fla-gla" (`chunk_gla` always), "fla-simple"
(`chunk_simple_gla` always, for a Triton or GPU where its backward is right). `chunk_gla` is
checked against the reference on the GPU, forward and every gradient, `chunk_simple_gla`
forward only (tests/ops/test_linear_recurrence_op.py, and the models in
tests/models/test_recurrent_mixers.py).
Otherwise (CPU, float64, no fla-core) it runs the chunked pure-PyTorch specification
(`reference.linear_recurrence_reference`), the test oracle. `impl=...` or LONGREACH_KERNELS=...
(or linear_recurrence=... in a per-op list; see `longreach.ops.backend`) forces a path.

Precision: fla-core computes bf16/fp16 inputs with float32 accumulation; float32 inputs run its
dot products in TF32 on Ampere and newer GPUs (Triton's default), about 1e-3 relative error,
unless TRITON_F32_DEFAULT=ieee is set before the first call (then ~1e-5; docs/recurrent.md).
Its kernels autotune on the first call for each shape (minutes; Triton caches the choice on
disk).
`linear_recurrence_step` advances one token, for decoding. The math is in `reference`'s
module docstring.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..backend import compute_dtype, kernel_path
from .reference import (
    check_chunk_size,
    check_linear_recurrence_inputs,
    chunked_recurrence,
    linear_recurrence_reference,
    linear_recurrence_step,
)

FLA_MIN_HEAD_DIM = 16  # smaller key / value head dims are zero-padded for fla-core

__all__ = [
    "check_linear_recurrence_inputs",
    "compute_dtype",
    "fla_version",
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
    path = kernel_path("linear_recurrence", impl)
    scale = check_linear_recurrence_inputs(q, k, v, g, initial_state, scale)
    check_chunk_size(chunk_size)
    if path in FLA_PATHS or (path == "auto" and _fla_fits(q, v)):
        simple = path == "fla-simple" or (
            path != "fla-gla" and not _needs_grad(q, k, v, g, initial_state))
        return _fla_recurrence(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, scalar_kernel=simple)
    return chunked_recurrence(
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


FLA_PATHS = ("fla", "fla-gla", "fla-simple")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fla_fits(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the automatic dispatch takes fla-core's kernel: CUDA, half or single precision
    (float64 stays on the reference, which computes in float64), and fla-core installed."""
    return (q.is_cuda and v.is_cuda and v.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _fla_ops() is not None)


def fla_version() -> str | None:
    """fla-core's version, or None when it is not installed."""
    try:
        import fla
    except ImportError:
        return None
    return getattr(fla, "__version__", "installed")


@functools.cache
def _fla_ops():
    """fla-core's chunked kernels (chunk_gla, chunk_simple_gla), or None when not installed."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_gla, chunk_simple_gla


def _fla_recurrence(q, k, v, g, *, scale, initial_state, output_final_state, scalar_kernel=True):
    """fla-core's kernels on checked inputs (scale filled in): `chunk_simple_gla` for scalar
    decays when `scalar_kernel`, else `chunk_gla` (scalar decays broadcast over the keys)."""
    ops = _fla_ops()
    if ops is None:
        raise ValueError("impl='fla' needs fla-core (pip install 'longreach[gpu]')")
    if not q.is_cuda:
        raise ValueError("impl='fla' runs on CUDA tensors only")
    chunk_gla, chunk_simple_gla = ops
    out_dtype = v.dtype
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    h0 = None if initial_state is None else initial_state.float()
    K, V = q.shape[-1], v.shape[-1]
    scalar = g.dim() == 3 and scalar_kernel
    if g.dim() == 3 and not scalar:  # one decay per head: the same decay for every key channel
        g = g[..., None].expand(*g.shape, K)
    g = g.float()
    # fla-core's kernels multiply tiles of at least 16 along the key and value dims: pad small
    # heads with zeros (zero keys and queries, decay 1, zero values and initial state leave
    # the real channels exactly as they were) and slice the padding off again
    pad_k, pad_v = max(0, FLA_MIN_HEAD_DIM - K), max(0, FLA_MIN_HEAD_DIM - V)
    if pad_k or pad_v:
        q, k = (F.pad(t, (0, pad_k)) for t in (q, k))
        g = g if scalar else F.pad(g, (0, pad_k))
        v = F.pad(v, (0, pad_v))
        h0 = None if h0 is None else F.pad(h0, (0, pad_v, 0, pad_k))
    kernel = chunk_simple_gla if scalar else chunk_gla
    o, final = kernel(q, k, v, g.contiguous(), scale=scale, initial_state=h0,
                      output_final_state=output_final_state)
    if pad_k or pad_v:
        o = o[..., :V]
        final = None if final is None else final[:, :, :K, :V]
    return o.to(out_dtype), (final.float() if output_final_state else None)
