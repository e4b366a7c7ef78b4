"""Softmax attention with causal / sliding-window / sink masks, GQA, ALiBi and explicit positions.

`attention` validates its inputs once and dispatches:
  - "sdpa": `torch.nn.functional.scaled_dot_product_attention`, used for plain full attention
    (default positions, no window or ALiBi) and for problems small enough that a [T, S] mask
    is cheap;
  - "flex": FlexAttention (torch.compile'd) with a block-sparse mask, for the rest on CUDA
    when T >= 128 (the first call for a new shape compiles: seconds to minutes);
  - "reference": the blocked pure-PyTorch specification (`reference.attention_reference`),
    for the rest elsewhere.
`impl=` or the environment variable LONGREACH_KERNELS ("auto", "reference", "sdpa", "flex")
forces a path; `impl` wins over the variable.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .reference import attention_reference, check_attention_inputs, key_visible

__all__ = ["attention", "attention_reference", "check_attention_inputs", "key_visible"]

IMPLS = ("auto", "reference", "sdpa", "flex")
# A [T, S] mask (or [HQ, T, S] ALiBi bias) up to this many elements is cheap enough for SDPA.
SMALL_MASK_ELEMENTS = 1 << 22
FLEX_MIN_QUERIES = 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: int = 0,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Attention over q [B, T, HQ, D] and k, v [B, S, H, D]; returns [B, T, HQ, D].

    The math (masks, positions, GQA, ALiBi) is defined in `reference.attention_reference`.
    """
    impl = impl or os.environ.get("LONGREACH_KERNELS") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"impl / LONGREACH_KERNELS must be one of {IMPLS}, got {impl!r}")
    default_positions = q_pos is None and k_pos is None
    q_pos, k_pos, scale = check_attention_inputs(
        q, k, v, window=window, sinks=sinks, scale=scale, q_pos=q_pos, k_pos=k_pos,
        alibi_slopes=alibi_slopes,
    )
    T, HQ, S = q.shape[1], q.shape[2], k.shape[1]
    if default_positions and window is not None and window >= max(S, T):
        window = None  # no query/key pair is that far apart: the window masks nothing
    if window is None:
        sinks = 0  # sinks only matter beside a window
    options = dict(
        causal=causal, window=window, sinks=sinks, scale=scale, alibi_slopes=alibi_slopes
    )

    if impl == "reference":
        return attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)
    plain = default_positions and window is None and alibi_slopes is None and (not causal or T == S)
    if impl == "sdpa" or plain:
        return _sdpa_attention(q, k, v, q_pos, k_pos, plain=plain, **options)
    mask_elements = T * S * (HQ if alibi_slopes is not None else 1)
    if impl == "auto" and mask_elements <= SMALL_MASK_ELEMENTS:
        return _sdpa_attention(q, k, v, q_pos, k_pos, plain=False, **options)
    # FlexAttention (torch 2.11) fails to compile some query lengths below its 128-row tile.
    if impl == "flex" or (q.is_cuda and T >= FLEX_MIN_QUERIES):
        return _flex_attention(
            q, k, v, q_pos, k_pos, default_positions=default_positions, **options
        )
    return attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, **options)


def _sdpa_attention(q, k, v, q_pos, k_pos, *, plain, causal, window, sinks, scale, alibi_slopes):
    """SDPA on [B, H, T, D] views; unless `plain`, with an explicit [T, S] mask or ALiBi bias."""
    out_dtype = q.dtype
    enable_gqa = q.shape[2] != k.shape[2]
    if plain:
        mask, has_key = None, None
    else:
        visible = key_visible(
            q_pos[:, None], k_pos[None, :], causal=causal, window=window, sinks=sinks
        )
        has_key = visible.any(dim=-1)
        # Rows that see nothing attend everywhere (no NaN in forward or backward), then are zeroed.
        visible |= ~has_key[:, None]
        mask = visible
        if alibi_slopes is not None:
            if q.dtype in (torch.float16, torch.bfloat16):
                # An ALiBi bias in half precision is too coarse.
                q, k, v = q.float(), k.float(), v.float()
            dist = (q_pos[:, None] - k_pos[None, :]).to(q.dtype)
            dist = dist if causal else dist.abs()
            bias = -alibi_slopes.to(q.device, q.dtype)[:, None, None] * dist
            mask = bias.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=plain and causal, scale=scale, enable_gqa=enable_gqa,
    ).transpose(1, 2)
    if has_key is not None:
        out = out.masked_fill(~has_key[None, :, None, None], 0.0)
    return out.to(out_dtype)


# ---- FlexAttention (CUDA) ---------------------------------------------------------------------


@functools.cache
def _compiled_flex():
    # Uncompiled FlexAttention materializes the full score matrix; compiled it is a fused kernel.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention), torch.compile(create_block_mask)


def _flex_block_mask(q_pos, k_pos, causal, window, sinks):
    if not causal and window is None:
        return None
    create_block_mask = _compiled_flex()[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return key_visible(q_pos[q_idx], k_pos[kv_idx], causal=causal, window=window, sinks=sinks)

    return create_block_mask(mask_mod, None, None, len(q_pos), len(k_pos), device=q_pos.device)


@functools.lru_cache(maxsize=16)
def _default_flex_block_mask(device, T, S, causal, window, sinks):
    # Every layer of a model asks for the same mask: build it once per shape.
    q_pos = torch.arange(S - T, S, device=device)
    return _flex_block_mask(q_pos, torch.arange(S, device=device), causal, window, sinks)


def _flex_attention(
    q, k, v, q_pos, k_pos, *, default_positions, causal, window, sinks, scale, alibi_slopes
):
    flex_attention = _compiled_flex()[0]
    if default_positions:
        T, S = q.shape[1], k.shape[1]
        block_mask = _default_flex_block_mask(q.device, T, S, causal, window, sinks)
    else:
        block_mask = _flex_block_mask(q_pos, k_pos, causal, window, sinks)
    score_mod = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(q.device, torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            dist = q_pos[q_idx] - k_pos[kv_idx]
            return score - slopes[h] * (dist if causal else dist.abs())

    out = flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
