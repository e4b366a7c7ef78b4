"""The attention the longreach ops are measured against: SDPA held to its fused kernels,
FlexAttention masks (CCA's exact visibility, a causal sliding window), GCA the published way
(gather the retrieved chunks, then SDPA), and the random causal retrieval the GCA rows use.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def fused_sdpa(device: torch.device):
    """On CUDA, SDPA restricted to its fused kernels (flash, cuDNN, memory-efficient): a shape
    they cannot take fails loudly instead of falling back to the math path (T x T scores:
    slow, or out of memory at 32K and more), which would make a weak baseline."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION])


def cca_mask_mod(n_core: int, *, group_size: int, window: int):
    """FlexAttention mask over keys [n_core core tokens ; raw tokens 0..T-1] with CCA's exact
    visibility: core token n is visible to query t iff n < J(t); raw token j iff
    J(t) g <= j <= t."""

    def mask_mod(b, h, q_idx, kv_idx):
        J = torch.clamp(q_idx + 1 - window, min=0) // group_size
        raw = kv_idx - n_core
        core_visible = (kv_idx < n_core) & (kv_idx < J)
        raw_visible = (kv_idx >= n_core) & (raw >= J * group_size) & (raw <= q_idx)
        return core_visible | raw_visible

    return mask_mod


def window_mask_mod(window: int):
    """FlexAttention mask of causal sliding-window attention (keys t - window + 1 .. t)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


def gca_gather_sdpa(q, k, v, indices, weights, *, chunk_size: int) -> torch.Tensor:
    """GCA in plain PyTorch the published way: gather the retrieved chunks into a K-times copy
    [B, NQ, K, cs, H, D], run SDPA (non-causal) per (query chunk, slot), sum with the weights.

    Shared retrieval only (indices [B, NQ, 1, K]) and T a multiple of chunk_size; empty slots
    (-1) get weight 0 (a query chunk with only empty slots returns zeros, as the op does).
    """
    B, T, HQ, D = q.shape
    M, H = k.shape[1], k.shape[2]
    cs, NQ, K = chunk_size, indices.shape[1], indices.shape[3]
    if indices.shape[2] != 1 or T != NQ * cs:
        raise ValueError("gca_gather_sdpa: needs shared retrieval and T a multiple of chunk_size")
    slots = indices[:, :, 0]  # [B, NQ, K]
    batch_ids = torch.arange(B, device=q.device)[:, None, None]
    k_g = k.reshape(B, M // cs, cs, H, D)[batch_ids, slots.clamp_min(0)]  # [B, NQ, K, cs, H, D]
    v_g = v.reshape(B, M // cs, cs, H, D)[batch_ids, slots.clamp_min(0)]
    q_g = q.reshape(B, NQ, 1, cs, HQ, D).expand(B, NQ, K, cs, HQ, D)
    out = F.scaled_dot_product_attention(
        q_g.reshape(-1, cs, HQ, D).transpose(1, 2), k_g.reshape(-1, cs, H, D).transpose(1, 2),
        v_g.reshape(-1, cs, H, D).transpose(1, 2), enable_gqa=HQ != H,
    ).reshape(B, NQ, K, HQ, cs, D)
    w = torch.where(slots >= 0, weights[:, :, 0], torch.zeros_like(weights[:, :, 0]))
    out = torch.einsum("bnkhcd,bnk->bnchd", out, w.to(out.dtype))
    return out.reshape(B, T, HQ, D)


def random_gca_indices(batch: int, n_chunks: int, top_k: int, *, device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Causal-ish retrieval [B, NQ, 1, K]: query chunk c gets top_k distinct random chunks < c,
    padded with -1 (empty) when c < top_k."""
    scores = torch.rand(batch, n_chunks, n_chunks, generator=generator)
    past = torch.arange(n_chunks)[None, :] < torch.arange(n_chunks)[:, None]
    scores = scores.masked_fill(~past, -1.0)
    top, idx = scores.topk(min(top_k, n_chunks), dim=-1)
    idx = idx.masked_fill(top < 0, -1)
    if top_k > n_chunks:
        idx = torch.cat([idx, idx.new_full((batch, n_chunks, top_k - n_chunks), -1)], dim=-1)
    return idx[:, :, None].to(device)
