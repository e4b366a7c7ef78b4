"""longreach.ops.linear_recurrence: the chunked op against a step-by-step float64 oracle."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from longreach.ops import linear_recurrence, linear_recurrence_step
from longreach.ops.linear_recurrence.reference import linear_recurrence_reference

dispatch = importlib.import_module("longreach.ops.linear_recurrence")  # the module


def naive_recurrence(q, k, v, g, *, scale=None, initial_state=None):
    """The spec written the simplest way: one step at a time in float64."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = 1 / math.sqrt(K) if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None else (
        initial_state.double())
    outs = []
    for t in range(T):
        decay = g[:, t].exp()
        decay = decay[..., None] if g.dim() == 4 else decay[..., None, None]
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, V, dtype=torch.float64)
    return o, S


def rel_rms(ref, out):
    # Floor on the scale (values here are O(1)): some gradients are exactly zero.
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-3)).item()


def make_inputs(T, per_key, *, B=2, H=2, K=8, V=12, dtype=torch.float64, seed=0,
                with_state=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    # Mostly slow decays (long memory) with some fast ones, as a learned gate produces.
    g_shape = (B, T, H, K) if per_key else (B, T, H)
    g = F.logsigmoid(2 * torch.randn(g_shape, generator=gen, dtype=torch.float64) + 2)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_state else None
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v, g)]
    if s0 is not None:
        s0 = s0.to(dtype).requires_grad_(True)
    return leaves, s0, do, dS


def grads_of(o, S, inputs, do, dS):
    # The loss reads both the outputs and the final state, so both backward paths are checked.
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_matches_naive_forward_and_gradients(per_key, T, chunk_size, with_state):
    (q, k, v, g), s0, do, dS = make_inputs(T, per_key, with_state=with_state)
    inputs = (q, k, v, g) + ((s0,) if with_state else ())
    ref_o, ref_S = naive_recurrence(q, k, v, g, initial_state=s0)
    ref_grads = grads_of(ref_o, ref_S, inputs, do, dS)

    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True,
                             chunk_size=chunk_size)
    assert o.shape == v.shape and o.dtype == torch.float64
    assert S.shape == (2, 2, 8, 12) and S.dtype == torch.float64
    assert rel_rms(ref_o, o) < 1e-12
    assert rel_rms(ref_S, S) < 1e-12
    for name, r, got in zip(["q", "k", "v", "g", "initial_state"], ref_grads,
                            grads_of(o, S, inputs, do, dS)):
        assert rel_rms(r, got) < 1e-10, f"d{name}"


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
def test_float32_inputs_and_explicit_scale(per_key):
    (q, k, v, g), s0, do, dS = make_inputs(100, per_key, dtype=torch.float32)
    ref_o, ref_S = naive_recurrence(q, k, v, g, scale=0.3, initial_state=s0)
    ref_grads = grads_of(ref_o, ref_S, (q, k, v, g, s0), do, dS)
    o, S = linear_recurrence(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True,
                             chunk_size=32)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert rel_rms(ref_o, o) < 1e-5 and rel_rms(ref_S, S) < 1e-5
    for r, got in zip(ref_grads, grads_of(o, S, (q, k, v, g, s0), do, dS)):
        assert rel_rms(r, got) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    (q, k, v, g), s0, _, _ = make_inputs(70, True, dtype=dtype)
    ref_o, ref_S = naive_recurrence(q, k, v, g, initial_state=s0)
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    # Inputs are rounded identically for both, so only the output rounding differs.
    assert rel_rms(ref_o, o) < 1e-2 and rel_rms(ref_S, S) < 1e-5


def test_final_state_only_when_asked():
    (q, k, v, g), s0, _, _ = make_inputs(10, False)
    o, S = linear_recurrence(q, k, v, g, initial_state=s0)
    assert S is None
    assert torch.equal(o, linear_recurrence(q, k, v, g, initial_state=s0,
                                            output_final_state=True)[0])


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("split", [1, 40, 64, 99])
def test_two_calls_with_passed_state_equal_one_call(per_key, split):
    (q, k, v, g), s0, do, dS = make_inputs(100, per_key, dtype=torch.float32)
    o_full, S_full = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True)
    parts = [t[:, :split] for t in (q, k, v, g)], [t[:, split:] for t in (q, k, v, g)]
    o1, S1 = linear_recurrence(*parts[0], initial_state=s0, output_final_state=True)
    o2, S2 = linear_recurrence(*parts[1], initial_state=S1, output_final_state=True)
    assert rel_rms(o_full, torch.cat([o1, o2], dim=1)) < 1e-6
    assert rel_rms(S_full, S2) < 1e-6
    # Gradients flow through the passed state as through one call.
    full_grads = grads_of(o_full, S_full, (q, k, v, g, s0), do, dS)
    split_grads = grads_of(torch.cat([o1, o2], dim=1), S2, (q, k, v, g, s0), do, dS)
    for a, b in zip(full_grads, split_grads):
        assert rel_rms(a, b) < 1e-5


