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


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("T,window,sinks,block", [(37, 5, 2, 8), (50, 9, 0, 7), (23, 4, 3, 23)])
def test_each_path_equals_dense_with_gradients(T, window, sinks, block, impl):
    q, k, v, inv_freq = rotated(2, T, 4, 2, 8)
    q_pos = torch.arange(T)
    args = dict(sinks=sinks, window=window, inv_freq=inv_freq)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = lm_infinite_reference(*leaves, q_pos, **args)
    grads_dense = torch.autograd.grad(dense.sin().sum(), leaves)
    leaves_b = [t.clone().requires_grad_() for t in (q, k, v)]
    blocked = lm_infinite_attention(*leaves_b, q_pos, **args, block_size=block, impl=impl)
    grads_blocked = torch.autograd.grad(blocked.sin().sum(), leaves_b)
    # the SDPA path rotates queries and sink keys once and sums in another order than the
    # reference's per-sink re-rotation
    tol = {} if impl == "reference" else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(blocked, dense, **tol)
    for a, b in zip(grads_blocked, grads_dense, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_kept_keys_with_positions_read_what_all_keys_do(impl):
    # what a bounded cache holds: the sinks and the last keys, passed with their positions
    T, window, sinks = 40, 6, 2
    q, k, v, inv_freq = rotated(1, T, 2, 1, 8)
    args = dict(sinks=sinks, window=window, inv_freq=inv_freq)
    full = lm_infinite_reference(q[:, -3:], k, v, torch.arange(T - 3, T), **args)
    keep = torch.cat([torch.arange(sinks), torch.arange(T - 3 - window + 1, T)])
    kept = lm_infinite_attention(q[:, -3:], k[:, keep], v[:, keep], torch.arange(T - 3, T),
                                 **args, k_pos=keep, impl=impl)
    torch.testing.assert_close(kept, full)
    # one decoding step over the bounded keys
    step = lm_infinite_attention(q[:, -1:], k[:, keep], v[:, keep], torch.arange(T - 1, T),
                                 **args, k_pos=keep, impl=impl)
    torch.testing.assert_close(step, full[:, -1:])
    # the bounds a cache knows as ints (no read from the device) give the same result
    bounds = (T - 1, T - 1, 0, T - 1, sinks)
    known = lm_infinite_attention(q[:, -1:], k[:, keep], v[:, keep], torch.arange(T - 1, T),
                                  **args, k_pos=keep, impl=impl, position_bounds=bounds)
    torch.testing.assert_close(known, step)


@pytest.mark.parametrize("impl", ["reference", "sdpa", "auto"])
def test_far_sinks_need_the_rope_frequencies(impl):
    q, k, v, _ = rotated(1, 20, 2, 1, 8)
    with pytest.raises(ValueError, match="RoPE frequencies"):
        lm_infinite_attention(q, k, v, torch.arange(20), sinks=1, window=4, impl=impl)
    # within the window no sink is far: no frequencies needed, every path agrees
    near = [lm_infinite_attention(q, k, v, torch.arange(20), sinks=1, window=20, impl=path)
            for path in ("reference", "sdpa")]
    torch.testing.assert_close(near[0], near[1])


@pytest.fixture
def fresh_compile():
    # each case compiles FlexAttention for its own shape: after other tests' compiles a second
    # shape would recompile with dynamic shapes, which the CPU code generator of torch 2.13
    # gets wrong for FlexAttention (a C++ compile error; CUDA is not affected)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_flex_path_equals_dense_in_float32(fresh_compile):
    # FlexAttention compiles (here on the CPU, which has no FlexAttention backward)
    q, k, v, inv_freq = (t.float() for t in rotated(1, 130, 4, 2, 16))
    args = dict(sinks=3, window=17, inv_freq=inv_freq)
    dense = lm_infinite_reference(q, k, v, torch.arange(130), **args)
    flex = lm_infinite_attention(q, k, v, torch.arange(130), **args, impl="flex")
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4)


def test_flex_path_with_kept_keys(fresh_compile):
    # kept keys (sinks, then the last ones) are not one run of positions: the uncached mask
    q, k, v, inv_freq = (t.float() for t in rotated(1, 300, 4, 2, 16))
    args = dict(sinks=3, window=17, inv_freq=inv_freq)
    dense = lm_infinite_reference(q[:, -128:], k, v, torch.arange(172, 300), **args)
    keep = torch.cat([torch.arange(3), torch.arange(172 - 17 + 1, 300)])
    kept = lm_infinite_attention(q[:, -128:], k[:, keep], v[:, keep], torch.arange(172, 300),
                                 **args, k_pos=keep, impl="flex")
    torch.testing.assert_close(kept, dense, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_gpu_paths_equal_dense_with_gradients_in_bf16(impl):
    q, k, v, inv_freq = (t.cuda() for t in rotated(2, 1000, 8, 2, 64))
    args = dict(sinks=4, window=128, inv_freq=inv_freq)
    q_pos = torch.arange(1000, device="cuda")
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    dense = lm_infinite_reference(*leaves, q_pos, **args)
    grads = torch.autograd.grad(dense.sin().sum(), leaves)
    leaves_h = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = lm_infinite_attention(*leaves_h, q_pos, **args, impl=impl)
    grads_h = torch.autograd.grad(out.float().sin().sum(), leaves_h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads_h, grads, strict=True):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)
