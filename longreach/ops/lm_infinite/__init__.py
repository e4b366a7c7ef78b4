"""LM-Infinite attention: sinks plus a local window, with the relative distance capped at the
window (evaluation baselines and their fine-tunes).

``lm_infinite_attention`` dispatches (``impl=`` or LONGREACH_KERNELS, e.g.
``lm_infinite=reference``):
  - "flex": one FlexAttention call over augmented heads (``augmented``: queries of twice the
    head dim whose second half carries the distance cap) with a block-sparse mask
    (torch.compile'd: the first call per shape compiles); the default on CUDA for >= 128
    queries;
  - "sdpa": the same heads through SDPA with a dense [T, sinks + S] mask; the default for
    fewer queries (decoding) and off CUDA where there are at most 2 (window + sinks) keys and
    the mask has at most ``SDPA_MASK_ELEMENTS`` entries (on a 2-core CPU, forward and
    backward at T = 2K, window 1K: 0.38 s against 0.57 s for the reference; at window 256 the
    reference is faster, 0.14 s against 0.37 s);
  - "reference": the blocked pure-PyTorch specification (dense scores per block of queries,
    memory growing with T x (2 window + sinks)); the default for the rest off CUDA.
Where no sink is further back than the window the cap changes nothing and every path is the
plain masked attention.
"""

from __future__ import annotations

import torch

from longreach.ops.backend import kernel_path

from .augmented import flex_lm_infinite, sdpa_lm_infinite
from .reference import blocked_lm_infinite, lm_infinite_reference

SDPA_MASK_ELEMENTS = 1 << 26
FLEX_MIN_QUERIES = 128  # FlexAttention (torch 2.11) fails to compile some shorter query blocks


def lm_infinite_attention(q, k, v, q_pos, *, sinks: int, window: int, inv_freq=None, scale=None,
                          k_pos=None, block_size: int | None = None, impl: str | None = None,
                          position_bounds: tuple[int, int, int, int, int] | None = None):
    """``lm_infinite_reference``'s result (the same arguments) along the path of ``impl``
    (module docstring); ``block_size`` is the reference path's query block.

    ``position_bounds``: ``(q_pos[0], q_pos[-1], k_pos[0], k_pos[-1], (k_pos < sinks).sum())``
    as Python ints, when the caller knows them (a cache does): without them they are read
    back from the device, one synchronisation per call on CUDA."""
    path = kernel_path("lm_infinite", impl)
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    if k_pos is None:
        k_pos = torch.arange(S, device=q.device)
    scale = D**-0.5 if scale is None else scale
    # how many sinks lead the keys, is any ever far, and are the positions runs (cacheable
    # masks)? One host read unless the caller said
    if position_bounds is None:
        position_bounds = torch.stack(
            [q_pos[0], q_pos[-1], k_pos[0], k_pos[-1], (k_pos < sinks).sum()]).tolist()
    q0, q1, k0, k1, n = (int(x) for x in position_bounds)
    far_possible = sinks > 0 and k0 < sinks and q1 - k0 > window
    if path == "auto":
        if q.is_cuda and T >= FLEX_MIN_QUERIES:
            path = "flex"
        elif T * (S + sinks) <= SDPA_MASK_ELEMENTS and S <= 2 * (window + sinks):
            path = "sdpa"  # the dense mask is at most about twice the blocked band's work
        else:
            path = "reference"
    if path == "reference":
        return blocked_lm_infinite(q, k, v, q_pos, sinks=sinks, window=window, inv_freq=inv_freq,
                                   scale=scale, k_pos=k_pos, block_size=block_size)
    if far_possible and inv_freq is None:
        raise ValueError("LM-Infinite needs the model's RoPE frequencies (inv_freq)")
    if inv_freq is None:  # no sink is far: the copies are never shown, any rotation will do
        inv_freq = torch.zeros(D // 2, device=q.device)
    if path == "sdpa":
        return sdpa_lm_infinite(q, k, v, q_pos, k_pos, n, sinks=sinks, window=window,
                                inv_freq=inv_freq, scale=scale)
    runs = (q0, k0) if q1 - q0 == T - 1 and k1 - k0 == S - 1 else None
    return flex_lm_infinite(q, k, v, q_pos, k_pos, n, sinks=sinks, window=window,
                            inv_freq=inv_freq, scale=scale, runs=runs)


__all__ = ["blocked_lm_infinite", "lm_infinite_attention", "lm_infinite_reference",
           "SDPA_MASK_ELEMENTS"]
