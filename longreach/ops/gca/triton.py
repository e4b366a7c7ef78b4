"""Triton kernels for grouped chunk attention: forward, backward and decode.

The math is `reference.py`'s: query chunk c, query head h (key/value head hk = h // G,
retrieval row r = hk or 0) runs one non-causal softmax per retrieved chunk j and sums the
slot outputs with the fusion weights. Retrieved chunks are read IN PLACE from k and v through
the indices (pointer offsets), never gathered into a K-times copy. A chunk fits one tile, so
each slot is a plain (not online) softmax.

    forward  `_gca_fwd`       one program per (query chunk, batch * query head); stores the
                              per-slot log-sum-exp (base 2) for the backward.
    backward `_gca_bwd_dq`    same grid: dq, the per-slot row terms Dk = rowsum(p * dP) and a
                              per-head partial of dweights (summed over heads in torch);
             `_gca_bwd_dkdv`  one program per (memory chunk, batch * kv head) over the list of
                              (query chunk, slot) pairs that retrieved it (built in torch by a
                              stable sort, no atomics, deterministic): dk, dv. Chunks nobody
                              retrieved get zeros.
    decode   `_gca_decode`    one program per (batch, kv head, row block): rows are the G query
                              heads x Tq queries, so each retrieved chunk is read once per kv head.

Cost: per query head and filled slot the forward does 4 * cs * cs * D FLOPs (q K^T and p V),
the backward 6 * cs * cs * D in the dq pass (s, dP, dq) and 8 * cs * cs * D in the dk/dv pass
(s, dV, dP, dK). At B=4, T=16K, 12 heads, d=64, top-8 of 64-token chunks that is 103 GFLOP
forward and 464 GFLOP forward+backward (~0.6 ms at ~790 TFLOP/s); the minimum traffic (q, k,
v, o once each, plus dO, dq, dk, dv and the fp32 row statistics) is ~0.4 GB forward and
~1.2 GB forward+backward (~0.4 ms at 3 TB/s). Softmax statistics are base 2 (scores scaled by scale * log2(e)). fp32 inputs
run their dot products in IEEE fp32 (no TF32); bf16/fp16 inputs feed the tensor cores in their
own dtype and accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tests set this to NaN so that an output element a kernel fails to write is detected.
_OUTPUT_FILL: float | None = None


def _new_output(shape, *, dtype, device) -> torch.Tensor:
    if _OUTPUT_FILL is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, _OUTPUT_FILL, dtype=dtype, device=device)


def _block_sizes(chunk_size: int, head_dim: int) -> tuple[int, int]:
    """Rows (= key columns) of a chunk tile and padded head dim: powers of two >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(chunk_size)), max(16, triton.next_power_of_2(head_dim))