def test_empty_sequence_passes_state_through():
    (q, k, v, g), s0, _, _ = make_inputs(0, True)
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True)
    assert o.shape == (2, 0, 2, 12)
    assert torch.equal(S, s0)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_equals_full_op_token_by_token(per_key, dtype):
    (q, k, v, g), s0, _, _ = make_inputs(37, per_key, dtype=dtype)
    o_full, S_full = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True,
                                       chunk_size=16)
    state, outs = s0, []
    for t in range(q.shape[1]):
        o_t, state = linear_recurrence_step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        assert o_t.dtype == dtype and state.dtype == dtype
        outs.append(o_t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_rms(o_full, torch.stack(outs, dim=1)) < tol
    assert rel_rms(S_full, state) < tol
    # No state means zeros.
    o0, s1 = linear_recurrence_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], None, scale=0.5)
    o_ref, s_ref = linear_recurrence(q[:, :1], k[:, :1], v[:, :1], g[:, :1], scale=0.5,
                                     output_final_state=True)
    assert rel_rms(o_ref[:, 0], o0) < tol and rel_rms(s_ref, s1) < tol


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strongly_negative_decay_stays_finite(per_key, dtype):
    (q, k, v, g), s0, do, dS = make_inputs(150, per_key, dtype=dtype)
    with torch.no_grad():
        # A long run of -30 per step: cumulative sums reach -1920 inside a 64-token chunk, so
        # exp(-cumsum) would overflow any float format.
        g[:, 10:140] = -30.0
        g[:, 60:62] = -200.0
    ref_o, ref_S = naive_recurrence(q, k, v, g, initial_state=s0)
    ref_grads = grads_of(ref_o, ref_S, (q, k, v, g, s0), do, dS)
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True)
    grads = grads_of(o, S, (q, k, v, g, s0), do, dS)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    # Half-precision outputs and gradients are rounded to bf16; the state is float32.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_rms(ref_o, o) < tol and rel_rms(ref_S, S) < 1e-5
    for r, got in zip(ref_grads, grads):
        assert rel_rms(r, got) < 10 * tol


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
def test_minus_infinity_decay_is_a_hard_reset(per_key):
    (q, k, v, g), s0, do, dS = make_inputs(90, per_key, dtype=torch.float32)
    with torch.no_grad():
        g[:, 50] = float("-inf")
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=32)
    # From step 50 on, nothing before it matters: same as a fresh start there.
    tail = [t[:, 50:] for t in (q, k, v, g)]
    o_tail, S_tail = linear_recurrence(*tail, output_final_state=True)
    assert rel_rms(o_tail, o[:, 50:]) < 1e-6 and rel_rms(S_tail, S) < 1e-6
    ref_o, ref_S = naive_recurrence(q, k, v, g, initial_state=s0)
    assert rel_rms(ref_o, o) < 1e-5
    inputs = (q, k, v, g, s0)
    ref_grads = grads_of(ref_o, ref_S, inputs, do, dS)
    grads = grads_of(o, S, inputs, do, dS)
    for r, got in zip(ref_grads, grads):
        assert torch.isfinite(got).all() and rel_rms(r, got) < 1e-5
    # Read only after the reset, the initial state gets no gradient at all.
    do_late = do.clone()
    do_late[:, :50] = 0
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=32)
    assert not grads_of(o, S, inputs, do_late, dS)[4].any()


def test_reference_is_the_dispatched_path():
    (q, k, v, g), s0, _, _ = make_inputs(20, True)
    o, S = linear_recurrence(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=8)
    o_ref, S_ref = linear_recurrence_reference(q, k, v, g, initial_state=s0,
                                               output_final_state=True, chunk_size=8)
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref)
    assert dispatch.linear_recurrence is linear_recurrence


