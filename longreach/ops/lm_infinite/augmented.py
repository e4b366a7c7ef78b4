"""LM-Infinite attention as one masked attention over augmented heads (SDPA or FlexAttention).

The distance cap changes the score of a far sink key only: for a query at position i and a
sink key at j with i - j > window, RoPE scores depend on the rotation between them alone, so

    score(i, j) = <R(j + window - i) q_i, k_j> = <R(window - i) q_i, R(-j) k_j>

(q_i, k_j as rotated at their positions). With queries of twice the head dim,
``[q_i, R(window - i) q_i]``, every key becomes ``[k_j, 0]`` and each sink gets a second copy
``[0, R(-j) k_j]``; the mask shows a query the copy where the sink is far and the plain key
elsewhere. One softmax over [sink copies; keys] is then exactly LM-Infinite's, computed by a
fused attention kernel instead of per-block dense scores. Values are zero-padded to the
doubled head dim so every SDPA backend (and FlexAttention) takes them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from longreach.ops.backend import compute_dtype
from longreach.ops.rope import apply_rope


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, H, D] rotated by ``pos`` [T] times the frequencies (angles in float64)."""
    angles = pos.to(torch.float64)[:, None] * inv_freq.to(pos.device, torch.float64)[None, :]
    dtype = compute_dtype(x.dtype)
    return apply_rope(x, angles.cos().to(dtype), angles.sin().to(dtype))


def augment(q, k, v, q_pos, k_pos, n: int, *, window: int, inv_freq):
    """(q', k', v'): the augmented heads ([B, T, HQ, 2D], [B, n + S, H, 2D] x 2) with the
    copies of the ``n`` sinks (a prefix of the keys) first."""
    q2 = _rotate(q, window - q_pos, inv_freq)
    k_sink = _rotate(k[:, :n], -k_pos[:n], inv_freq)
    qa = torch.cat([q, q2], dim=-1)
    ka = torch.cat([torch.cat([torch.zeros_like(k_sink), k_sink], dim=-1),
                    torch.cat([k, torch.zeros_like(k)], dim=-1)], dim=1)
    vv = torch.cat([v[:, :n], v], dim=1)
    va = torch.cat([vv, torch.zeros_like(vv)], dim=-1)
    return qa, ka, va


def visible(i, j, copy, *, sinks: int, window: int):
    """Whether query position ``i`` reads augmented key ``j`` (a sink copy where ``copy``):
    the copy where the sink is more than ``window`` back, the plain key where LM-Infinite's
    mask shows it and it is not such a far sink."""
    far = (j < sinks) & (i - j > window)
    plain = (j <= i) & ((j < sinks) | (i - j < window)) & ~far
    return torch.where(copy, far, plain)


def _augmented_positions(k_pos, n: int):
    """Positions of the augmented keys [sink copies; keys] and which are copies."""
    kp = torch.cat([k_pos[:n], k_pos])
    return kp, torch.arange(len(kp), device=kp.device) < n


def sdpa_lm_infinite(q, k, v, q_pos, k_pos, n, *, sinks, window, inv_freq, scale):
    """LM-Infinite through SDPA with a dense [T, n + S] mask (memory grows with T x S); ``n``
    sinks lead the keys."""
    D = q.shape[-1]
    qa, ka, va = augment(q, k, v, q_pos, k_pos, n, window=window, inv_freq=inv_freq)
    kp, copy = _augmented_positions(k_pos, n)
    mask = visible(q_pos[:, None], kp[None, :], copy[None, :], sinks=sinks, window=window)
    has_key = mask.any(dim=-1)
    mask = mask | ~has_key[:, None]  # rows that see nothing: no NaN, zeroed below
    out = F.scaled_dot_product_attention(
        qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), attn_mask=mask,
        scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)[..., :D]
    return out.masked_fill(~has_key[None, :, None, None], 0.0).to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention), torch.compile(create_block_mask)


def _mask_mod(q_pos, k_pos, n: int, sinks: int, window: int):
    kp, _ = _augmented_positions(k_pos, n)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_pos[q_idx], kp[kv_idx], kv_idx < n, sinks=sinks, window=window)

    return mask_mod


@functools.lru_cache(maxsize=16)
def _run_block_mask(device, T: int, S: int, n: int, q0: int, k0: int, sinks: int, window: int):
    # every layer of a model asks for the same mask: build it once per shape
    q_pos = torch.arange(q0, q0 + T, device=device)
    k_pos = torch.arange(k0, k0 + S, device=device)
    return _compiled_flex()[1](_mask_mod(q_pos, k_pos, n, sinks, window), None, None, T, n + S,
                               device=device)


def flex_lm_infinite(q, k, v, q_pos, k_pos, n, *, sinks, window, inv_freq, scale, runs=None):
    """LM-Infinite through FlexAttention with a block-sparse mask (CUDA: work grows with
    T x (window + sinks), not T x S); ``n`` sinks lead the keys. ``runs=(q0, k0)``: the
    positions are q0.. and k0.. (the block mask is then cached per shape). Every query must
    see at least one key."""
    D = q.shape[-1]
    flex_attention, create_block_mask = _compiled_flex()
    qa, ka, va = augment(q, k, v, q_pos, k_pos, n, window=window, inv_freq=inv_freq)
    if runs is not None:
        block_mask = _run_block_mask(q.device, q.shape[1], k.shape[1], n, *runs, sinks, window)
    else:
        block_mask = create_block_mask(_mask_mod(q_pos, k_pos, n, sinks, window), None, None,
                                       qa.shape[1], ka.shape[1], device=q.device)
    out = flex_attention(qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2),
                         block_mask=block_mask, scale=scale,
                         enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return out[..., :D].to(q.dtype)