def _launch_config(block_m: int, block_d: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages as a plain function of the tile (no autotune: one config also
    runs in the interpreter). 64 x 64 tiles (the usual cs = 64, d = 64) fit 4 warps at
    ~130-250 registers a thread on sm_90; larger tiles, or fp32 (twice the bytes per element),
    get 8, and the largest drop the second pipeline stage to stay inside shared memory."""
    elems = block_m * block_d * (2 if dtype == torch.float32 else 1)
    return {
        "num_warps": 4 if elems <= 64 * 64 else 8,
        "num_stages": 2 if elems <= 64 * 128 else 1,
    }


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (no TF32); ignored for bf16/fp16 tensor-core dots.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- forward -----------------------------------------------------------------------------------


# fmt: off
@triton.jit
def _gca_fwd(
    Q, K, V, IDX, W, OUT, LSE,
    T, M, NQ, HQ, H, HR, R_STEP, NSLOT, TPAD, CS, D, G, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: on
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = h // G
    r = hk * R_STEP  # retrieval row: hk (one per kv head) or 0 (shared)

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    t = c * CS + rows
    in_chunk = rows < CS  # also the key columns of a chunk tile
    row_ok = in_chunk & (t < T)
    d_ok = cols < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    kv_mask = in_chunk[:, None] & d_ok[None, :]

    # 64-bit scalar bases plus loop-invariant 32-bit tile offsets keep the registers low.
    q_tile = rows[:, None] * (HQ * D) + cols[None, :]
    kv_tile = rows[:, None] * (H * D) + cols[None, :]
    q_base = (b * T + c * CS) * HQ * D + h * D
    q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sel = ((b * NQ + c) * HR + r) * NSLOT
    lse_base = LSE + (b * HQ + h) * NSLOT * TPAD + c * CS
    for kk in range(NSLOT):
        j = tl.load(IDX + sel + kk)
        if j >= 0:
            w = tl.load(W + sel + kk).to(tl.float32)
            kv_base = ((b * M + j * CS) * H + hk) * D
            kt = tl.load(K + kv_base + kv_tile, mask=kv_mask, other=0.0)
            vt = tl.load(V + kv_base + kv_tile, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            s = tl.where(in_chunk[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            den = tl.sum(p, axis=1)
            o = tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            acc += o * (w / den)[:, None]
            tl.store(lse_base + kk * TPAD + rows, m + tl.log2(den), mask=in_chunk)

    tl.store(OUT + q_base + q_tile, acc.to(OUT.dtype.element_ty), mask=q_mask)


# ---- backward ----------------------------------------------------------------------------------


# fmt: off
@triton.jit
def _gca_bwd_dq(
    Q, K, V, IDX, W, DO, LSE, DQ, DROW, DWP,
    T, M, NQ, HQ, H, HR, R_STEP, NSLOT, TPAD, CS, D, G, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: on
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = h // G
    r = hk * R_STEP

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    t = c * CS + rows
    in_chunk = rows < CS
    row_ok = in_chunk & (t < T)
    d_ok = cols < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    kv_mask = in_chunk[:, None] & d_ok[None, :]

    q_tile = rows[:, None] * (HQ * D) + cols[None, :]
    kv_tile = rows[:, None] * (H * D) + cols[None, :]
    q_base = (b * T + c * CS) * HQ * D + h * D
    q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)
    do = tl.load(DO + q_base + q_tile, mask=q_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sel = ((b * NQ + c) * HR + r) * NSLOT
    row_base = (b * HQ + h) * NSLOT * TPAD + c * CS
    dwp_base = DWP + ((b * NQ + c) * HQ + h) * NSLOT
    for kk in range(NSLOT):
        j = tl.load(IDX + sel + kk)
        if j >= 0:
            w = tl.load(W + sel + kk).to(tl.float32)
            kv_base = ((b * M + j * CS) * H + hk) * D
            kt = tl.load(K + kv_base + kv_tile, mask=kv_mask, other=0.0)
            vt = tl.load(V + kv_base + kv_tile, mask=kv_mask, other=0.0)
            lse = tl.load(LSE + row_base + kk * TPAD + rows, mask=in_chunk, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & in_chunk[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
            # rowsum(p * dP) = rowsum(dO * o_kk): the slot's share of dweights, per row.
            drow = tl.sum(p * dp, axis=1)
            tl.store(DROW + row_base + kk * TPAD + rows, drow, mask=in_chunk)
            tl.store(dwp_base + kk, tl.sum(drow, axis=0))
            ds = (p * w) * (dp - drow[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)
        else:
            tl.store(dwp_base + kk, 0.0)
    tl.store(DQ + q_base + q_tile, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# fmt: off
@triton.jit
def _gca_bwd_dkdv(
    Q, K, V, W, DO, LSE, DROW, OFFS, ENT, DK, DV,
    T, M, NQ, NCH, HQ, H, HR, R_STEP, NSLOT, TPAD, CS, D, G, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: on
    jc = tl.program_id(0)  # memory chunk
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hk = bh % H
    r = hk * R_STEP

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    in_chunk = rows < CS
    d_ok = cols < D
    kv_mask = in_chunk[:, None] & d_ok[None, :]
    q_tile = rows[:, None] * (HQ * D) + cols[None, :]
    kv_tile = rows[:, None] * (H * D) + cols[None, :]
    kv_base = ((b * M + jc * CS) * H + hk) * D
    kt = tl.load(K + kv_base + kv_tile, mask=kv_mask, other=0.0)
    vt = tl.load(V + kv_base + kv_tile, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    key = (b * HR + r) * NCH + jc
    start = tl.load(OFFS + key)
    end = tl.load(OFFS + key + 1)
    for e in range(start, end):
        code = tl.load(ENT + e)  # query chunk * NSLOT + slot
        c = code // NSLOT
        kk = code % NSLOT
        w = tl.load(W + ((b * NQ + c) * HR + r) * NSLOT + kk).to(tl.float32)
        t = c * CS + rows
        row_ok = in_chunk & (t < T)
        q_mask = row_ok[:, None] & d_ok[None, :]
        for g in range(G):
            h = hk * G + g
            q_base = (b * T + c * CS) * HQ * D + h * D
            q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)
            do = tl.load(DO + q_base + q_tile, mask=q_mask, other=0.0)
            row_base = ((b * HQ + h) * NSLOT + kk) * TPAD + c * CS
            lse = tl.load(LSE + row_base + rows, mask=in_chunk, other=0.0)
            drow = tl.load(DROW + row_base + rows, mask=in_chunk, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & in_chunk[None, :], p * w, 0.0)  # w * p
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
            ds = p * (dp - drow[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    tl.store(DK + kv_base + kv_tile, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_base + kv_tile, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ---- decode ------------------------------------------------------------------------------------


# the queries of the current chunk (1 to the chunk size) and the number of memory chunks change
# as generation goes on: not specialized on (Triton would compile a variant for each value that
# is 1 or divisible by 16, met one after another inside a generation loop)
# fmt: off
@triton.jit(do_not_specialize=("TQ", "M"))
def _gca_decode(
    Q, K, V, IDX, W, OUT,
    TQ, M, HQ, H, HR, R_STEP, NSLOT, CS, D, G, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: on
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    hk = bh % H
    r = hk * R_STEP

    # Rows: the G query heads of kv head hk x the TQ queries, so each chunk is read once.
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < G * TQ
    h = hk * G + i // TQ
    tq = i % TQ
    cols = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok = cols < D
    n_ok = n < CS
    q_mask = row_ok[:, None] & d_ok[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    q_base = b * TQ * HQ * D
    q_tile = (tq[:, None] * HQ + h[:, None]) * D + cols[None, :]
    kv_tile = n[:, None] * (H * D) + cols[None, :]
    q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sel = (b * HR + r) * NSLOT
    for kk in range(NSLOT):
        j = tl.load(IDX + sel + kk)
        if j >= 0:
            w = tl.load(W + sel + kk).to(tl.float32)
            kv_base = ((b * M + j * CS) * H + hk) * D
            kt = tl.load(K + kv_base + kv_tile, mask=kv_mask, other=0.0)
            vt = tl.load(V + kv_base + kv_tile, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            den = tl.sum(p, axis=1)
            o = tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            acc += o * (w / den)[:, None]
    tl.store(OUT + q_base + q_tile, acc.to(OUT.dtype.element_ty), mask=q_mask)


# ---- host side ---------------------------------------------------------------------------------


def unsupported_reason(chunk_size: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run these sizes (None if they can). A chunk is one tile, so its
    tiles must fit the registers and shared memory of one program: chunk_size <= 128 and
    chunk_size x head_dim (padded to powers of two) <= 128 x 128 (half that for fp32)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel supports float16, bfloat16 and float32, got {dtype}"
    block_m, block_d = _block_sizes(chunk_size, head_dim)
    limit = 128 * 128 // (2 if dtype == torch.float32 else 1)
    if block_m > 128 or block_m * block_d > limit:
        return (
            f"the Triton kernel holds a chunk in one tile: it needs chunk_size <= 128 and "
            f"chunk_size x head_dim (rounded up to powers of two) <= {limit}, got "
            f"chunk_size={chunk_size}, head_dim={head_dim} ({dtype})"
        )
    return None


def _check_supported(chunk_size: int, head_dim: int, dtype: torch.dtype, op: str) -> None:
    reason = unsupported_reason(chunk_size, head_dim, dtype)
    if reason is not None:
        raise ValueError(f"{op}: {reason}; use impl='reference'")


def _inverse_lists(idx: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (batch, retrieval row, memory chunk) the (query chunk, slot) pairs naming it.

    Returns offsets [B * Hr * n_chunks + 1] and entries (query chunk * K + slot), grouped by
    that key in (query chunk, slot) order. Built on the device without a host sync: empty
    slots get a key past the last one, so they sort to the end and no list covers them.
    """
    B, NQ, HR, NSLOT = idx.shape
    dev = idx.device
    n_keys = B * HR * n_chunks
    bi = torch.arange(B, device=dev).view(B, 1, 1, 1)
    ri = torch.arange(HR, device=dev).view(1, 1, HR, 1)
    key = (bi * HR + ri) * n_chunks + idx.long()
    key = torch.where(idx >= 0, key, n_keys).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    code = torch.arange(NQ * NSLOT, device=dev, dtype=torch.int32).view(1, NQ, 1, NSLOT)
    entries = code.expand(B, NQ, HR, NSLOT).flatten()[order].contiguous()
    bounds = torch.arange(n_keys + 1, device=dev, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    return offsets, entries


class _GCAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, weights, chunk_size, scale):
        q, k, v, weights = (t.contiguous() for t in (q, k, v, weights))
        idx = indices.to(torch.int32).contiguous()
        B, T, HQ, D = q.shape
        M, H = k.shape[1], k.shape[2]
        NQ, HR, NSLOT = idx.shape[1:]
        cs = chunk_size
        o = _new_output(q.shape, dtype=q.dtype, device=q.device)
        lse = None
        if M == 0 or NSLOT == 0:  # nothing can be retrieved: every slot is empty
            o.zero_()
        else:
            lse = torch.empty(B, HQ, NSLOT, NQ * cs, dtype=torch.float32, device=q.device)
            block_m, block_d = _block_sizes(cs, D)
            _gca_fwd[(NQ, B * HQ)](
                q, k, v, idx, weights, o, lse,
                T, M, NQ, HQ, H, HR, int(HR > 1), NSLOT, NQ * cs, cs, D, HQ // H,
                scale * LOG2E,
                BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype),
                **_launch_config(block_m, block_d, q.dtype),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, idx, weights, lse)
        ctx.chunk_size, ctx.scale = cs, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, idx, weights, lse = ctx.saved_tensors
        cs, scale = ctx.chunk_size, ctx.scale
        B, T, HQ, D = q.shape
        M, H = k.shape[1], k.shape[2]
        NQ, HR, NSLOT = idx.shape[1:]
        G = HQ // H
        if lse is None:
            return (
                torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None,
                torch.zeros_like(weights), None, None,
            )  # fmt: skip
        do = do.contiguous()
        n_chunks = M // cs
        block_m, block_d = _block_sizes(cs, D)
        config = _launch_config(block_m, block_d, q.dtype)
        prec = _dot_precision(q.dtype)
        r_step = int(HR > 1)

        dq = _new_output(q.shape, dtype=q.dtype, device=q.device)
        drow = torch.empty_like(lse)
        dwp = _new_output((B, NQ, HQ, NSLOT), dtype=torch.float32, device=q.device)
        _gca_bwd_dq[(NQ, B * HQ)](
            q, k, v, idx, weights, do, lse, dq, drow, dwp,
            T, M, NQ, HQ, H, HR, r_step, NSLOT, NQ * cs, cs, D, G, scale * LOG2E, scale,
            BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, **config,
        )  # fmt: skip
        # Sum the per-head partials over the heads that share each retrieval row.
        if HR == 1:
            dw = dwp.sum(dim=2, keepdim=True)
        else:
            dw = dwp.view(B, NQ, H, G, NSLOT).sum(dim=3)

        offsets, entries = _inverse_lists(idx, n_chunks)
        dk = _new_output(k.shape, dtype=k.dtype, device=k.device)
        dv = _new_output(v.shape, dtype=v.dtype, device=v.device)
        _gca_bwd_dkdv[(n_chunks, B * H)](
            q, k, v, weights, do, lse, drow, offsets, entries, dk, dv,
            T, M, NQ, n_chunks, HQ, H, HR, r_step, NSLOT, NQ * cs, cs, D, G,
            scale * LOG2E, scale,
            BLOCK_M=block_m, BLOCK_D=block_d, DOT_PREC=prec, **config,
        )  # fmt: skip
        return dq, dk, dv, None, dw.to(weights.dtype), None, None