def _bad(**changes):
    (q, k, v, g), s0, _, _ = make_inputs(5, False, dtype=torch.float32)
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), g=g.detach(), initial_state=s0.detach())
    args.update(changes)
    return args


BAD_INPUTS = {
    "q_rank": (lambda: _bad(q=torch.randn(2, 5, 16)), "q must be a 4-D tensor"),
    "v_not_tensor": (lambda: _bad(v=[1.0]), "v must be a 4-D tensor"),
    "qk_shape": (lambda: _bad(k=torch.randn(2, 5, 2, 4)), "q and k must have the same shape"),
    "v_time": (lambda: _bad(v=torch.randn(2, 6, 2, 12)), "v must match q"),
    "dtype": (lambda: _bad(v=torch.randn(2, 5, 2, 12, dtype=torch.float64)), "one floating dtype"),
    "int_inputs": (lambda: _bad(q=torch.ones(2, 5, 2, 8, dtype=torch.long),
                                k=torch.ones(2, 5, 2, 8, dtype=torch.long),
                                v=torch.ones(2, 5, 2, 12, dtype=torch.long)),
                   "one floating dtype"),
    "g_shape": (lambda: _bad(g=-torch.rand(2, 5, 3)), "g must have shape"),
    "g_per_value": (lambda: _bad(g=-torch.rand(2, 5, 2, 12)), "g must have shape"),
    "g_int": (lambda: _bad(g=torch.zeros(2, 5, 2, dtype=torch.long)), "g must be a floating"),
    "g_positive": (lambda: _bad(g=torch.full((2, 5, 2), 0.1)), "must be <= 0"),
    "g_nan": (lambda: _bad(g=torch.full((2, 5, 2), float("nan"))), "must be <= 0"),
    "state_shape": (lambda: _bad(initial_state=torch.randn(2, 2, 12, 8)),
                    r"initial_state must have shape .* \(2, 2, 8, 12\)"),
    "state_int": (lambda: _bad(initial_state=torch.zeros(2, 2, 8, 12, dtype=torch.long)),
                  "initial_state must be floating"),
    "chunk_size": (lambda: _bad(chunk_size=0), "chunk_size must be a positive int"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        linear_recurrence(**make())


def test_step_bad_inputs_raise_value_error():
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 12)
    g, state = -torch.rand(2, 2), torch.zeros(2, 2, 8, 12)
    linear_recurrence_step(q, k, v, g, state)  # the valid call
    with pytest.raises(ValueError, match=r"q must be a 3-D tensor \[batch, heads, key_dim\]"):
        linear_recurrence_step(q[:, None], k, v, g, state)
    with pytest.raises(ValueError, match="g must have shape"):
        linear_recurrence_step(q, k, v, -torch.rand(2, 2, 1), state)
    with pytest.raises(ValueError, match="must be <= 0"):
        linear_recurrence_step(q, k, v, g.abs() + 1, state)
    with pytest.raises(ValueError, match="state must have shape"):
        linear_recurrence_step(q, k, v, g, torch.zeros(2, 2, 8, 8))


# (K, V, input dtype, largest per-step decay |g|, tolerance on the relative RMS error)
FLA_CASES = {
    "fp32": (64, 64, torch.float32, 0.1, 5e-3),
    "fp32-small-heads": (4, 8, torch.float32, 0.1, 5e-3),  # heads under 16 wide are zero-padded
    "fp32-strong-decay": (32, 48, torch.float32, 2.0, 5e-3),  # exp(g) down to 0.14 a step
    "bf16": (64, 64, torch.bfloat16, 0.5, 2e-2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("per_key,path", [(True, "fla"), (False, "fla"), (False, "fla-gla")])
@pytest.mark.parametrize("case", list(FLA_CASES))
def test_fla_dispatch_matches_reference_on_cuda(per_key, path, case):
    """fla-core's kernels (chunk_gla for per-key decays; chunk_simple_gla for scalar ones, or
    chunk_gla with the decay broadcast under "fla-gla") against the reference computed in
    float32 on the same (rounded) inputs: output, final state and every gradient, T not a
    multiple of its 64-token chunk, with an initial state."""
    pytest.importorskip("fla")
    from longreach.ops import linear_recurrence
    from longreach.ops.linear_recurrence import _fla_fits

    K, V, dtype, g_max, tol = FLA_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H = 2, 203, 4
    q, k, v = (torch.randn(B, T, H, d, device="cuda", generator=gen) * 0.5 for d in (K, K, V))
    g_shape = (B, T, H, K) if per_key else (B, T, H)
    g = -torch.rand(g_shape, device="cuda", generator=gen) * g_max
    h0 = torch.randn(B, H, K, V, device="cuda", generator=gen) * 0.1
    do = torch.randn(B, T, H, V, device="cuda", generator=gen)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    assert _fla_fits(q, v)  # what the automatic dispatch runs for these inputs
    results = {}
    for impl in ("reference", path):
        # the reference runs on float32 copies of the rounded inputs: the oracle
        cast = (lambda t: t.float()) if impl == "reference" else (lambda t: t)
        inputs = [cast(t).detach().requires_grad_() for t in (q, k, v, g, h0)]
        o, final = linear_recurrence(*inputs[:4], initial_state=inputs[4], output_final_state=True, impl=impl)
        assert o.dtype == inputs[2].dtype and final.dtype == torch.float32
        grads = torch.autograd.grad((o.float() * do.float()).sum() + final.sum(), inputs)
        results[impl] = (o, final, *grads)
    errors = {}
    for name, ref, got in zip(["o", "final", "dq", "dk", "dv", "dg", "dh0"], results["reference"], results[path]):
        assert torch.isfinite(got).all(), name
        errors[name] = float((ref.float() - got.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt())
    print(case, path, "per key" if per_key else "scalar", {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) < tol, errors


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(FLA_CASES))
def test_scalar_decay_without_gradients_runs_chunk_simple_gla(case, monkeypatch):
    """Where no gradient is needed (evaluation, prefill) a scalar decay goes to fla-core's
    chunk_simple_gla: output and final state against the float32 reference."""
    pytest.importorskip("fla")
    op = importlib.import_module("longreach.ops.linear_recurrence")
    chunk_gla, chunk_simple_gla = op._fla_ops()
    calls = []
    monkeypatch.setattr(op, "_fla_ops", lambda: (chunk_gla, lambda *a, **kw: calls.append(1) or
                                                 chunk_simple_gla(*a, **kw)))
    K, V, dtype, g_max, tol = FLA_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(1)
    B, T, H = 2, 203, 4
    q, k, v = (torch.randn(B, T, H, d, device="cuda", generator=gen) * 0.5 for d in (K, K, V))
    g = -torch.rand(B, T, H, device="cuda", generator=gen) * g_max
    h0 = torch.randn(B, H, K, V, device="cuda", generator=gen) * 0.1
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.no_grad():
        o, final = op.linear_recurrence(q, k, v, g, initial_state=h0, output_final_state=True)
        ref_o, ref_final = op.linear_recurrence(q.float(), k.float(), v.float(), g, initial_state=h0,
                                                output_final_state=True, impl="reference")
    assert calls == [1]

    def rel(a, b):
        return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())

    print(case, "chunk_simple_gla", f"o {rel(o, ref_o):.1e}", f"final {rel(final, ref_final):.1e}")
    assert o.dtype == dtype and rel(o, ref_o) < tol and rel(final, ref_final) < tol


def test_fla_impl_needs_cuda_or_fla():
    from longreach.ops import linear_recurrence

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="fla"):
        linear_recurrence(q, q, q, -torch.rand(1, 4, 2), impl="fla")
    with pytest.raises(ValueError, match="impl"):
        linear_recurrence(q, q, q, -torch.rand(1, 4, 2), impl="fast")


def test_kernel_env_var_only_forces_what_it_names(monkeypatch):
    """LONGREACH_KERNELS=triton forces the attention kernels; it leaves this op on auto (the
    reference on CPU) instead of demanding fla-core."""
    from longreach.ops import linear_recurrence

    q, g = torch.randn(1, 5, 2, 8), -torch.rand(1, 5, 2)
    want, _ = linear_recurrence(q, q, q, g, impl="reference")
    for value in ("triton", "auto", "reference"):
        monkeypatch.setenv("LONGREACH_KERNELS", value)
        torch.testing.assert_close(linear_recurrence(q, q, q, g)[0], want, rtol=0, atol=0)
    monkeypatch.setenv("LONGREACH_KERNELS", "fla")  # forced: no CUDA here, so a clear error
    with pytest.raises(ValueError, match="fla"):
        linear_recurrence(q, q, q, g)

