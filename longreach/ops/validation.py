"""Input checks shared by the attention-style ops: clear ValueErrors before any kernel runs."""

from __future__ import annotations

import torch


def check_4d(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a 4-D tensor [batch, time, heads, head_dim], got {shape}"
            )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape / dtype / device agreement of queries [B, *, HQ, D] and keys, values [B, *, H, D]."""
    check_4d(q=q, k=k, v=v)
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    B, _, HQ, D = q.shape
    Bk, _, H, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k/v have {Dk}")
    if H == 0 or HQ == 0 or D == 0:
        raise ValueError(f"empty heads: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if HQ % H != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({H})")
