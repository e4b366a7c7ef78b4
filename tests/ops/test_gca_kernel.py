"""The GCA Triton kernels against `gca_attention_reference`: forward, every gradient, decode.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on tiny
fp32 shapes; the GPU tests (bf16 / fp16 against the reference in fp32) need CUDA. Kernel
outputs are allocated pre-filled with NaN, so an element a kernel fails to write shows up.
"""

import pytest
import torch

from longreach.ops import backend
from longreach.ops import gca as gca_module
from longreach.ops.gca import gca_attention, gca_decode
from longreach.ops.gca.reference import blocked_gca_attention, gca_attention_reference

CAN_RUN_KERNEL = backend.triton_available() and (
    torch.cuda.is_available() or backend.interpreting()
)
needs_kernel = pytest.mark.skipif(
    not CAN_RUN_KERNEL, reason="needs Triton and CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# checks that build small CPU tensors by hand run where the kernels take CPU tensors (CI's
# interpreter); on a GPU machine the same paths are covered by the CUDA cases
cpu_kernel = pytest.mark.skipif(
    torch.cuda.is_available() and not backend.interpreting(),
    reason="CPU tensors reach the kernel only under TRITON_INTERPRET=1",
)


@pytest.fixture
def nan_outputs(monkeypatch):
    kernels = pytest.importorskip("longreach.ops.gca.triton")
    monkeypatch.setattr(kernels, "_OUTPUT_FILL", float("nan"))
    return kernels


def make_case(B, T, HQ, H, Hr, K, *, cs, D, n_chunks, seed, device=DEVICE):
    """Random inputs with empty slots, duplicate ids, one query chunk whose slots are all
    empty and a memory chunk (the last) that nobody retrieves."""
    g = torch.Generator().manual_seed(seed)
    nq = -(-T // cs)
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, n_chunks * cs, H, D, generator=g)
    v = torch.randn(B, n_chunks * cs, H, D, generator=g)
    do = torch.randn(B, T, HQ, D, generator=g)
    weights = torch.rand(B, nq, Hr, K, generator=g) + 0.5
    indices = torch.randint(0, max(1, n_chunks - 1), (B, nq, Hr, K), generator=g)
    indices = indices.masked_fill(torch.rand(B, nq, Hr, K, generator=g) < 0.25, -1)
    if K > 1:
        indices[:, :, :, 1] = indices[:, :, :, 0].clamp_min(0)  # duplicates
    if nq > 1:
        indices[0, 1] = -1  # a query chunk that retrieves nothing
    weights = weights.masked_fill(indices < 0, float("nan"))  # must be ignored
    return [t.to(device) for t in (q, k, v, indices, weights, do)]


def run(fn, q, k, v, indices, weights, do, dtype, **kw):
    leaves = [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v, weights)]
    out = fn(leaves[0], leaves[1], leaves[2], indices, leaves[3], **kw)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out, grads


def assert_close_rel(out, ref, tol, name):
    assert torch.isfinite(out).all(), f"{name}: non-finite (unwritten?) elements"
    err = (out.double() - ref.double()).abs().max().item()
    size = max(1.0, ref.double().abs().max().item())
    assert err <= tol * size, f"{name}: max error {err:.3g} (scale {size:.3g})"


def rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)).item()


# (B, T, HQ, H, shared retrieval, K, chunk size, head dim, memory chunks)
CPU_CASES = [
    (2, 1, 2, 2, False, 1, 16, 16, 3),
    (2, 37, 4, 2, True, 3, 16, 24, 4),
    (1, 64, 2, 2, False, 3, 64, 32, 3),
    (2, 130, 4, 2, False, 3, 24, 16, 5),
    (1, 130, 2, 2, True, 1, 16, 32, 4),
    (2, 37, 4, 2, False, 3, 24, 24, 3),
]


@needs_kernel
@pytest.mark.parametrize("B,T,HQ,H,shared,K,cs,D,n_chunks", CPU_CASES)
def test_forward_and_gradients_match_reference(
    nan_outputs, B, T, HQ, H, shared, K, cs, D, n_chunks
):
    Hr = 1 if shared else H
    case = make_case(B, T, HQ, H, Hr, K, cs=cs, D=D, n_chunks=n_chunks, seed=T + cs + D)
    indices = case[3]
    out, grads = run(gca_attention, *case, torch.float32, chunk_size=cs, impl="triton")
    ref, ref_grads = run(gca_attention_reference, *case, torch.float32, chunk_size=cs)
    assert_close_rel(out, ref, 1e-4, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3], strict=True):
        assert_close_rel(g, rg, 1e-4, name)
    # the reference's weight gradient is 0 at empty slots; NaN weights there stay ignored
    assert_close_rel(grads[3], torch.nan_to_num(ref_grads[3]), 1e-4, "dweights")
    assert (grads[3][indices < 0] == 0).all()
    # the last memory chunk is never retrieved: its gradients are written, and zero
    assert (grads[1][:, -cs:] == 0).all() and (grads[2][:, -cs:] == 0).all()
    if T > cs:
        assert (out[0, cs : 2 * cs] == 0).all()  # the query chunk with only empty slots


