"""LM-Infinite op: the blocked entry point equals the dense specification (forward and every
gradient), and a bounded key set given with its positions reads what all keys would."""

import pytest
import torch

from longreach.layers.positions import apply_rope
from longreach.ops.lm_infinite import lm_infinite_attention, lm_infinite_reference


def rotated(B, T, HQ, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    q = apply_rope(torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64), cos, sin)
    k = apply_rope(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), cos, sin)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    return q, k, v, inv_freq


@pytest.mark.parametrize("T,window,sinks,block", [(37, 5, 2, 8), (50, 9, 0, 7), (23, 4, 3, 23)])
def test_blocked_equals_dense_with_gradients(T, window, sinks, block):
    q, k, v, inv_freq = rotated(2, T, 4, 2, 8)
    q_pos = torch.arange(T)
    args = dict(sinks=sinks, window=window, inv_freq=inv_freq)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = lm_infinite_reference(*leaves, q_pos, **args)
    grads_dense = torch.autograd.grad(dense.sin().sum(), leaves)
    leaves_b = [t.clone().requires_grad_() for t in (q, k, v)]
    blocked = lm_infinite_attention(*leaves_b, q_pos, **args, block_size=block)
    grads_blocked = torch.autograd.grad(blocked.sin().sum(), leaves_b)
    torch.testing.assert_close(blocked, dense)
    for a, b in zip(grads_blocked, grads_dense, strict=True):
        torch.testing.assert_close(a, b)


def test_kept_keys_with_positions_read_what_all_keys_do():
    # what a bounded cache holds: the sinks and the last keys, passed with their positions
    T, window, sinks = 40, 6, 2
    q, k, v, inv_freq = rotated(1, T, 2, 1, 8)
    args = dict(sinks=sinks, window=window, inv_freq=inv_freq)
    full = lm_infinite_reference(q[:, -3:], k, v, torch.arange(T - 3, T), **args)
    keep = torch.cat([torch.arange(sinks), torch.arange(T - 3 - window + 1, T)])
    kept = lm_infinite_attention(q[:, -3:], k[:, keep], v[:, keep], torch.arange(T - 3, T),
                                 **args, k_pos=keep)
    torch.testing.assert_close(kept, full)


def test_far_sinks_need_the_rope_frequencies():
    q, k, v, _ = rotated(1, 20, 2, 1, 8)
    with pytest.raises(ValueError, match="RoPE frequencies"):
        lm_infinite_attention(q, k, v, torch.arange(20), sinks=1, window=4)