def gca_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """GCA forward with gradients for q, k, v and weights (inputs already checked by
    `check_gca_inputs`; fp16, bf16 or fp32)."""
    _check_supported(chunk_size, q.shape[-1], q.dtype, "gca_attention")
    return _GCAFunction.apply(q, k, v, indices, weights, int(chunk_size), float(scale))


@torch.no_grad()
def gca_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """GCA for Tq <= chunk_size queries of one query chunk (indices, weights [B, 1, Hr, K]).
    Forward only (no autograd); inputs already checked."""
    _check_supported(chunk_size, q.shape[-1], q.dtype, "gca_decode")
    q, k, v, weights = (t.contiguous() for t in (q, k, v, weights))
    idx = indices.to(torch.int32).contiguous()
    B, TQ, HQ, D = q.shape
    M, H = k.shape[1], k.shape[2]
    HR, NSLOT = idx.shape[2], idx.shape[3]
    G = HQ // H
    o = _new_output(q.shape, dtype=q.dtype, device=q.device)
    if M == 0 or NSLOT == 0:
        return o.zero_()
    block_n, block_d = _block_sizes(chunk_size, D)
    block_m = min(max(16, triton.next_power_of_2(G * TQ)), 64)
    _gca_decode[(B * H, triton.cdiv(G * TQ, block_m))](
        q, k, v, idx, weights, o,
        TQ, M, HQ, H, HR, int(HR > 1), NSLOT, chunk_size, D, G, float(scale) * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype),
        **_launch_config(max(block_m, block_n), block_d, q.dtype),
    )  # fmt: skip
    return o
