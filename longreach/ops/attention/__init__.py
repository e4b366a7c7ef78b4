"""Softmax attention with causal / sliding-window / sink masks, GQA, ALiBi and explicit positions.

`attention` validates its inputs once and dispatches:
  - "sdpa": `torch.nn.functional.scaled_dot_product_attention`, used for plain full attention
    (default positions, no window or ALiBi) and for problems small enough that a [T, S] mask
    is cheap;
  - "flex": FlexAttention (torch.compile'd) with a block-sparse mask, for the rest on CUDA
    when T >= 128 (the first call for a new shape compiles: seconds to minutes);
  - "local": causal sliding windows over contiguous positions (training, and the segments of a
    long prefill) off CUDA: queries in blocks of the window's length, each block against its
    own and the previous block's keys, all blocks in one batched SDPA call;
  - "reference": the blocked pure-PyTorch specification (`reference.attention_reference`),
    for the rest elsewhere.
`impl=` ("auto", "reference", "sdpa", "flex", "local") or LONGREACH_KERNELS (e.g. =sdpa, or
=attention=flex in a per-op list; see `longreach.ops.backend`) forces a path; `impl` wins over
the variable. LONGREACH_KERNELS=triton (the Triton kernels of the CCA and GCA ops) leaves this
op on "auto": SDPA's and FlexAttention's kernels are the fast paths for softmax attention.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..backend import kernel_path
from .reference import attention_reference, blocked_attention, check_attention_inputs, key_visible

__all__ = [
    "attention",
    "attention_reference",
    "check_attention_inputs",
    "dispatch_attention",
    "key_visible",
]

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
    path = kernel_path("attention", impl)
    default_positions = q_pos is None and k_pos is None
    q_pos, k_pos, scale = check_attention_inputs(
        q, k, v, window=window, sinks=sinks, scale=scale, q_pos=q_pos, k_pos=k_pos,
        alibi_slopes=alibi_slopes,
    )
    return dispatch_attention(
        q, k, v, q_pos, k_pos, path=path, default_positions=default_positions, causal=causal,
        window=window, sinks=sinks, scale=scale, alibi_slopes=alibi_slopes,
    )


def dispatch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    path: str,
    default_positions: bool,
    causal: bool,
    window: int | None,
    sinks: int,
    scale: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    """`attention` along `path` on inputs `check_attention_inputs` has validated and filled in
    (`default_positions`: q_pos and k_pos are its defaults). For ops built on attention."""
    T, HQ, S = q.shape[1], q.shape[2], k.shape[1]
    if default_positions and window is not None and window >= max(S, T):
        window = None  # no query/key pair is that far apart: the window masks nothing
    if window is None:
        sinks = 0  # sinks only matter beside a window
    options = dict(
        causal=causal, window=window, sinks=sinks, scale=scale, alibi_slopes=alibi_slopes
    )

    if path == "reference":
        return blocked_attention(q, k, v, q_pos, k_pos, **options)
    # the blocked path is for CPU (or when forced): its applicability check reads positions on
    # the host, which would sync a CUDA device on every call
    local = None
    if path == "local" or (path == "auto" and not q.is_cuda):
        local = _local_block(q, k, q_pos, k_pos, causal=causal, window=window, sinks=sinks,
                             alibi_slopes=alibi_slopes)
    if path == "local":
        if local is None:
            raise ValueError("impl='local' needs a causal window without sinks over contiguous "
                             "positions with keys ending at the last query")
        return _local_attention(q, k, v, q_pos, k_pos, block=local, window=window, scale=scale,
                                alibi_slopes=alibi_slopes)
    if path == "auto" and local is not None and k.shape[1] > 2 * local:
        return _local_attention(q, k, v, q_pos, k_pos, block=local, window=window, scale=scale,
                                alibi_slopes=alibi_slopes)
    plain = default_positions and window is None and alibi_slopes is None and (not causal or T == S)
    if path == "sdpa" or plain:
        return _sdpa_attention(q, k, v, q_pos, k_pos, plain=plain, **options)
    mask_elements = T * S * (HQ if alibi_slopes is not None else 1)
    if path == "auto" and mask_elements <= SMALL_MASK_ELEMENTS:
        return _sdpa_attention(q, k, v, q_pos, k_pos, plain=False, **options)
    # FlexAttention (torch 2.11) fails to compile some query lengths below its 128-row tile.
    if path == "flex" or (q.is_cuda and T >= FLEX_MIN_QUERIES):
        return _flex_attention(
            q, k, v, q_pos, k_pos, default_positions=default_positions, **options
        )
    return blocked_attention(q, k, v, q_pos, k_pos, **options)


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


# ---- sliding window in blocks (batched SDPA) ------------------------------------------------


def _local_block(q, k, q_pos, k_pos, *, causal, window, sinks, alibi_slopes) -> int | None:
    """The block length for `_local_attention`, or None when it does not apply."""
    if not causal or window is None:
        return None
    T, S = q.shape[1], k.shape[1]
    ends = torch.stack([q_pos[0], q_pos[-1], k_pos[0], k_pos[-1]]).tolist()
    q0, q1, k0, k1 = ends
    if q1 - q0 != T - 1 or k1 - k0 != S - 1 or k1 != q1 or k0 > q0 or (sinks and k0 < sinks):
        return None
    block = max(window, 64)
    if alibi_slopes is not None and T * q.shape[2] * 2 * block > (1 << 25):
        return None  # the per-block ALiBi bias would be too large
    return block


def _local_attention(q, k, v, q_pos, k_pos, *, block, window, scale, alibi_slopes):
    """Causal sliding-window attention for contiguous positions in one batched SDPA call.

    Query block b (W = ``block`` positions) sees the keys of blocks b-1 and b (2W positions),
    so every key within the window is there; a fixed [W, 2W] mask (plus the start of the keys
    for the first blocks) does the rest.
    """
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    W = block
    nb = -(-T // W)
    p0, k0 = int(q_pos[0]), int(k_pos[0])
    out_dtype = q.dtype
    if alibi_slopes is not None and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()  # an ALiBi bias in half precision is too coarse
    # keys laid out over positions [p0 - W, p0 + nb * W): index = position - (p0 - W)
    first = max(k0, p0 - W)
    pad_front = first - (p0 - W)
    pad_back = nb * W + W - pad_front - (S - (first - k0))
    kp = F.pad(k[:, first - k0 :], (0, 0, 0, 0, pad_front, pad_back))
    vp = F.pad(v[:, first - k0 :], (0, 0, 0, 0, pad_front, pad_back))
    kb = kp.unfold(1, 2 * W, W).permute(0, 1, 2, 4, 3).reshape(B * nb, H, 2 * W, D)
    vb = vp.unfold(1, 2 * W, W).permute(0, 1, 2, 4, 3).reshape(B * nb, H, 2 * W, D)
    qb = F.pad(q, (0, 0, 0, 0, 0, nb * W - T)).reshape(B, nb, W, HQ, D)
    qb = qb.permute(0, 1, 3, 2, 4).reshape(B * nb, HQ, W, D)

    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    dist = W + i - j  # query position minus key position inside a block pair
    key_pos = (p0 - W) + torch.arange(nb, device=q.device)[:, None] * W + j  # [nb, 2W]
    visible = ((dist >= 0) & (dist < window))[None] & (key_pos >= k0)[:, None, :]  # [nb, W, 2W]
    mask = visible[:, None]  # [nb, 1, W, 2W]
    if alibi_slopes is not None:
        bias = -alibi_slopes.to(q.device, q.dtype)[:, None, None] * dist.to(q.dtype)
        mask = bias[None].masked_fill(~mask, float("-inf"))  # [nb, HQ, W, 2W]
    mask = mask.expand(B, *mask.shape).reshape(B * nb, *mask.shape[1:])
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                         enable_gqa=HQ != H)
    out = out.reshape(B, nb, HQ, W, D).permute(0, 1, 3, 2, 4).reshape(B, nb * W, HQ, D)
    return out[:, :T].to(out_dtype)


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
