"""longreach.ops.gca_attention: against a float64 oracle written with plain loops, forward and
the gradients of q, k, v and the fusion weights."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from longreach.ops import gca_attention
from longreach.ops.gca.reference import gca_attention_reference


def loop_gca(q, k, v, indices, weights, *, chunk_size=64, scale=None):
    """The spec written the simplest way: one softmax per (batch, query chunk, head, slot)."""
    q, k, v, weights = q.double(), k.double(), v.double(), weights.double()
    B, T, HQ, D = q.shape
    H = k.shape[2]
    cs = chunk_size
    scale = scale or 1 / math.sqrt(D)
    batches = []
    for b in range(B):
        chunks = []
        for c in range(indices.shape[1]):
            rows = slice(c * cs, min((c + 1) * cs, T))
            heads = []
            for h in range(HQ):
                hk = h // (HQ // H)
                r = hk if indices.shape[2] == H else 0
                acc = torch.zeros_like(q[b, rows, h])
                for kk in range(indices.shape[3]):
                    j = int(indices[b, c, r, kk])
                    if j < 0:
                        continue
                    kj = k[b, j * cs : (j + 1) * cs, hk]
                    vj = v[b, j * cs : (j + 1) * cs, hk]
                    probs = torch.softmax(scale * q[b, rows, h] @ kj.T, dim=-1)
                    acc = acc + weights[b, c, r, kk] * (probs @ vj)
                heads.append(acc)
            chunks.append(torch.stack(heads, dim=1))
        batches.append(torch.cat(chunks, dim=0))
    return torch.stack(batches)


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-2)).item()


def make_inputs(
    T,
    n_chunks,
    HQ,
    H,
    Hr,
    *,
    chunk_size,
    K=3,
    D=8,
    B=2,
    dtype=torch.float32,
    seed=0,
    empty_fraction=0.25,
):
    g = torch.Generator().manual_seed(seed)
    M = n_chunks * chunk_size
    nq = -(-T // chunk_size)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, M, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, M, H, D, generator=g, dtype=torch.float64)
    weights = torch.rand(B, nq, Hr, K, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n_chunks, (B, nq, Hr, K), generator=g)
    empty = torch.rand(B, nq, Hr, K, generator=g) < empty_fraction
    indices = indices.masked_fill(empty, -1)
    do = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    q, k, v, weights = (t.to(dtype).requires_grad_(True) for t in (q, k, v, weights))
    return q, k, v, indices, weights, do


PATHS = {
    "dispatch": gca_attention,
    # One query chunk per block: exercises the block loop and the short last chunk.
    "reference_blocked": lambda *a, **kw: gca_attention_reference(*a, chunks_per_block=1, **kw),
    "reference_two_per_block": lambda *a, **kw: gca_attention_reference(
        *a, chunks_per_block=2, **kw
    ),
}


def check_against_loops(inputs, *, tol=2e-5, paths=tuple(PATHS), **kw):
    q, k, v, indices, weights, do = inputs
    params = (q, k, v, weights)
    ref = loop_gca(q, k, v, indices, weights, **kw)
    ref_grads = torch.autograd.grad(ref, params, do)
    for path in paths:
        out = PATHS[path](q, k, v, indices, weights, **kw)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert rel_rms(ref, out) < tol, (path, "forward")
        grads = torch.autograd.grad(out, params, do.to(q.dtype))
        for name, r, got in zip(["dq", "dk", "dv", "dweights"], ref_grads, grads):
            assert got.shape == r.shape
            assert rel_rms(r, got) < tol, (path, name)
    return ref


@pytest.mark.parametrize("chunk_size", [64, 16])
@pytest.mark.parametrize("T", [1, 7, 63, 100, 130])
@pytest.mark.parametrize(("HQ", "H", "Hr"), [(4, 2, 2), (4, 2, 1), (2, 2, 2), (2, 2, 1)])
def test_matches_loops(T, chunk_size, HQ, H, Hr):
    n_chunks = 5 if chunk_size == 16 else 3
    inputs = make_inputs(T, n_chunks, HQ, H, Hr, chunk_size=chunk_size, seed=T)
    check_against_loops(inputs, chunk_size=chunk_size)


def test_empty_slots_duplicates_and_all_empty_row():
    q, k, v, indices, weights, do = make_inputs(
        40, 4, 4, 2, 2, chunk_size=16, K=4, empty_fraction=0.0
    )
    indices = indices.clone()
    indices[0, 0] = -1  # batch 0, query chunk 0: every slot of both heads empty
    indices[0, 1, 0] = torch.tensor([2, 2, -1, 2])  # one chunk three times, one empty slot
    indices[1, 2, 1] = torch.tensor([-1, 0, 0, -1])
    indices[1, 1, 0] = torch.tensor([-1, -1, -1, 3])
    check_against_loops((q, k, v, indices, weights, do), chunk_size=16)

    out = gca_attention(q, k, v, indices, weights, chunk_size=16)
    assert torch.equal(out[0, :16], torch.zeros_like(out[0, :16]))
    grads = torch.autograd.grad(out, (q, k, v, weights), do.float())
    assert all(torch.isfinite(g).all() for g in grads)
    dq, dw = grads[0], grads[3]
    assert torch.equal(dq[0, :16], torch.zeros_like(dq[0, :16]))
    # An empty slot's weight does not take part, whatever its value.
    assert bool((dw[indices < 0] == 0).all())
    # A chunk picked three times with weights a, b, c acts like one slot with weight a + b + c.
    w1 = weights.detach().clone()
    i1 = indices.clone()
    w1[0, 1, 0] = torch.tensor([w1[0, 1, 0, [0, 1, 3]].sum(), 0.0, 0.0, 0.0])
    i1[0, 1, 0] = torch.tensor([2, -1, -1, -1])
    assert torch.allclose(gca_attention(q, k, v, i1, w1, chunk_size=16), out, atol=1e-6)


def test_empty_slot_weights_are_ignored_even_if_not_finite():
    q, k, v, indices, weights, do = make_inputs(20, 2, 2, 1, 1, chunk_size=8)
    indices = indices.clone()
    indices[:, :, :, 0] = -1
    w = weights.detach().clone()
    w[:, :, :, 0] = float("nan")
    out = gca_attention(q, k, v, indices, w, chunk_size=8)
    assert torch.isfinite(out).all()
    ref = loop_gca(q, k, v, indices, weights, chunk_size=8)
    assert rel_rms(ref, out) < 2e-5


def test_weight_gradient_is_slot_output_dot_output_gradient():
    # dL/dw_k = sum over heads and positions of <o_k, dO>, o_k = the slot's softmax output.
    cs = 8
    q, k, v, indices, weights, do = make_inputs(21, 3, 4, 2, 2, chunk_size=cs, K=3)
    out = gca_attention(q, k, v, indices, weights, chunk_size=cs)
    (dw,) = torch.autograd.grad(out, weights, do.float())
    with torch.no_grad():
        for kk in range(3):
            one_slot = torch.full_like(indices, -1)
            one_slot[..., kk] = indices[..., kk]
            o_k = gca_attention(q, k, v, one_slot, torch.ones_like(weights), chunk_size=cs)
            # Fold [B, T, HQ, D] into [B, query chunk, KV head, ...] and sum all but those.
            prod = torch.nn.functional.pad(o_k * do.float(), (0, 0, 0, 0, 0, 3 * cs - 21))
            expected = prod.reshape(2, 3, cs, 2, 2, -1).sum(dim=(2, 4, 5))
            expected = expected.masked_fill(indices[..., kk] < 0, 0.0)
            assert torch.allclose(dw[..., kk], expected, atol=1e-5)


def test_float64_and_scale():
    inputs = make_inputs(50, 4, 4, 2, 1, chunk_size=16, dtype=torch.float64, seed=7)
    check_against_loops(inputs, chunk_size=16, scale=0.37, tol=1e-12)


def test_bfloat16_keeps_dtype():
    q, k, v, indices, weights, _ = make_inputs(
        70, 3, 4, 2, 2, chunk_size=32, dtype=torch.bfloat16, D=16
    )
    out = gca_attention(q, k, v, indices, weights, chunk_size=32)
    assert out.dtype == torch.bfloat16
    assert rel_rms(loop_gca(q, k, v, indices, weights, chunk_size=32), out) < 2e-2
    # Fusion weights may be kept in float32 beside bf16 activations.
    out32w = gca_attention(q, k, v, indices, weights.float(), chunk_size=32)
    assert out32w.dtype == torch.bfloat16


def test_empty_memory_and_zero_slots_give_zeros():
    q, k, v, _, _, do = make_inputs(10, 1, 2, 1, 1, chunk_size=4)
    k0, v0 = k[:, :0], v[:, :0]  # no chunk stored yet
    for kk, kv in [(2, (k0, v0)), (0, (k, v))]:
        indices = torch.full((2, 3, 1, kk), -1, dtype=torch.long)
        weights = torch.ones(2, 3, 1, kk, requires_grad=True)
        out = gca_attention(q, *kv, indices, weights, chunk_size=4)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
        grads = torch.autograd.grad(out, (q, weights), do.float())
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_int32_indices():
    inputs = list(make_inputs(33, 3, 2, 2, 2, chunk_size=16))
    inputs[3] = inputs[3].int()
    check_against_loops(tuple(inputs), chunk_size=16, paths=("dispatch",))


@pytest.mark.slow
def test_memory_stays_far_below_t_by_m():
    # ru_maxrss is the process's resident high-water mark: it sees every allocation,
    # torch's included. Measured in a fresh interpreter so nothing else inflates it.
    T = M = 32768
    script = textwrap.dedent(f"""
        import resource, torch
        from longreach.ops.gca.reference import gca_attention_reference as gca
        torch.manual_seed(0)
        q = torch.randn(1, {T}, 2, 16); k = torch.randn(1, {M}, 1, 16); v = torch.randn_like(k)
        nq = {T} // 64
        idx = torch.randint(0, {M} // 64, (1, nq, 1, 8)); w = torch.rand(1, nq, 1, 8)
        with torch.no_grad():
            gca(q[:, :256], k, v, idx[:, :4], w[:, :4])
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = gca(q, k, v, idx, w)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(out).all()
        print((after - before) * 1024)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    # A T x M float32 score matrix is 4 GiB and even a T x M bool mask is 1 GiB.
    assert grown < 512 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def _args(**overrides):
    # Valid baseline: T = 5 (one query chunk of 4 + 1 row: 2 query chunks), 3 memory chunks.
    args = dict(
        q=torch.zeros(2, 5, 4, 8),
        k=torch.zeros(2, 12, 2, 8),
        v=torch.zeros(2, 12, 2, 8),
        indices=torch.zeros(2, 2, 2, 3, dtype=torch.long),
        weights=torch.zeros(2, 2, 2, 3),
        chunk_size=4,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(q=torch.zeros(2, 5, 32)), "q must be a 4-D"),
        (dict(k=torch.zeros(3, 12, 2, 8), v=torch.zeros(3, 12, 2, 8)), "batch mismatch"),
        (dict(q=torch.zeros(2, 5, 3, 8)), "multiple of key/value heads"),
        (dict(k=torch.zeros(2, 12, 2, 4), v=torch.zeros(2, 12, 2, 4)), "head_dim mismatch"),
        (dict(v=torch.zeros(2, 16, 2, 8)), "k and v must have the same shape"),
        (dict(v=torch.zeros(2, 12, 2, 8, dtype=torch.float64)), "dtype"),
        (dict(k=torch.zeros(2, 10, 2, 8), v=torch.zeros(2, 10, 2, 8)), "multiple of chunk_size"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(chunk_size=4.0), "chunk_size must be an integer >= 1"),
        (dict(indices=torch.zeros(2, 2, 2, dtype=torch.long)), "indices must be a 4-D"),
        (
            dict(
                indices=torch.zeros(2, 3, 2, 3, dtype=torch.long), weights=torch.zeros(2, 3, 2, 3)
            ),
            r"indices must have shape \[2, 2, \.\.\.\]",
        ),
        (
            dict(
                indices=torch.zeros(1, 2, 2, 3, dtype=torch.long), weights=torch.zeros(1, 2, 2, 3)
            ),
            r"indices must have shape \[2, 2, \.\.\.\]",
        ),
        (
            dict(
                indices=torch.zeros(2, 2, 3, 3, dtype=torch.long), weights=torch.zeros(2, 2, 3, 3)
            ),
            r"indices.shape\[2\] must be 1",
        ),
        (dict(indices=torch.zeros(2, 2, 2, 3)), "indices must hold integer chunk ids"),
        (dict(indices=torch.zeros(2, 2, 2, 3, dtype=torch.bool)), "integer chunk ids"),
        (dict(indices=torch.full((2, 2, 2, 3), 3)), r"indices must lie in \[-1, 2\]"),
        (dict(indices=torch.full((2, 2, 2, 3), -2)), r"indices must lie in \[-1, 2\]"),
        (dict(weights=torch.zeros(2, 2, 2, 4)), "weights must have the shape of indices"),
        (dict(weights=torch.zeros(2, 2, 1, 3)), "weights must have the shape of indices"),
        (dict(weights=torch.zeros(2, 2, 2, 3, dtype=torch.long)), "weights must be floating"),
    ],
)
def test_bad_inputs_raise_value_error(overrides, message):
    for fn in (gca_attention, gca_attention_reference):
        with pytest.raises(ValueError, match=message):
            fn(**_args(**overrides))


def test_valid_baseline_and_shared_retrieval_row_are_accepted():
    assert gca_attention(**_args()).shape == (2, 5, 4, 8)
    shared = dict(indices=torch.full((2, 2, 1, 3), -1), weights=torch.zeros(2, 2, 1, 3))
    assert gca_attention(**_args(**shared)).shape == (2, 5, 4, 8)
