"""longreach.ops.attention: every path against a dense float64 oracle, forward and gradients."""

import importlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from longreach.ops import attention
from longreach.ops.attention.reference import attention_reference, blocked_attention

dispatch = importlib.import_module("longreach.ops.attention")  # the module, not the function


def dense_attention(q, k, v, *, causal=True, window=None, sinks=0, scale=None, q_pos=None,
                    k_pos=None, alibi_slopes=None):
    """The spec written the simplest way: full [T, S] scores in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    k = k.repeat_interleave(HQ // H, dim=2)
    v = v.repeat_interleave(HQ // H, dim=2)
    p = (torch.arange(S - T, S) if q_pos is None else q_pos)[:, None]
    j = (torch.arange(S) if k_pos is None else k_pos)[None, :]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (scale or 1 / math.sqrt(D))
    if causal:
        allowed = (j <= p) & ((p - j < window) | (j < sinks) if window else True)
    else:
        allowed = ((p - j).abs() < window) | (j < sinks) if window else torch.ones(T, S, dtype=bool)
    if alibi_slopes is not None:
        dist = (p - j).double() if causal else (p - j).abs().double()
        scores = scores - alibi_slopes.double()[:, None, None] * dist
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed & has_key, float("-inf"))  # empty rows stay finite...
    probs = torch.softmax(scores, dim=-1) * has_key  # ...and are zeroed here
    return torch.einsum("bhts,bshd->bthd", probs, v)


def rel_rms(ref, out):
    # Floor on the scale (values here are O(1)): some gradients are exactly zero (one key).
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-2)).item()


def make_inputs(T, S, HQ, H, D=16, B=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + [do]


def run_reference_blocked(q, k, v, **kw):
    return attention_reference(q, k, v, block_size=16, **kw)  # small blocks: many of them


def run_reference(q, k, v, **kw):
    return attention(q, k, v, impl="reference", **kw)


def run_auto(q, k, v, **kw):
    return attention(q, k, v, **kw)


def run_sdpa(q, k, v, **kw):
    return attention(q, k, v, impl="sdpa", **kw)


PATHS = {"reference_blocked": run_reference_blocked, "reference": run_reference,
         "auto": run_auto, "sdpa": run_sdpa}


@pytest.mark.parametrize("window", [1, 5, 64, 100])
@pytest.mark.parametrize("T,S", [(1, 1), (7, 7), (130, 130), (257, 257), (1, 90), (37, 300), (200, 263)])
@pytest.mark.parametrize("alibi", [False, True])
def test_local_blocks(window, T, S, alibi):
    # the blocked-SDPA sliding window: queries at the end of a contiguous key run (a training
    # sequence or a prefill segment after a cached window), odd lengths, GQA
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4) if alibi else None
    offset = 1000  # positions need not start at 0
    kw = dict(q_pos=torch.arange(offset + S - T, offset + S), k_pos=torch.arange(offset, offset + S))
    check_against_dense(lambda q, k, v, **a: attention(q, k, v, impl="local", **a), T, S, 4, 2,
                        causal=True, window=window, alibi_slopes=slopes, **kw)


def test_local_refuses_what_it_cannot_do():
    q, k, v, _ = make_inputs(5, 5, 2, 2)
    with pytest.raises(ValueError, match="impl='local'"):
        attention(q, k, v, impl="local", window=None)
    with pytest.raises(ValueError, match="impl='local'"):
        attention(q, k, v, impl="local", window=3, sinks=1)


def check_against_dense(fn, T, S, HQ, H, dtype=torch.float32, tol=2e-5, seed=0, **kw):
    q, k, v, do = make_inputs(T, S, HQ, H, dtype=dtype, seed=seed)
    ref = dense_attention(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    out = fn(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_rms(ref, out) < tol, "forward"
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    for name, r, g in zip("qkv", ref_grads, grads):
        assert rel_rms(r, g) < tol, f"d{name}"


@pytest.mark.parametrize("path", ["reference_blocked", "auto"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5, 64, 300])
@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
def test_masks_and_lengths(path, causal, window, T):
    for sinks, (HQ, H) in [(0, (4, 2)), (1, (2, 2)), (3, (4, 2))]:
        check_against_dense(PATHS[path], T, T, HQ, H, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 16])
def test_alibi(path, causal, window):
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)
    check_against_dense(PATHS[path], 100, 100, 4, 2, causal=causal, window=window, sinks=2,
                        alibi_slopes=slopes)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("T", [1, 3])
def test_decode_with_sink_and_window_cache(path, T):
    # A cache that keeps 4 sink tokens and the 40 most recent ones of a 1000-token history.
    k_pos = torch.cat([torch.arange(4), torch.arange(1000 - 40, 1000)])
    q_pos = torch.arange(1000 - T, 1000)
    for window, causal in [(32, True), (40, True), (None, True), (8, False)]:
        check_against_dense(PATHS[path], T, len(k_pos), 4, 2, causal=causal, window=window,
                            sinks=4, q_pos=q_pos, k_pos=k_pos)


@pytest.mark.parametrize("path", list(PATHS))
def test_default_positions_align_queries_to_the_end(path):
    check_against_dense(PATHS[path], 7, 20, 2, 2)
    check_against_dense(PATHS[path], 7, 20, 2, 2, window=5, sinks=1)
    check_against_dense(PATHS[path], 20, 7, 2, 2)  # T > S: the first 13 queries see nothing


@pytest.mark.parametrize("path", list(PATHS))
def test_query_that_sees_no_key_returns_zeros(path):
    q, k, v, do = make_inputs(3, 40, 2, 1)
    kw = dict(q_pos=torch.tensor([5, 20, 60]), k_pos=torch.arange(10, 50), window=4)
    out = PATHS[path](q, k, v, **kw)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert rel_rms(dense_attention(q, k, v, **kw), out) < 2e-5
    grads = torch.autograd.grad(out, (q, k, v), do.float())
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, 0], torch.zeros_like(grads[0][:, 0]))


@pytest.mark.parametrize("path", list(PATHS))
def test_float64_and_scale(path):
    check_against_dense(PATHS[path], 63, 63, 4, 1, dtype=torch.float64, tol=1e-12, window=9,
                        sinks=1, scale=0.37)


@pytest.mark.parametrize("path", list(PATHS))
def test_bfloat16_keeps_dtype(path):
    q, k, v, _ = make_inputs(100, 100, 4, 2, dtype=torch.bfloat16)
    slopes = torch.full((4,), 0.25)
    for kw in [dict(window=8, sinks=2), dict(alibi_slopes=slopes)]:
        out = PATHS[path](q, k, v, **kw)
        assert out.dtype == torch.bfloat16
        assert rel_rms(dense_attention(q, k, v, **kw), out) < 2e-2


def test_auto_above_small_mask_size_uses_blocked_reference(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return blocked_attention(*args, **kw)

    monkeypatch.setattr(dispatch, "blocked_attention", spy)
    monkeypatch.setattr(dispatch, "SMALL_MASK_ELEMENTS", 1000)
    check_against_dense(run_auto, 100, 100, 4, 2, window=10, sinks=1)
    assert len(calls) == 1
    # Plain causal attention still goes to SDPA at any size.
    check_against_dense(run_auto, 100, 100, 4, 2, window=1000)
    assert len(calls) == 1


def test_environment_variable_forces_reference(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return blocked_attention(*args, **kw)

    monkeypatch.setattr(dispatch, "blocked_attention", spy)
    monkeypatch.setenv("LONGREACH_KERNELS", "reference")
    q, k, v, _ = make_inputs(8, 8, 2, 2)
    attention(q, k, v)
    assert len(calls) == 1
    monkeypatch.setenv("LONGREACH_KERNELS", "auto")
    attention(q, k, v)
    assert len(calls) == 1
    monkeypatch.setenv("LONGREACH_KERNELS", "triton-please")
    with pytest.raises(ValueError, match="LONGREACH_KERNELS"):
        attention(q, k, v)


def test_windowed_reference_on_long_input_forward():
    # Large enough that `auto` leaves SDPA for the blocked reference on CPU (T * S > 4M).
    T = 2100
    q, k, v, _ = make_inputs(T, T, 2, 1, B=1, seed=3)
    with torch.no_grad():
        ref = dense_attention(q, k, v, window=64, sinks=2)
        assert rel_rms(ref, attention(q, k, v, window=64, sinks=2)) < 2e-5


@pytest.mark.slow
def test_windowed_reference_memory_stays_far_below_t_by_t():
    # ru_maxrss is the process's resident high-water mark: it sees every allocation,
    # torch's included. Measured in a fresh interpreter so nothing else inflates it.
    T = 16384
    script = textwrap.dedent(f"""
        import resource, torch
        from longreach.ops.attention.reference import attention_reference, blocked_attention
        torch.manual_seed(0)
        q = torch.randn(1, {T}, 2, 16); k = torch.randn(1, {T}, 1, 16); v = torch.randn_like(k)
        with torch.no_grad():
            attention_reference(q[:, :2048], k[:, :2048], v[:, :2048], window=64, sinks=4)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = attention_reference(q, k, v, window=64, sinks=4)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(out).all()
        print((after - before) * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    # A T x T float32 score matrix is 1 GiB and even a T x T bool mask is 256 MiB.
    assert grown < 100 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(q=torch.zeros(2, 5, 16)), "q must be a 4-D"),
        (dict(k=torch.zeros(3, 6, 2, 16), v=torch.zeros(3, 6, 2, 16)), "batch mismatch"),
        (dict(q=torch.zeros(2, 5, 3, 16)), "multiple of key/value heads"),
        (dict(k=torch.zeros(2, 6, 2, 8), v=torch.zeros(2, 6, 2, 8)), "head_dim mismatch"),
        (dict(v=torch.zeros(2, 7, 2, 16)), "k and v must have the same shape"),
        (dict(v=torch.zeros(2, 6, 2, 16, dtype=torch.float64)), "dtype"),
        (dict(window=0), "window must be >= 1"),
        (dict(sinks=-1), "sinks must be >= 0"),
        (dict(q_pos=torch.arange(4)), "q_pos must be a 1-D tensor of length 5"),
        (dict(k_pos=torch.arange(7)), "k_pos must be a 1-D tensor of length 6"),
        (dict(k_pos=torch.tensor([0, 1, 3, 2, 4, 5])), "k_pos must be sorted"),
        (dict(q_pos=torch.arange(5.0)), "integer positions"),
        (dict(alibi_slopes=torch.ones(2)), r"alibi_slopes must have shape \[4\]"),
        (dict(impl="fast"), "must be one of"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = dict(q=torch.zeros(2, 5, 4, 16), k=torch.zeros(2, 6, 2, 16), v=torch.zeros(2, 6, 2, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        attention(**args)
    if "impl" not in kwargs:
        with pytest.raises(ValueError, match=message):
            attention_reference(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_matches_reference_on_cuda(dtype):
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)
    k_pos = torch.cat([torch.arange(4), torch.arange(600, 900)])
    cases = [
        dict(T=300, S=300, window=64, sinks=4),
        dict(T=300, S=300, window=37, causal=False, sinks=1),
        dict(T=257, S=257, alibi_slopes=slopes, window=100),
        dict(T=200, S=304, k_pos=k_pos, q_pos=torch.arange(700, 900), window=50, sinks=4),
        dict(T=3, S=40, q_pos=torch.tensor([5, 20, 60]), k_pos=torch.arange(10, 50), window=4),
    ]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for case in cases:
        T, S = case.pop("T"), case.pop("S")
        q, k, v, do = make_inputs(T, S, 4, 2, dtype=dtype)
        ref = dense_attention(q, k, v, **case)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        qc, kc, vc = (t.detach().cuda().requires_grad_(True) for t in (q, k, v))
        cuda_case = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in case.items()}
        out = attention(qc, kc, vc, impl="flex", **cuda_case)
        assert out.dtype == dtype
        assert rel_rms(ref, out.cpu()) < tol, case
        grads = torch.autograd.grad(out, (qc, kc, vc), do.cuda().to(dtype))
        for name, r, g in zip("qkv", ref_grads, grads):
            assert rel_rms(r, g.cpu()) < tol, (name, case)


@pytest.mark.gpu
def test_auto_on_cuda_matches_reference_above_small_mask_size():
    T = 3000  # T * S > SMALL_MASK_ELEMENTS: `auto` takes the FlexAttention path on CUDA
    q, k, v, do = (t.detach().cuda() for t in make_inputs(T, T, 4, 2, seed=5))
    for kw in [dict(window=128, sinks=4), dict(window=200, causal=False)]:
        grads = []
        for fn in (run_auto, run_reference):
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            out = fn(qq, kk, vv, **kw)
            grads.append([out, *torch.autograd.grad(out, (qq, kk, vv), do.float())])
        for name, a, r in zip(["out", "dq", "dk", "dv"], *grads):
            assert rel_rms(r, a) < 2e-5, (name, kw)
