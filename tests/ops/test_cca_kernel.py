"""The Triton CCA kernels (pooling, forward, backward, decode) against the PyTorch reference.

On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny
float32 shapes; with CUDA the GPU tests add bf16/fp16 at realistic sizes. Every buffer a kernel
writes is pre-filled with NaN, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from longreach.ops import backend
from longreach.ops.cca import (
    cca_attention,
    cca_attention_reference,
    cca_decode,
    cca_decode_reference,
    cca_pool,
    core_count,
)

CUDA = torch.cuda.is_available()
# the tiny float32 cases run in the interpreter on CPU, and on the GPU where there is one
DEVICE = "cuda" if CUDA else "cpu"
RUNS_KERNELS = backend.triton_available() and (CUDA or backend.interpreting())
pytestmark = pytest.mark.skipif(
    not RUNS_KERNELS, reason="needs Triton with CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    if not RUNS_KERNELS:
        return
    from longreach.ops.cca import triton as kernels

    def nan_empty(shape, *, like, dtype=None):
        if tuple(shape) == tuple(like.shape):  # the kernels' buffers keep like's strides
            return torch.full_like(like, float("nan"), dtype=dtype or like.dtype)
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype or like.dtype)

    monkeypatch.setattr(kernels, "_empty", nan_empty)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _inputs(B, T, HQ, H, D, *, device=DEVICE, dtype=torch.float32):
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _compare(q, k, v, *, tol, **options):
    out = cca_attention(q, k, v, impl="triton", **options)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # the reference runs in float32 on the same (possibly bf16-rounded) inputs
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = cca_attention_reference(q32, k32, v32, **options)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    assert torch.isfinite(out).all()
    errors = {"out": rel_rms(out, ref)}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        errors[name] = rel_rms(g, r)
    assert max(errors.values()) < tol, errors
    return out, ref


# ---- CPU: the interpreter, tiny float32 shapes -------------------------------------------------

CASES = [
    # B, T, HQ, H, D, group, window, core_heads
    (1, 50, 2, 1, 16, 4, 8, "query"),  # GQA, window far below the tile sizes
    (2, 77, 4, 2, 32, 8, 16, "kv"),  # batch 2, odd T, one core token per kv head
    (1, 100, 2, 2, 24, 3, 5, "query"),  # head dim padded to 32, group not a power of two
    (1, 200, 2, 1, 32, 4, 40, "query"),  # unmasked middle tiles in every loop
    (1, 45, 2, 2, 16, 16, 64, "query"),  # window > T: nothing pooled, plain causal
]


@pytest.mark.parametrize("B,T,HQ,H,D,g,w,core_heads", CASES)
def test_forward_and_gradients_match_reference(B, T, HQ, H, D, g, w, core_heads):
    q, k, v = _inputs(B, T, HQ, H, D)
    _compare(q, k, v, tol=1e-5, group_size=g, window=w, core_heads=core_heads)


@pytest.mark.parametrize("layout", ["heads-first", "mixed"])
def test_transposed_views_are_read_in_place(layout):
    # the HF plug-in hands [B, H, T, D] tensors transposed to [B, T, H, D]
    from longreach.ops.cca import triton as kernels

    B, T, HQ, H, D, g, w = 2, 61, 4, 2, 16, 4, 12
    leaves = [torch.randn(B, n, T, D, device=DEVICE, requires_grad=True) for n in (HQ, H, H)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    if layout == "mixed":  # k and v in different layouts: both copied, still right
        v = leaves[2].detach().transpose(1, 2).contiguous().requires_grad_()
    dense = kernels._dense(q, k, v)
    assert dense[0] is q and (dense[1] is k) == (layout == "heads-first")
    _compare(q, k, v, tol=1e-5, group_size=g, window=w)
    # an output gradient in another layout than q's is read through a copy
    out = cca_attention(q, k, v, impl="triton", group_size=g, window=w)
    assert out.stride() == q.stride()
    do = torch.randn(out.shape, device=DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = cca_attention_reference(q32, k32, v32, group_size=g, window=w)
    for got, want in zip(grads, torch.autograd.grad(ref, (q32, k32, v32), do)):
        assert rel_rms(got, want) < 1e-5


def test_window_boundary_rows():
    """Queries t = window-1 .. window+2g: where the first groups leave the raw window."""
    g, w = 8, 24
    T = w + 2 * g + 7
    q, k, v = _inputs(1, T, 2, 1, 16)
    out, ref = _compare(q, k, v, tol=1e-5, group_size=g, window=w)
    rows = slice(w - 1, w + 2 * g + 1)
    torch.testing.assert_close(out[:, rows], ref[:, rows], rtol=1e-5, atol=1e-5)
    # the rows straddle J(t) = 0, 1, 2
    assert [core_count(t, group_size=g, window=w) for t in (w - 1, w + g - 1, w + 2 * g)] == [
        0, 1, 2,
    ]


def _decode_case(q, k, v, tq, *, g, w, core_heads):
    """The cache a generation loop holds before the last tq tokens, as cca_decode's arguments:
    (q_new, core_k, core_v, raw_k, raw_v) and raw_start (raw views into k, v, not copies)."""
    T = q.shape[1]
    p_first = T - tq
    n = core_count(T - 1, group_size=g, window=w)
    ck, cv = cca_pool(q[:, : n * g], k[:, : n * g], v[:, : n * g], group_size=g,
                      core_heads=core_heads)
    start = core_count(p_first, group_size=g, window=w) * g
    return (q[:, p_first:], ck, cv, k[:, start:], v[:, start:]), start


@pytest.mark.parametrize("core_heads", ["query", "kv"])
@pytest.mark.parametrize("tq", [1, 3])
def test_decode_matches_reference(core_heads, tq):
    g, w, T = 4, 12, 61
    q, k, v = (t.detach() for t in _inputs(2, T, 4, 2, 16))
    p_first = T - tq
    args, start = _decode_case(q, k, v, tq, g=g, w=w, core_heads=core_heads)
    out = cca_decode(*args, raw_start=start, group_size=g, window=w, impl="triton")
    ref = cca_decode_reference(*args, raw_start=start, group_size=g, window=w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    full = cca_attention_reference(q, k, v, group_size=g, window=w, core_heads=core_heads)
    torch.testing.assert_close(out, full[:, p_first:], rtol=1e-5, atol=1e-5)


def test_decode_matches_reference_at_every_length_of_a_growing_cache():
    # a generation loop: one new token at each of 18 consecutive lengths (lengths, starts and
    # core counts cross multiples of 16 and 1 on the way; none of them is specialized on)
    g, w = 4, 12
    q, k, v = (t.detach() for t in _inputs(1, 66, 2, 2, 16))
    for T in range(48, 66):
        args, start = _decode_case(q[:, :T], k[:, :T], v[:, :T], 1, g=g, w=w, core_heads="kv")
        out = cca_decode(*args, raw_start=start, group_size=g, window=w, impl="triton")
        ref = cca_decode_reference(*args, raw_start=start, group_size=g, window=w)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_before_anything_is_pooled():
    q, k, v = (t.detach() for t in _inputs(1, 9, 2, 2, 16))
    out = cca_decode(q[:, -2:], None, None, k, v, raw_start=0, group_size=4, window=16,
                     impl="triton")
    ref = cca_decode_reference(q[:, -2:], None, None, k, v, raw_start=0, group_size=4, window=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("core_heads", ["query", "kv"])
def test_pool_kernel_matches_reference(core_heads):
    from longreach.ops.cca.triton import cca_pool_triton

    q, k, v = (t.detach() for t in _inputs(2, 43, 4, 2, 24))
    ck, cv = cca_pool_triton(q, k, v, group_size=5, scale=0.3, core_heads=core_heads)
    rk, rv = cca_pool(q, k, v, group_size=5, scale=0.3, core_heads=core_heads)
    assert ck.shape == rk.shape == (2, 8, 4 if core_heads == "query" else 2, 24)
    torch.testing.assert_close(ck, rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cv, rv, rtol=1e-5, atol=1e-5)


# ---- dispatch ----------------------------------------------------------------------------------


def test_forcing_the_kernel_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    q, k, v = _inputs(1, 20, 2, 2, 16, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cca_attention(q, k, v, group_size=4, window=8, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        cca_attention(q, k, v, group_size=4, window=8, impl="fast")


def test_environment_variable_selects_the_implementation(monkeypatch):
    from longreach.ops.cca import triton as kernels

    calls = []
    real = kernels.cca_attention_triton
    monkeypatch.setattr(kernels, "cca_attention_triton", lambda *a, **kw: calls.append(1) or
                        real(*a, **kw))
    q, k, v = _inputs(1, 20, 2, 2, 16)
    monkeypatch.setenv("LONGREACH_KERNELS", "reference")
    cca_attention(q, k, v, group_size=4, window=8)
    assert calls == []
    monkeypatch.setenv("LONGREACH_KERNELS", "triton")
    out = cca_attention(q, k, v, group_size=4, window=8)
    assert calls == [1]
    ref = cca_attention_reference(q, k, v, group_size=4, window=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # "auto" runs the kernel on CUDA tensors and keeps CPU tensors on the reference
    monkeypatch.setenv("LONGREACH_KERNELS", "auto")
    cca_attention(q, k, v, group_size=4, window=8)
    assert calls == ([1, 1] if CUDA else [1])


# ---- GPU: bf16 / fp16 at realistic sizes -------------------------------------------------------

GPU_CASES = [
    # T, HQ, H, D, group, window, core_heads
    (1000, 4, 4, 64, 16, 256, "query"),
    (2500, 8, 2, 128, 16, 1024, "query"),
    (2500, 8, 2, 128, 16, 1024, "kv"),
    (1537, 4, 1, 64, 8, 300, "query"),
    (777, 2, 2, 96, 32, 64, "query"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,HQ,H,D,g,w,core_heads", GPU_CASES)
def test_gpu_half_precision_matches_reference(T, HQ, H, D, g, w, core_heads, dtype):
    q, k, v = _inputs(2, T, HQ, H, D, device="cuda", dtype=dtype)
    _compare(q, k, v, tol=5e-3, group_size=g, window=w, core_heads=core_heads)


@pytest.mark.gpu
@pytest.mark.parametrize("core_heads", ["query", "kv"])
def test_gpu_transposed_views_bf16(core_heads):
    # the HF plug-in's layout: [B, H, T, D] tensors viewed as [B, T, H, D], read in place
    leaves = [torch.randn(2, n, 3000, 128, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True) for n in (8, 2, 2)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    _compare(q, k, v, tol=5e-3, group_size=16, window=1024, core_heads=core_heads)


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if not isinstance(caches, dict):
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
def test_gpu_decode_compiles_once_while_the_cache_grows():
    # 40 decoded tokens (cache lengths, starts, core counts and split counts all changing)
    # run on the variant the first one compiled: no compile inside a generation loop
    from longreach.ops.cca.triton import _cca_decode, _decode_merge

    g, w = 16, 1024
    q, k, v = (t.detach() for t in _inputs(1, 3000, 8, 2, 128, device="cuda",
                                            dtype=torch.bfloat16))
    args, start = _decode_case(q[:, :2950], k[:, :2950], v[:, :2950], 1, g=g, w=w,
                               core_heads="kv")
    cca_decode(*args, raw_start=start, group_size=g, window=w, impl="triton")
    before = _compiled_variants(_cca_decode), _compiled_variants(_decode_merge)
    for T in range(2951, 2991):
        args, start = _decode_case(q[:, :T], k[:, :T], v[:, :T], 1, g=g, w=w, core_heads="kv")
        cca_decode(*args, raw_start=start, group_size=g, window=w, impl="triton")
    torch.cuda.synchronize()
    assert (_compiled_variants(_cca_decode), _compiled_variants(_decode_merge)) == before


@pytest.mark.gpu
def test_gpu_window_boundary_rows_bf16():
    g, w = 16, 1024
    q, k, v = _inputs(1, w + 2 * g + 100, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    out, ref = _compare(q, k, v, tol=5e-3, group_size=g, window=w)
    rows = slice(w - 1, w + 2 * g + 1)
    assert rel_rms(out[:, rows], ref[:, rows]) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("core_heads", ["query", "kv"])
@pytest.mark.parametrize("batch,tq", [(1, 1), (8, 1), (3, 5)])
def test_gpu_decode_bf16(core_heads, batch, tq):
    g, w, T = 16, 1024, 5000
    q, k, v = (t.detach() for t in _inputs(batch, T, 8, 2, 128, device="cuda",
                                            dtype=torch.bfloat16))
    args, start = _decode_case(q, k, v, tq, g=g, w=w, core_heads=core_heads)
    out = cca_decode(*args, raw_start=start, group_size=g, window=w, impl="triton")
    ref = cca_decode_reference(*(t.float() for t in args), raw_start=start, group_size=g,
                               window=w)
    assert torch.isfinite(out).all()
    assert rel_rms(out, ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("core_heads", ["query", "kv"])
@pytest.mark.parametrize("tq", [700, 4096])
def test_gpu_prefill_segment_bf16(core_heads, tq):
    """Many new queries (a prefill segment) take the SDPA path on CUDA: against the float32
    reference and full CCA over the whole sequence."""
    g, w, T = 16, 1024, 6000
    q, k, v = (t.detach() for t in _inputs(2, T, 8, 2, 128, device="cuda",
                                            dtype=torch.bfloat16))
    args, start = _decode_case(q, k, v, tq, g=g, w=w, core_heads=core_heads)
    out = cca_decode(*args, raw_start=start, group_size=g, window=w)
    ref = cca_decode_reference(*(t.float() for t in args), raw_start=start, group_size=g,
                               window=w)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_rms(out, ref) < 5e-3