@needs_kernel
def test_custom_scale_and_repeated_calls_are_deterministic(nan_outputs):
    case = make_case(1, 40, 2, 1, 1, 3, cs=16, D=16, n_chunks=3, seed=5)
    kw = dict(chunk_size=16, scale=0.3)
    out, grads = run(gca_attention, *case, torch.float32, impl="triton", **kw)
    out2, grads2 = run(gca_attention, *case, torch.float32, impl="triton", **kw)
    ref, ref_grads = run(gca_attention_reference, *case, torch.float32, **kw)
    assert_close_rel(out, ref, 1e-4, "out")
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2, strict=True):
        assert torch.equal(g, g2)  # no atomics: bitwise reproducible
    assert_close_rel(grads[1], ref_grads[1], 1e-4, "dk")


@needs_kernel
@cpu_kernel
def test_empty_memory_and_zero_slots(nan_outputs):
    q = torch.randn(1, 20, 2, 16, requires_grad=True)
    k = torch.zeros(1, 0, 2, 16, requires_grad=True)
    v = torch.zeros(1, 0, 2, 16, requires_grad=True)
    indices = torch.full((1, 2, 2, 2), -1)
    weights = torch.rand(1, 2, 2, 2, requires_grad=True)
    out = gca_attention(q, k, v, indices, weights, chunk_size=16, impl="triton")
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (weights.grad == 0).all() and k.grad.shape == k.shape

    k = torch.randn(1, 32, 2, 16)
    none = torch.zeros(1, 2, 2, 0, dtype=torch.long)
    out = gca_attention(q, k, k, none, none.float(), chunk_size=16, impl="triton")
    assert (out == 0).all()


# (Tq, HQ, H, shared, chunk size): rows G * Tq from 2 to 96 (two row blocks)
DECODE_CASES = [
    (1, 2, 2, False, 16),
    (3, 4, 2, True, 24),
    (16, 2, 1, False, 16),
    (24, 8, 2, False, 24),
]


@needs_kernel
@pytest.mark.parametrize("Tq,HQ,H,shared,cs", DECODE_CASES)
def test_decode_matches_reference(nan_outputs, Tq, HQ, H, shared, cs):
    Hr = 1 if shared else H
    q, k, v, indices, weights, _ = make_case(2, Tq, HQ, H, Hr, 3, cs=cs, D=24, n_chunks=4, seed=Tq)
    out = gca_decode(q, k, v, indices, weights, chunk_size=cs, impl="triton")
    ref = gca_decode(q, k, v, indices, weights, chunk_size=cs, impl="reference")
    # the decode meaning: the queries' rows of a whole chunk padded with zero queries in front
    padded = torch.cat([q.new_zeros(2, cs - Tq, HQ, 24), q], dim=1)
    whole = gca_attention_reference(padded, k, v, indices, weights, chunk_size=cs)
    assert_close_rel(ref, whole[:, cs - Tq :], 1e-6, "reference decode")
    assert_close_rel(out, ref, 1e-4, "decode")


def test_decode_rejects_bad_inputs():
    q = torch.randn(1, 5, 2, 8)
    k = torch.randn(1, 16, 2, 8)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.long)
    w = torch.ones(1, 1, 2, 1)
    with pytest.raises(ValueError, match="at most chunk_size=4"):
        gca_decode(q, k, k, idx, w, chunk_size=4)
    with pytest.raises(ValueError, match=r"\[batch, 1, heads, slots\]"):
        gca_decode(q, k, k, idx.expand(1, 2, 2, 1), w.expand(1, 2, 2, 1), chunk_size=8)
    with pytest.raises(ValueError, match="indices must lie"):
        gca_decode(q, k, k, idx + 5, w, chunk_size=8)


# ---- dispatch --------------------------------------------------------------------------------


