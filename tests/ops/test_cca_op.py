"""longreach.ops.cca: core-context aware attention against a dense float64 oracle."""

import functools
import importlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from longreach.ops import attention, cca_attention, cca_decode, cca_pool
from longreach.ops.cca.reference import (
    blocked_cca_attention,
    cca_attention_reference,
    check_cca_decode_inputs,
    core_count,
)
from longreach.ops.cca.sdpa import sdpa_cca_decode

dispatch = importlib.import_module("longreach.ops.cca")


def visible_sets(T, group_size, window):
    """For each 0-indexed query t: (core groups, raw tokens) it sees, from the 1-indexed rule."""
    sets = []
    for t in range(T):
        i = t + 1
        J = max(0, math.floor((i - window) / group_size))
        sets.append((list(range(J)), list(range(J * group_size, t + 1))))
    return sets


def dense_cca(q, k, v, *, group_size, window, scale=None, core_heads="query"):
    """The spec written the simplest way, in float64: pool every group with a loop, then one
    softmax per query over [all core tokens ; all raw tokens] with an explicit visibility."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G, g = HQ // H, group_size
    scale = scale or 1 / math.sqrt(D)
    k = k.repeat_interleave(G, dim=2)  # [B, T, HQ, D]: query head h reads kv head h // G
    v = v.repeat_interleave(G, dim=2)
    core_k, core_v = [], []
    for m in range(T // g):
        q_last = q[:, m * g + g - 1]  # [B, HQ, D]
        if core_heads == "kv":
            q_last = q_last.view(B, H, G, D).mean(2).repeat_interleave(G, dim=1)
        kk, vv = k[:, m * g : (m + 1) * g], v[:, m * g : (m + 1) * g]
        a = torch.softmax(torch.einsum("bhd,bjhd->bhj", q_last, kk) * scale, dim=-1)
        core_k.append(torch.einsum("bhj,bjhd->bhd", a, kk))
        core_v.append(torch.einsum("bhj,bjhd->bhd", a, vv))
    N = len(core_k)
    keys = torch.cat([torch.stack(core_k, 1) if N else k[:, :0], k], dim=1)
    values = torch.cat([torch.stack(core_v, 1) if N else v[:, :0], v], dim=1)
    allowed = torch.zeros(T, N + T, dtype=torch.bool)
    for t, (cores, raws) in enumerate(visible_sets(T, g, window)):
        allowed[t, cores] = True
        allowed[t, [N + j for j in raws]] = True
    scores = torch.einsum("bthd,bshd->bhts", q, keys) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, values)


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-2)).item()


def make_inputs(T, HQ, H, D=16, B=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64) for n in (HQ, H, H))
    do = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + [do]


def run_reference_blocked(q, k, v, **kw):
    return cca_attention_reference(q, k, v, block_size=16, **kw)  # many blocks


def run_auto(q, k, v, **kw):
    return cca_attention(q, k, v, **kw)


PATHS = {"reference_blocked": run_reference_blocked, "auto": run_auto}


def check_against_dense(fn, T, HQ, H, dtype=torch.float32, tol=2e-5, seed=0, **kw):
    q, k, v, do = make_inputs(T, HQ, H, dtype=dtype, seed=seed)
    ref = dense_cca(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    out = fn(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_rms(ref, out) < tol, "forward"
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    for name, r, g in zip("qkv", ref_grads, grads):
        assert rel_rms(r, g) < tol, f"d{name}"


# (group_size, window, HQ, H): window a multiple of g, not a multiple, smaller than g; GQA.
CONFIGS = [(4, 8, 4, 2), (5, 12, 4, 1), (8, 3, 2, 2), (3, 1, 6, 2), (16, 40, 2, 1)]


def test_visible_sets_tile_the_prefix():
    # The oracle's own rule: core groups and raw tokens cover 0..t exactly once, and the raw
    # window holds `window + ((t + 1 - window) mod g)` tokens once t + 1 >= window.
    for g, s in [(4, 8), (5, 12), (8, 3), (1, 5), (16, 100)]:
        for t, (cores, raws) in enumerate(visible_sets(400, g, s)):
            covered = [j for m in cores for j in range(m * g, (m + 1) * g)] + raws
            assert covered == list(range(t + 1))
            if t + 1 >= s:
                assert len(raws) == s + (t + 1 - s) % g
            assert len(cores) == core_count(t, group_size=g, window=s)


def test_core_count_matches_group_end_rule():
    # Group m is pooled for query t exactly when its last token lies >= window tokens back.
    for g, s in [(4, 10), (4, 8), (8, 3), (1, 1), (3, 7)]:
        t = torch.arange(60)
        expected = torch.tensor([
            sum(1 for m in range(60) if (m + 1) * g - 1 <= p - s) for p in range(60)
        ])
        assert torch.equal(core_count(t, group_size=g, window=s), expected)
        assert [core_count(p, group_size=g, window=s) for p in range(60)] == expected.tolist()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
def test_matches_dense_oracle(path, T):
    for g, s, HQ, H in CONFIGS:
        check_against_dense(PATHS[path], T, HQ, H, group_size=g, window=s)


@pytest.mark.parametrize("T", [7, 100])
def test_core_heads_kv_matches_dense_oracle(T):
    for g, s, HQ, H in CONFIGS:
        check_against_dense(run_auto, T, HQ, H, group_size=g, window=s, core_heads="kv")


def test_core_heads_agree_without_gqa():
    q, k, v, _ = make_inputs(50, 2, 2)
    a = cca_attention(q, k, v, group_size=4, window=9)
    b = cca_attention(q, k, v, group_size=4, window=9, core_heads="kv")
    assert torch.equal(a, b)


def test_queries_around_the_window_edge():
    # window 10 (not a multiple of g = 4): queries t = 9 .. 18 = window-1 .. window+2g.
    g, s = 4, 10
    expected_J = {9: 0, 10: 0, 11: 0, 12: 0, 13: 1, 14: 1, 15: 1, 16: 1, 17: 2, 18: 2}
    for t, J in expected_J.items():
        assert core_count(t, group_size=g, window=s) == J
        assert core_count(torch.tensor([t]), group_size=g, window=s).item() == J
    q, k, v, do = make_inputs(19, 4, 2, dtype=torch.float64)
    out = cca_attention(q, k, v, group_size=g, window=s)
    ref = dense_cca(q, k, v, group_size=g, window=s)
    causal = attention(q, k, v)
    for t, J in expected_J.items():
        assert rel_rms(ref[:, t], out[:, t]) < 1e-12, t
        if J == 0:
            # t = s .. s+g-2 are the queries whose core token 0 the published Triton kernel
            # added on top of the raw group 0: here they see the plain causal prefix.
            assert rel_rms(causal[:, t], out[:, t]) < 1e-12, t
        else:
            assert rel_rms(causal[:, t], out[:, t]) > 1e-3, t
    grads = torch.autograd.grad(out[:, 9:19], (q, k, v), do[:, 9:19])
    ref_grads = torch.autograd.grad(ref[:, 9:19], (q, k, v), do[:, 9:19])
    for name, r, gr in zip("qkv", ref_grads, grads):
        assert rel_rms(r, gr) < 1e-12, name


@pytest.mark.parametrize("T", [1, 7, 63, 100])
def test_window_at_least_t_is_causal_attention(T):
    q, k, v, do = make_inputs(T, 4, 2)
    ref = attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    for window in [T, T + 5]:
        for impl in ["reference", "auto"]:
            out = cca_attention(q, k, v, group_size=4, window=window, impl=impl)
            assert rel_rms(ref, out) < 2e-5
            grads = torch.autograd.grad(out, (q, k, v), do.float())
            assert all(rel_rms(r, g) < 2e-5 for r, g in zip(ref_grads, grads))


def test_group_size_one_is_causal_attention():
    q, k, v, do = make_inputs(63, 4, 2)
    ref = attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    for window in [1, 5, 20]:
        for core_heads in ["query", "kv"]:
            out = cca_attention(q, k, v, group_size=1, window=window, core_heads=core_heads,
                                impl="reference")
            assert rel_rms(ref, out) < 2e-5
            grads = torch.autograd.grad(out, (q, k, v), do.float())
            assert all(rel_rms(r, g) < 2e-5 for r, g in zip(ref_grads, grads))


def test_pool_shapes_and_values():
    q, k, v, _ = make_inputs(23, 4, 2, dtype=torch.float64)  # 5 groups of 4, 3 tokens left over
    core_k, core_v = cca_pool(q, k, v, group_size=4)
    assert core_k.shape == core_v.shape == (2, 5, 4, 16)
    # Only the group-last queries matter: passing just those gives the same result.
    last_k, last_v = cca_pool(q[:, 3:20:4], k, v, group_size=4)
    assert torch.equal(core_k, last_k) and torch.equal(core_v, last_v)
    kv_k, kv_v = cca_pool(q, k, v, group_size=4, core_heads="kv")
    assert kv_k.shape == kv_v.shape == (2, 5, 2, 16)
    # Group 2, query head 3 (kv head 1) by hand.
    a = torch.softmax(k[:, 8:12, 1] @ q[:, 11, 3, :, None] / 4.0, dim=1)  # [B, 4, 1]
    assert torch.allclose(core_k[:, 2, 3], (a * k[:, 8:12, 1]).sum(1))
    assert torch.allclose(core_v[:, 2, 3], (a * v[:, 8:12, 1]).sum(1))
    a = torch.softmax(k[:, 8:12, 1] @ q[:, 11, 2:4].mean(1)[:, :, None] / 4.0, dim=1)
    assert torch.allclose(kv_k[:, 2, 1], (a * k[:, 8:12, 1]).sum(1))
    # Gradients reach the group-last query through the pooling weights, and no other query.
    dq = torch.autograd.grad(core_k.sum(), q)[0]
    assert (dq[:, 3:20:4].abs().sum((0, 2, 3)) > 0).all()
    mask = torch.ones(23, dtype=torch.bool)
    mask[3:20:4] = False
    assert torch.equal(dq[:, mask], torch.zeros_like(dq[:, mask]))
    empty_k, _ = cca_pool(q[:, :3], k[:, :3], v[:, :3], group_size=4)
    assert empty_k.shape == (2, 0, 4, 16)


def run_cache(q, k, v, *, group_size, window, core_heads, chunk, extra_raw=0, decode=cca_decode):
    """A minimal generation cache around cca_pool / cca_decode, fed `chunk` tokens per step.

    Keeps the core tokens, the raw K/V from J * g of the last query (plus `extra_raw` older
    tokens, which cca_decode must mask) and the group-last queries not yet pooled.
    """
    g, T = group_size, q.shape[1]
    core_k = core_v = None
    raw_k, raw_v, raw_start = k[:, :0], v[:, :0], 0
    pending_q = {}  # group -> its last query
    outputs, longest_raw = [], 0
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        raw_k = torch.cat([raw_k, k[:, t0:t1]], dim=1)
        raw_v = torch.cat([raw_v, v[:, t0:t1]], dim=1)
        for p in range(t0, t1):
            if (p + 1) % g == 0:
                pending_q[p // g] = q[:, p : p + 1]
        n_core = 0 if core_k is None else core_k.shape[1]
        for m in range(n_core, core_count(t1 - 1, group_size=g, window=window)):
            lo = m * g - raw_start
            ck, cv = cca_pool(pending_q.pop(m), raw_k[:, lo : lo + g], raw_v[:, lo : lo + g],
                              group_size=g, core_heads=core_heads)
            core_k = ck if core_k is None else torch.cat([core_k, ck], dim=1)
            core_v = cv if core_v is None else torch.cat([core_v, cv], dim=1)
        outputs.append(decode(q[:, t0:t1], core_k, core_v, raw_k, raw_v, raw_start=raw_start,
                              group_size=g, window=window))
        keep_from = max(0, core_count(t1 - 1, group_size=g, window=window) * g - extra_raw)
        raw_k, raw_v = raw_k[:, keep_from - raw_start :], raw_v[:, keep_from - raw_start :]
        raw_start = keep_from
        longest_raw = max(longest_raw, raw_k.shape[1])
    return torch.cat(outputs, dim=1), longest_raw


@pytest.mark.parametrize("core_heads", ["query", "kv"])
def test_decode_token_by_token_equals_full(core_heads):
    q, k, v, _ = make_inputs(70, 4, 2, dtype=torch.float64)
    for g, s in [(4, 10), (4, 8), (8, 3), (5, 1)]:
        full = cca_attention(q, k, v, group_size=g, window=s, core_heads=core_heads)
        out, longest_raw = run_cache(q, k, v, group_size=g, window=s, core_heads=core_heads,
                                     chunk=1)
        assert rel_rms(full, out) < 1e-12, (g, s)
        assert longest_raw <= s + g - 1  # the cache stays bounded by window + group - 1


def test_decode_in_chunks_with_a_looser_cache_equals_full():
    q, k, v, _ = make_inputs(70, 4, 1, dtype=torch.float64)
    full = cca_attention(q, k, v, group_size=4, window=10)
    for chunk, extra_raw in [(3, 0), (3, 5), (1, 7), (16, 2)]:
        out, _ = run_cache(q, k, v, group_size=4, window=10, core_heads="query", chunk=chunk,
                           extra_raw=extra_raw)
        assert rel_rms(full, out) < 1e-12, (chunk, extra_raw)
    # Core tokens beyond what the queries need are masked too.
    core_k, core_v = cca_pool(q, k, v, group_size=4)
    out = cca_decode(q[:, 60:62], core_k[:, :15], core_v[:, :15], k[:, :62], v[:, :62],
                     raw_start=0, group_size=4, window=10)
    assert rel_rms(full[:, 60:62], out) < 1e-12


def sdpa_decode(q, core_k, core_v, raw_k, raw_v, *, block_queries=5, **kw):
    """cca_decode through the SDPA path (CUDA's for prefill segments), validated the same way."""
    core_k, core_v, raw_start, scale = check_cca_decode_inputs(q, core_k, core_v, raw_k, raw_v,
                                                               scale=None, **kw)
    kw = {**kw, "raw_start": raw_start}
    return sdpa_cca_decode(q, core_k, core_v, raw_k, raw_v, scale=scale,
                           block_queries=block_queries, **kw)


@pytest.mark.parametrize("core_heads", ["query", "kv"])
def test_sdpa_decode_of_prefill_segments_equals_full(core_heads):
    q, k, v, _ = make_inputs(70, 4, 2, dtype=torch.float64)
    for g, s, chunk, extra_raw, block in [(4, 10, 16, 0, 5), (4, 10, 23, 5, 64), (8, 3, 9, 2, 1),
                                          (5, 12, 70, 0, 7), (4, 10, 1, 0, 5)]:
        full = cca_attention(q, k, v, group_size=g, window=s, core_heads=core_heads)
        out, _ = run_cache(q, k, v, group_size=g, window=s, core_heads=core_heads, chunk=chunk,
                           extra_raw=extra_raw,
                           decode=functools.partial(sdpa_decode, block_queries=block))
        assert out.dtype == q.dtype
        assert rel_rms(full, out) < 1e-12, (g, s, chunk, extra_raw, block)
    # bf16 stays bf16 and close to the float64 answer
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    out, _ = run_cache(*half, group_size=4, window=10, core_heads=core_heads, chunk=16,
                       decode=sdpa_decode)
    assert out.dtype == torch.bfloat16
    full = cca_attention(q, k, v, group_size=4, window=10, core_heads=core_heads)
    assert rel_rms(full, out.double()) < 2e-2


def test_bfloat16_keeps_dtype():
    q, k, v, _ = make_inputs(100, 4, 2, dtype=torch.bfloat16)
    out = cca_attention(q, k, v, group_size=4, window=16)
    assert out.dtype == torch.bfloat16
    assert rel_rms(dense_cca(q, k, v, group_size=4, window=16), out) < 2e-2


def test_float64_and_scale():
    check_against_dense(run_reference_blocked, 63, 4, 1, dtype=torch.float64, tol=1e-12,
                        group_size=4, window=9, scale=0.37)


def test_environment_variable_forces_reference(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return blocked_cca_attention(*args, **kw)

    monkeypatch.setattr(dispatch, "blocked_cca_attention", spy)
    q, k, v, _ = make_inputs(8, 2, 2)
    cca_attention(q, k, v, window=16)  # window >= T: causal attention, not the reference
    assert len(calls) == 0
    monkeypatch.setenv("LONGREACH_KERNELS", "reference")
    cca_attention(q, k, v, window=16)
    assert len(calls) == 1
    monkeypatch.setenv("LONGREACH_KERNELS", "sdpa")  # a path of another op: auto here
    cca_attention(q, k, v, window=16)
    assert len(calls) == 1
    cca_attention(q, k, v, group_size=2, window=3)
    assert len(calls) == 2


@pytest.mark.slow
def test_reference_memory_stays_far_below_t_by_t():
    # ru_maxrss is the process's resident high-water mark, measured in a fresh interpreter.
    T = 16384
    script = textwrap.dedent(f"""
        import resource, torch
        from longreach.ops.cca.reference import cca_attention_reference
        torch.manual_seed(0)
        q = torch.randn(1, {T}, 2, 16); k = torch.randn(1, {T}, 1, 16); v = torch.randn_like(k)
        kw = dict(group_size=16, window=64)
        with torch.no_grad():
            cca_attention_reference(q[:, :2048], k[:, :2048], v[:, :2048], **kw)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = cca_attention_reference(q, k, v, **kw)
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
        (dict(k=torch.zeros(3, 5, 2, 16), v=torch.zeros(3, 5, 2, 16)), "batch mismatch"),
        (dict(q=torch.zeros(2, 5, 3, 16)), "multiple of key/value heads"),
        (dict(k=torch.zeros(2, 5, 2, 8), v=torch.zeros(2, 5, 2, 8)), "head_dim mismatch"),
        (dict(v=torch.zeros(2, 6, 2, 16)), "k and v must have the same shape"),
        (dict(k=torch.zeros(2, 6, 2, 16), v=torch.zeros(2, 6, 2, 16)), "same tokens"),
        (dict(v=torch.zeros(2, 5, 2, 16, dtype=torch.float64)), "dtype"),
        (dict(q=torch.zeros(2, 0, 4, 16), k=torch.zeros(2, 0, 2, 16),
              v=torch.zeros(2, 0, 2, 16)), "empty sequence"),
        (dict(group_size=0), "group_size must be >= 1"),
        (dict(group_size=2.5), "group_size must be an integer"),
        (dict(window=0), "window must be >= 1"),
        (dict(window=None), "window must be an integer"),
        (dict(core_heads="key"), "core_heads must be one of"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = dict(q=torch.zeros(2, 5, 4, 16), k=torch.zeros(2, 5, 2, 16), v=torch.zeros(2, 5, 2, 16))
    args.update(kwargs)
    for fn in (cca_attention, cca_attention_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)
    with pytest.raises(ValueError, match="impl must be one of"):
        cca_attention(torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4),
                      impl="sdpa")


def test_bad_pool_and_decode_inputs_raise_value_error():
    q, k, v = torch.zeros(1, 12, 4, 8), torch.zeros(1, 12, 2, 8), torch.zeros(1, 12, 2, 8)
    with pytest.raises(ValueError, match="group-last queries"):
        cca_pool(q[:, :5], k, v, group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        cca_pool(q, k, v, group_size=0)
    core_k, core_v = cca_pool(q, k, v, group_size=4)  # 3 groups
    kw = dict(group_size=4, window=4)
    # Query at position 11 needs J = 2 core tokens and raw tokens from position 8.
    cca_decode(q[:, 11:], core_k[:, :2], core_v[:, :2], k[:, 8:], v[:, 8:], raw_start=8, **kw)
    cases = [
        (dict(core_k=core_k[:, :1], core_v=core_v[:, :1]), "needs 2 core tokens"),
        (dict(raw_k=k[:, 9:], raw_v=v[:, 9:], raw_start=9), "needs raw tokens from position 8"),
        (dict(raw_start=-1), "raw_start must be >= 0"),
        (dict(raw_start=8.0), "raw_start must be an integer"),
        (dict(core_v=None), "both be tensors or both be None"),
        (dict(core_v=core_v[:, :1]), "core_k and core_v must have the same shape"),
        (dict(core_k=core_k[:, :2, :3], core_v=core_v[:, :2, :3]), "multiple of Hc"),
        (dict(core_k=core_k, core_v=core_v, raw_k=k[:, 8:11], raw_v=v[:, 8:11], q=q[:, 10:11]),
         "has only 11 tokens"),
        (dict(q=q[:, 6:]), "hold only 4 tokens"),
        (dict(core_k=core_k[:, :2].double(), core_v=core_v[:, :2].double()), "dtype"),
        (dict(window=0), "window must be >= 1"),
    ]
    for update, message in cases:
        args = dict(q=q[:, 11:], core_k=core_k[:, :2], core_v=core_v[:, :2], raw_k=k[:, 8:],
                    raw_v=v[:, 8:], raw_start=8, **kw)
        args.update(update)
        with pytest.raises(ValueError, match=message):
            cca_decode(**args)