def _tiny():
    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 16, 2, 16)
    return q, k, k.clone(), torch.zeros(1, 1, 1, 2, dtype=torch.long), torch.ones(1, 1, 1, 2)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.delenv("LONGREACH_KERNELS", raising=False)
    with pytest.raises(ValueError, match="triton|Triton"):
        gca_attention(*_tiny(), chunk_size=8, impl="triton")
    with pytest.raises(ValueError, match="triton|Triton"):
        gca_decode(*_tiny(), chunk_size=8, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        gca_attention(*_tiny(), chunk_size=8, impl="cuda")
    # the default on CPU is the reference
    inputs = _tiny()
    out = gca_attention(*inputs, chunk_size=8)
    assert torch.equal(out, gca_attention_reference(*inputs, chunk_size=8))


@needs_kernel
@cpu_kernel
def test_environment_variable_and_argument_pick_the_path(monkeypatch):
    kernels = pytest.importorskip("longreach.ops.gca.triton")
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(gca_module, "blocked_gca_attention", spy("ref", blocked_gca_attention))
    monkeypatch.setattr(kernels, "gca_attention_triton", spy("tri", kernels.gca_attention_triton))
    monkeypatch.setenv("LONGREACH_KERNELS", "reference")
    gca_attention(*_tiny(), chunk_size=8)
    monkeypatch.setenv("LONGREACH_KERNELS", "triton")
    gca_attention(*_tiny(), chunk_size=8)
    gca_attention(*_tiny(), chunk_size=8, impl="reference")
    assert calls == ["ref", "tri", "ref"]


@needs_kernel
@cpu_kernel
def test_float64_falls_back_to_reference_unless_forced(monkeypatch):
    monkeypatch.setenv("LONGREACH_KERNELS", "triton")
    q, k, v, idx, w = (t.double() if t.is_floating_point() else t for t in _tiny())
    with pytest.raises(ValueError, match="float64"):
        gca_attention(q, k, v, idx, w, chunk_size=8, impl="triton")
    out = gca_attention(q, k, v, idx, w, chunk_size=8)  # env var, not the argument: fall back
    assert out.dtype == torch.float64


@needs_kernel
@cpu_kernel
def test_chunks_larger_than_one_tile_fall_back_to_reference_unless_forced(monkeypatch):
    monkeypatch.setenv("LONGREACH_KERNELS", "triton")
    q, k = torch.randn(1, 3, 2, 16), torch.randn(1, 256, 2, 16)
    idx, w = torch.zeros(1, 1, 2, 1, dtype=torch.long), torch.ones(1, 1, 2, 1)
    with pytest.raises(ValueError, match="chunk_size <= 128"):
        gca_attention(q, k, k, idx, w, chunk_size=256, impl="triton")
    with pytest.raises(ValueError, match="chunk_size <= 128"):
        gca_decode(q, k, k, idx, w, chunk_size=256, impl="triton")
    out = gca_decode(q, k, k, idx, w, chunk_size=256)
    ref = gca_attention_reference(q, k, k, idx, w, chunk_size=256)
    assert torch.equal(out, ref)


# ---- GPU ---------------------------------------------------------------------------------------

# (B, T, HQ, H, shared, K, chunk size, head dim, memory chunks)
GPU_CASES = [
    (2, 1000, 8, 2, False, 8, 64, 64, 20),
    (2, 777, 4, 4, True, 8, 64, 128, 13),
    (1, 515, 6, 3, False, 5, 48, 64, 9),
    (2, 300, 4, 2, False, 4, 128, 128, 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,HQ,H,shared,K,cs,D,n_chunks", GPU_CASES)
def test_gpu_low_precision_matches_fp32_reference(
    nan_outputs, dtype, B, T, HQ, H, shared, K, cs, D, n_chunks
):
    Hr = 1 if shared else H
    case = make_case(B, T, HQ, H, Hr, K, cs=cs, D=D, n_chunks=n_chunks, seed=T, device="cuda")
    # identical inputs for both: rounded to the low precision once
    case = [t.to(dtype).float() if t.is_floating_point() else t for t in case]
    out, grads = run(gca_attention, *case, dtype, chunk_size=cs, impl="triton")
    ref, ref_grads = run(gca_attention_reference, *case, torch.float32, chunk_size=cs)
    assert out.dtype == dtype
    names = ("out", "dq", "dk", "dv", "dweights")
    ref_grads = list(ref_grads[:3]) + [torch.nan_to_num(ref_grads[3])]
    for name, a, b in zip(names, [out, *grads], [ref, *ref_grads], strict=True):
        assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) elements"
        assert rel_rms(a, b) < 5e-3, f"{name}: relative RMS error {rel_rms(a, b):.2e}"

    q, k, v, indices, weights, _ = case
    q_lo, k_lo, v_lo = (x.to(dtype) for x in (q[:, :7], k, v))
    dec = gca_decode(q_lo, k_lo, v_lo, indices[:, :1], weights[:, :1], chunk_size=cs)
    assert dec.dtype == dtype and torch.isfinite(dec).all()
    assert rel_rms(dec, ref[:, :7]) < 5e-3
