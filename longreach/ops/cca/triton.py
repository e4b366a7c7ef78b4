"""Triton kernels for core-context aware attention: pooling, forward, backward and decode.

The math is `reference.py`'s. Query t runs ONE online softmax over the core tokens of groups
0..J(t)-1 and the raw tokens J(t)*g..t, J(t) = max(0, t + 1 - window) // g. A block of queries
[t0, t1] visits only the tiles it needs, and builds a mask only on the tiles where some of its
rows must not see some keys:

    core tiles [0, J(t0))        all visible           core tiles [J(t0), J(t1))  masked
    raw  tiles [J(t0)g, J(t1)g)  masked (lower edge)   raw  tiles [J(t1)g, t0)    all visible
    raw  tiles [t0, t1]          masked (causal edge)

Per query that is about t/g + window keys instead of t + 1. GQA reads each key/value head in
place (no repeated K/V). Core tokens are one per query head (core_heads="query") or per
key/value head ("kv"); they are pooled by `_pool_fwd` (one program per block of groups and
core head) and rounded to the input dtype, as a generation cache stores them.

Backward (FlashAttention-2 style, no atomics, deterministic):
  `_cca_bwd_dq`    per query block, the same tiles as the forward: dq;
  `_cca_bwd_dkdv`  per raw key block: the query rows that see it (t in [j, last(j)]), every
                   query head of the key/value head: dk, dv;
  `_cca_bwd_core`  per core key block: the rows t >= (n+1)g + window - 1 that see it: d(core);
  `_pool_bwd`      per block of groups and key/value head: d(core) through the pooling
                   softmax into dk, dv of the group's tokens and dq of its last query.
Decode (`cca_decode_triton`) splits the [core ; raw] cache across programs (split-K) and merges
the partial softmaxes; each program serves every query head that reads one core head.

Softmax statistics are kept in base 2 (exp2, log2): scores are multiplied by scale * log2(e).
fp32 inputs run their dot products in IEEE fp32 (no TF32); bf16/fp16 inputs accumulate in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from longreach.ops.backend import interpreting

from .reference import core_count

LOG2E = 1.4426950408889634
# the decode kernel holds (query heads per core head) x (new queries) rows in one tile
DECODE_MAX_ROWS = 128
NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: a row with no visible key yet stays NaN-free


@triton.jit
def _core_count(t, WINDOW, GROUP):
    return tl.maximum(t + 1 - WINDOW, 0) // GROUP


# ---- pooling -----------------------------------------------------------------------------------


@triton.jit
def _pool_fwd(
    Q, K, V, CK, CV,
    sqb, sqt, sqh, skb, skt, skh, scb, scn, sch,
    N, HC, GQ, D, sm_scale,
    GROUP: tl.constexpr, QPC: tl.constexpr,
    BLOCK_G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HC
    hc = pid_bh % HC
    hk = (hc * QPC) // GQ
    offs_m = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    j_ok = offs_j < GROUP
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * sqb
    qv = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(QPC):
        q_ptr = q_base + (offs_m * GROUP + GROUP - 1)[:, None] * sqt + (hc * QPC + i) * sqh
        qv += tl.load(q_ptr + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(
            tl.float32
        )
    qv = qv / QPC
    rows = offs_m[:, None] * GROUP + offs_j[None, :]
    mask3 = (m_ok[:, None] & j_ok[None, :])[:, :, None] & d_ok[None, None, :]
    kv_off = b.to(tl.int64) * skb + hk * skh + rows[:, :, None] * skt + offs_d[None, None, :]
    kt = tl.load(K + kv_off, mask=mask3, other=0.0).to(tl.float32)
    s = tl.sum(qv[:, None, :] * kt, axis=2) * sm_scale
    s = tl.where(j_ok[None, :], s, float("-inf"))
    s = s - tl.max(s, axis=1)[:, None]
    a = tl.exp(s)
    a = a / tl.sum(a, axis=1)[:, None]
    ck = tl.sum(a[:, :, None] * kt, axis=1)
    vt = tl.load(V + kv_off, mask=mask3, other=0.0).to(tl.float32)
    cv = tl.sum(a[:, :, None] * vt, axis=1)
    c_off = b.to(tl.int64) * scb + hc * sch + offs_m[:, None] * scn + offs_d[None, :]
    c_mask = m_ok[:, None] & d_ok[None, :]
    tl.store(CK + c_off, ck.to(CK.dtype.element_ty), mask=c_mask)
    tl.store(CV + c_off, cv.to(CV.dtype.element_ty), mask=c_mask)


@triton.jit
def _pool_bwd(
    Q, K, V, DCK, DCV, DQ, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, scb, scn, sch,
    N, H, GQ, D, sm_scale,
    GROUP: tl.constexpr, QPC: tl.constexpr, CPK: tl.constexpr,
    BLOCK_G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Adds the pooling's gradient to dk, dv (the groups' tokens) and dq (their last queries).

    One program per block of groups and key/value head hk; it handles every core head reading
    hk (CPK of them), so each dk/dv/dq element has exactly one writer. DQ, DK, DV are float32
    buffers with the same strides as Q and K.
    """
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    hk = pid_bh % H
    offs_m = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    j_ok = offs_j < GROUP
    d_ok = offs_d < D
    rows = offs_m[:, None] * GROUP + offs_j[None, :]
    mask3 = (m_ok[:, None] & j_ok[None, :])[:, :, None] & d_ok[None, None, :]
    kv_off = b.to(tl.int64) * skb + hk * skh + rows[:, :, None] * skt + offs_d[None, None, :]
    kt = tl.load(K + kv_off, mask=mask3, other=0.0).to(tl.float32)
    vt = tl.load(V + kv_off, mask=mask3, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_G, G_PAD, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_G, G_PAD, BLOCK_D], dtype=tl.float32)
    c_mask = m_ok[:, None] & d_ok[None, :]
    q_rows = (offs_m * GROUP + GROUP - 1)[:, None] * sqt + offs_d[None, :]
    for c in tl.static_range(CPK):
        hc = hk * CPK + c
        qv = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(QPC):
            q_ptr = Q + b.to(tl.int64) * sqb + (hc * QPC + i) * sqh + q_rows
            qv += tl.load(q_ptr, mask=c_mask, other=0.0).to(tl.float32)
        qv = qv / QPC
        s = tl.sum(qv[:, None, :] * kt, axis=2) * sm_scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        s = s - tl.max(s, axis=1)[:, None]
        a = tl.exp(s)
        a = a / tl.sum(a, axis=1)[:, None]
        c_off = b.to(tl.int64) * scb + hc * sch + offs_m[:, None] * scn + offs_d[None, :]
        dck = tl.load(DCK + c_off, mask=c_mask, other=0.0)
        dcv = tl.load(DCV + c_off, mask=c_mask, other=0.0)
        dv += a[:, :, None] * dcv[:, None, :]
        da = tl.sum(kt * dck[:, None, :], axis=2) + tl.sum(vt * dcv[:, None, :], axis=2)
        ds = a * (da - tl.sum(a * da, axis=1)[:, None])
        dk += a[:, :, None] * dck[:, None, :] + sm_scale * ds[:, :, None] * qv[:, None, :]
        dq_pool = sm_scale * tl.sum(ds[:, :, None] * kt, axis=1) / QPC
        for i in tl.static_range(QPC):
            dq_ptr = DQ + b.to(tl.int64) * sqb + (hc * QPC + i) * sqh + q_rows
            tl.store(dq_ptr, tl.load(dq_ptr, mask=c_mask, other=0.0) + dq_pool, mask=c_mask)
    dk_ptr = DK + kv_off
    dv_ptr = DV + kv_off
    tl.store(dk_ptr, tl.load(dk_ptr, mask=mask3, other=0.0) + dk, mask=mask3)
    tl.store(dv_ptr, tl.load(dv_ptr, mask=mask3, other=0.0) + dv, mask=mask3)


# ---- forward -----------------------------------------------------------------------------------


@triton.jit
def _fwd_range(
    acc, m_i, l_i, q, k_base, v_base, stride_n, lo, hi, offs_m, j_row, offs_d, D, GROUP,
    qk_scale,
    CORE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        ptr_off = cols[:, None] * stride_n + offs_d[None, :]
        if MASKED:
            ld_mask = (cols < hi)[:, None] & (offs_d < D)[None, :]
            k = tl.load(k_base + ptr_off, mask=ld_mask, other=0.0)
            v = tl.load(v_base + ptr_off, mask=ld_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_base + ptr_off)
            v = tl.load(v_base + ptr_off)
        else:
            k = tl.load(k_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
            v = tl.load(v_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            if CORE:
                vis = cols[None, :] < j_row[:, None]
            else:
                vis = (cols[None, :] >= j_row[:, None] * GROUP) & (cols[None, :] <= offs_m[:, None])
            vis = vis & (cols < hi)[None, :]
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _cca_fwd(
    Q, K, V, CK, CV, OUT, LSE,
    sqb, sqt, sqh, skb, skt, skh, scb, scn, sch,
    T, HQ, GQ, CQ, D, WINDOW, GROUP, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # a 1-D grid (no 65535 limit), head-major so that concurrent programs share one head's
    # core tokens in L2; within a head the later query blocks (more core tokens) start first
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid_m = n_blocks - 1 - tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GQ
    hc = h // CQ
    t0 = pid_m * BLOCK_M
    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_off = b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    io_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + q_off, mask=io_mask, other=0.0)

    t_last = tl.minimum(t0 + BLOCK_M, T) - 1
    j0 = _core_count(t0, WINDOW, GROUP)
    j1 = _core_count(t_last, WINDOW, GROUP)
    j_row = _core_count(offs_m, WINDOW, GROUP)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    ck_base = CK + b.to(tl.int64) * scb + hc * sch
    cv_base = CV + b.to(tl.int64) * scb + hc * sch
    n_full = (j0 // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, ck_base, cv_base, scn, 0, n_full, offs_m, j_row,
                               offs_d, D, GROUP, qk_scale, True, False, BLOCK_N, EVEN_D, PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, ck_base, cv_base, scn, n_full, j1, offs_m, j_row,
                               offs_d, D, GROUP, qk_scale, True, True, BLOCK_N, EVEN_D, PRECISION)

    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * skb + hk * skh
    lo = j0 * GROUP
    mid_lo = j1 * GROUP
    mid_hi = mid_lo + (tl.maximum(t0 - mid_lo, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, skt, lo, mid_lo, offs_m, j_row,
                               offs_d, D, GROUP, qk_scale, False, True, BLOCK_N, EVEN_D, PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, skt, mid_lo, mid_hi, offs_m,
                               j_row, offs_d, D, GROUP, qk_scale, False, False, BLOCK_N, EVEN_D,
                               PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, skt, mid_hi, t_last + 1, offs_m,
                               j_row, offs_d, D, GROUP, qk_scale, False, True, BLOCK_N, EVEN_D,
                               PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=io_mask)
    # LSE is [B, HQ, T] contiguous, in log2 units
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


# ---- backward ----------------------------------------------------------------------------------


@triton.jit
def _dq_range(
    dq, q, do, lse, delta, k_base, v_base, stride_n, lo, hi, offs_m, j_row, offs_d, D, GROUP,
    qk_scale,
    CORE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        ptr_off = cols[:, None] * stride_n + offs_d[None, :]
        if MASKED:
            ld_mask = (cols < hi)[:, None] & (offs_d < D)[None, :]
            k = tl.load(k_base + ptr_off, mask=ld_mask, other=0.0)
            v = tl.load(v_base + ptr_off, mask=ld_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_base + ptr_off)
            v = tl.load(v_base + ptr_off)
        else:
            k = tl.load(k_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
            v = tl.load(v_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            if CORE:
                vis = cols[None, :] < j_row[:, None]
            else:
                vis = (cols[None, :] >= j_row[:, None] * GROUP) & (cols[None, :] <= offs_m[:, None])
            vis = vis & (cols < hi)[None, :]
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _cca_bwd_dq(
    Q, K, V, CK, CV, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, skb, skt, skh, scb, scn, sch,
    T, HQ, GQ, CQ, D, WINDOW, GROUP, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # a 1-D grid (no 65535 limit), head-major so that concurrent programs share one head's
    # core tokens in L2; within a head the later query blocks (more core tokens) start first
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid_m = n_blocks - 1 - tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GQ
    hc = h // CQ
    t0 = pid_m * BLOCK_M
    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_off = b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    io_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + q_off, mask=io_mask, other=0.0)
    do = tl.load(DO + q_off, mask=io_mask, other=0.0)
    stat_off = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(LSE + stat_off, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stat_off, mask=row_ok, other=0.0)

    t_last = tl.minimum(t0 + BLOCK_M, T) - 1
    j0 = _core_count(t0, WINDOW, GROUP)
    j1 = _core_count(t_last, WINDOW, GROUP)
    j_row = _core_count(offs_m, WINDOW, GROUP)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    ck_base = CK + b.to(tl.int64) * scb + hc * sch
    cv_base = CV + b.to(tl.int64) * scb + hc * sch
    n_full = (j0 // BLOCK_N) * BLOCK_N
    dq = _dq_range(dq, q, do, lse, delta, ck_base, cv_base, scn, 0, n_full, offs_m, j_row, offs_d,
                   D, GROUP, qk_scale, True, False, BLOCK_N, EVEN_D, PRECISION)
    dq = _dq_range(dq, q, do, lse, delta, ck_base, cv_base, scn, n_full, j1, offs_m, j_row, offs_d,
                   D, GROUP, qk_scale, True, True, BLOCK_N, EVEN_D, PRECISION)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * skb + hk * skh
    lo = j0 * GROUP
    mid_lo = j1 * GROUP
    mid_hi = mid_lo + (tl.maximum(t0 - mid_lo, 0) // BLOCK_N) * BLOCK_N
    dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, skt, lo, mid_lo, offs_m, j_row, offs_d,
                   D, GROUP, qk_scale, False, True, BLOCK_N, EVEN_D, PRECISION)
    dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, skt, mid_lo, mid_hi, offs_m, j_row,
                   offs_d, D, GROUP, qk_scale, False, False, BLOCK_N, EVEN_D, PRECISION)
    dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, skt, mid_hi, t_last + 1, offs_m, j_row,
                   offs_d, D, GROUP, qk_scale, False, True, BLOCK_N, EVEN_D, PRECISION)
    tl.store(DQ + q_off, dq * sm_scale, mask=io_mask)


@triton.jit
def _dkdv_range(
    dk, dv, k, v, q_base, do_base, stat_base, stride_t, lo, hi, offs_n, offs_d, D, WINDOW, GROUP,
    qk_scale,
    CORE: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, LSE, DELTA,
):
    """Accumulates one query head's contribution to a block of keys over query rows [lo, hi)."""
    offs = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs
        ptr_off = rows[:, None] * stride_t + offs_d[None, :]
        if MASKED:
            ld_mask = (rows < hi)[:, None] & (offs_d < D)[None, :]
            q = tl.load(q_base + ptr_off, mask=ld_mask, other=0.0)
            do = tl.load(do_base + ptr_off, mask=ld_mask, other=0.0)
            lse = tl.load(LSE + stat_base + rows, mask=rows < hi, other=0.0)
            delta = tl.load(DELTA + stat_base + rows, mask=rows < hi, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_base + ptr_off)
                do = tl.load(do_base + ptr_off)
            else:
                q = tl.load(q_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
                do = tl.load(do_base + ptr_off, mask=(offs_d < D)[None, :], other=0.0)
            lse = tl.load(LSE + stat_base + rows)
            delta = tl.load(DELTA + stat_base + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :])
        if MASKED:
            j_row = _core_count(rows, WINDOW, GROUP)
            if CORE:
                vis = offs_n[:, None] < j_row[None, :]
            else:
                vis = (offs_n[:, None] >= j_row[None, :] * GROUP) & (offs_n[:, None] <= rows[None, :])
            vis = vis & (rows < hi)[None, :]
            p_t = tl.where(vis, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _cca_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh,
    T, HQ, H, GQ, D, WINDOW, GROUP, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of the raw keys [j0, j0 + BLOCK_N) of one key/value head (float32 outputs)."""
    n_blocks = tl.cdiv(T, BLOCK_N)  # 1-D grid, head-major (one head's queries stay in L2)
    pid_n = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // H
    hk = pid_bh % H
    j0 = pid_n * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = b.to(tl.int64) * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
    kv_mask = (offs_n < T)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    j1 = tl.minimum(j0 + BLOCK_N, T)
    # query t sees raw key j iff j <= t <= last(j), last(j) = (j // g + 1) * g + window - 2
    q_hi = tl.minimum(T, ((j1 - 1) // GROUP + 1) * GROUP + WINDOW - 1)
    a_end = tl.minimum(j0 + BLOCK_N, q_hi)
    full_end = tl.minimum((j0 // GROUP + 1) * GROUP + WINDOW - 1, q_hi)
    b_end = a_end + (tl.maximum(full_end - a_end, 0) // BLOCK_M) * BLOCK_M
    for i in range(GQ):
        h = hk * GQ + i
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sqb + h * sqh
        stat_base = (b * HQ + h).to(tl.int64) * T
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, j0, a_end, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, False, True, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, a_end, b_end, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, False, False, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, b_end, q_hi, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, False, True, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
    tl.store(DK + kv_off, dk * sm_scale, mask=kv_mask)
    tl.store(DV + kv_off, dv, mask=kv_mask)


@triton.jit
def _cca_bwd_core(
    Q, CK, CV, DO, LSE, DELTA, DCK, DCV,
    sqb, sqt, sqh, scb, scn, sch,
    T, N, HQ, HC, CQ, D, WINDOW, GROUP, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(core k), d(core v) of core tokens [n0, n0 + BLOCK_N) of one core head (float32)."""
    # 1-D grid, head-major (one head's queries stay in L2); the first core blocks, seen by the
    # most queries, start first
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // HC
    hc = pid_bh % HC
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c_off = b.to(tl.int64) * scb + hc * sch + offs_n[:, None] * scn + offs_d[None, :]
    c_mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    k = tl.load(CK + c_off, mask=c_mask, other=0.0)
    v = tl.load(CV + c_off, mask=c_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n1 = tl.minimum(n0 + BLOCK_N, N)
    # query t sees core token n iff J(t) > n, i.e. t >= (n + 1) * g + window - 1
    lo = tl.minimum((n0 + 1) * GROUP + WINDOW - 1, T)
    a_end = tl.minimum(n1 * GROUP + WINDOW - 1, T)
    b_end = a_end + ((T - a_end) // BLOCK_M) * BLOCK_M
    for i in range(CQ):
        h = hc * CQ + i
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sqb + h * sqh
        stat_base = (b * HQ + h).to(tl.int64) * T
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, lo, a_end, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, True, True, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, a_end, b_end, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, True, False, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, stat_base, sqt, b_end, T, offs_n,
                             offs_d, D, WINDOW, GROUP, qk_scale, True, True, BLOCK_M, EVEN_D,
                             PRECISION, LSE, DELTA)
    tl.store(DCK + c_off, dk * sm_scale, mask=c_mask)
    tl.store(DCV + c_off, dv, mask=c_mask)


# ---- decode ------------------------------------------------------------------------------------


# the arguments that change from one decoded token to the next (the cache's lengths, its start,
# the split size and count, the batch strides of growing buffers) are not specialized on: by
# default Triton compiles a variant for each value that is 1 or divisible by 16, so a decode
# loop would meet new variants (a compile each) as the cache grows
DECODE_VARYING = ("skb", "scb", "N", "R", "raw_start", "p_first", "split_len", "NS")


@triton.jit(do_not_specialize=DECODE_VARYING)
def _cca_decode(
    Q, K, V, CK, CV, ACC, M, L,
    sqb, sqt, sqh, skb, skt, skh, scb, scn, sch,
    TQ, N, R, raw_start, p_first, HQ, HC, GQ, CQ, D, WINDOW, GROUP, qk_scale, split_len, NS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One split of the virtual key list [core 0..N-1 ; raw 0..R-1] for the queries of one core
    head: rows are (query head i, query qi), row = i * TQ + qi. Writes unnormalized partials."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HC
    hc = pid_bh % HC
    rows = tl.arange(0, BLOCK_M)
    head = hc * CQ + rows // TQ
    qi = rows % TQ
    row_ok = rows < CQ * TQ
    hk = (hc * CQ) // GQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_off = b.to(tl.int64) * sqb + qi[:, None] * sqt + head[:, None] * sqh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos = p_first + qi
    j_row = _core_count(pos, WINDOW, GROUP)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    s_lo = pid_s * split_len
    s_hi = tl.minimum(s_lo + split_len, N + R)
    for start in range(s_lo, s_hi, BLOCK_N):
        cols = start + offs_n
        is_core = cols < N
        core_row = tl.where(is_core, cols, 0)
        raw_row = tl.where(is_core, 0, cols - N)
        c_ptr = b.to(tl.int64) * scb + hc * sch + core_row[:, None] * scn + offs_d[None, :]
        r_ptr = b.to(tl.int64) * skb + hk * skh + raw_row[:, None] * skt + offs_d[None, :]
        in_split = (cols < s_hi)[:, None] & d_ok[None, :]
        c_mask = in_split & is_core[:, None]
        r_mask = in_split & (~is_core)[:, None]
        k = tl.load(CK + c_ptr, mask=c_mask, other=0.0) + tl.load(K + r_ptr, mask=r_mask, other=0.0)
        v = tl.load(CV + c_ptr, mask=c_mask, other=0.0) + tl.load(V + r_ptr, mask=r_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        key_pos = raw_start + cols - N
        vis_core = is_core[None, :] & (cols[None, :] < j_row[:, None])
        vis_raw = (~is_core)[None, :] & (key_pos[None, :] >= j_row[:, None] * GROUP) & (
            key_pos[None, :] <= pos[:, None]
        )
        vis = (vis_core | vis_raw) & (cols < s_hi)[None, :]
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # partials are [B, HQ, TQ, NS] (+ [D] for ACC), contiguous
    stat = ((b * HQ + head).to(tl.int64) * TQ + qi) * NS + pid_s
    tl.store(M + stat, m_i, mask=row_ok)
    tl.store(L + stat, l_i, mask=row_ok)
    tl.store(ACC + stat[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=("NS",))
def _decode_merge(ACC, M, L, OUT, sob, sot, soh, TQ, HQ, NS, D,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merges the NS partial softmaxes of one (batch, head, query) row: one launch, no sync."""
    row = tl.program_id(0)  # (b * HQ + h) * TQ + qi
    qi = row % TQ
    h = (row // TQ) % HQ
    b = row // (TQ * HQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NS
    m = tl.load(M + row * NS + offs_s, mask=s_ok, other=float("-inf"))
    l_ = tl.load(L + row * NS + offs_s, mask=s_ok, other=0.0)
    w = tl.math.exp2(m - tl.max(m, axis=0))
    acc = tl.load(ACC + (row * NS + offs_s)[:, None] * D + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
    tl.store(OUT + b.to(tl.int64) * sob + qi * sot + h * soh + offs_d,
             out.to(OUT.dtype.element_ty), mask=offs_d < D)


# ---- launchers ---------------------------------------------------------------------------------


def _empty(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests fill them with NaN instead). A
    buffer of ``like``'s shape gets its strides too (the kernels index o, dq with q's strides
    and dk, dv with k's; ``like`` is dense, as `_dense` makes it)."""
    if tuple(shape) == tuple(like.shape):
        return torch.empty_like(like, dtype=dtype or like.dtype)
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_config(block_d: int, dtype: torch.dtype) -> dict:
    """Per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages): a plain function of the head size
    (no autotuning: the interpreter cannot run it, and every shape would pay its search)."""
    if interpreting():
        return dict(fwd=(32, 16, 4, 1), dq=(32, 16, 4, 1), dkdv=(16, 32, 4, 1))
    if dtype == torch.float32:
        return dict(fwd=(64, 32, 4, 2), dq=(64, 32, 4, 2), dkdv=(32, 64, 4, 2))
    if block_d <= 64:
        return dict(fwd=(128, 64, 4, 3), dq=(128, 64, 4, 3), dkdv=(64, 128, 4, 3))
    return dict(fwd=(128, 64, 8, 3), dq=(128, 32, 8, 3), dkdv=(32, 128, 8, 3))


def _heads(q, k, core_heads):
    HQ, H = q.shape[2], k.shape[2]
    GQ = HQ // H
    HC = HQ if core_heads == "query" else H
    return HQ, H, GQ, HC, HQ // HC


def _pool_block(group: int, block_d: int) -> tuple[int, int]:
    g_pad = triton.next_power_of_2(group)
    return max(1, 2048 // (g_pad * block_d)), g_pad


def cca_pool_triton(q, k, v, *, group_size, scale, core_heads="query", n_groups=None):
    """Core tokens of groups 0..n-1 (q holds the queries of all tokens); [B, n, Hc, D]."""
    B, S, HQ, D = q.shape
    _, H, GQ, HC, QPC = _heads(q, k, core_heads)
    N = S // group_size if n_groups is None else n_groups
    ck = _empty((B, max(N, 1), HC, D), like=k)
    cv = _empty(ck.shape, like=k)
    if N > 0:
        block_d = _pow2(D, 1)
        block_g, g_pad = _pool_block(group_size, block_d)
        grid = (triton.cdiv(N, block_g), B * HC)
        _pool_fwd[grid](
            q, k, v, ck, cv, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), ck.stride(0), ck.stride(1), ck.stride(2), N, HC, GQ, D, scale,
            GROUP=group_size, QPC=QPC, BLOCK_G=block_g, G_PAD=g_pad, BLOCK_D=block_d,
            num_warps=4,
        )
    return ck[:, :N], cv[:, :N]


def _is_dense(t: torch.Tensor) -> bool:
    """Unit stride in the head dim and non-overlapping, dense storage in some dimension order
    (a transposed view of a contiguous tensor is; a slice of a fused projection is not): a
    buffer made like it has its strides."""
    return t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride()


def _dense(q, k, v):
    """q, k, v as the kernels read them, copied only where needed: the kernels take one set of
    strides for q (and o, do, dq) and one for k and v (and dk, dv), so the HF plug-in's
    transposed [B, H, T, D] views are read in place."""
    q = q if _is_dense(q) else q.contiguous()
    if not (_is_dense(k) and k.stride() == v.stride()):
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


class _CCAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group_size, window, scale, core_heads):
        q, k, v = _dense(q, k, v)
        B, T, HQ, D = q.shape
        _, H, GQ, HC, CQ = _heads(q, k, core_heads)
        N = core_count(T - 1, group_size=group_size, window=window)
        ck, cv = cca_pool_triton(q, k, v, group_size=group_size, scale=scale,
                                 core_heads=core_heads, n_groups=N)
        if N == 0:  # a valid pointer for the kernels (never read)
            ck = cv = k.new_zeros(B, 1, HC, D)
        block_d = _pow2(D)
        block_m, block_n, warps, stages = _attention_config(block_d, q.dtype)["fwd"]
        o = _empty(q.shape, like=q)
        lse = _empty((B, HQ, T), like=q, dtype=torch.float32)
        grid = (B * HQ * triton.cdiv(T, block_m),)
        _cca_fwd[grid](
            q, k, v, ck, cv, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            ck.stride(0), ck.stride(1), ck.stride(2),
            T, HQ, GQ, CQ, D, window, group_size, scale * LOG2E,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == D,
            PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
        )
        ctx.save_for_backward(q, k, v, ck, cv, o, lse)
        ctx.settings = (group_size, window, scale, core_heads, N)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, ck, cv, o, lse = ctx.saved_tensors
        group_size, window, scale, core_heads, N = ctx.settings
        if do.stride() != q.stride():  # do is read with q's strides
            do = torch.empty_like(q, dtype=do.dtype).copy_(do)
        B, T, HQ, D = q.shape
        _, H, GQ, HC, CQ = _heads(q, k, core_heads)
        block_d = _pow2(D)
        cfg = _attention_config(block_d, q.dtype)
        precision = _precision(q.dtype)
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, HQ, T]
        dq = _empty(q.shape, like=q, dtype=torch.float32)
        dk = _empty(k.shape, like=k, dtype=torch.float32)
        dv = _empty(k.shape, like=k, dtype=torch.float32)
        common = dict(BLOCK_D=block_d, EVEN_D=block_d == D, PRECISION=precision)
        qk_scale = scale * LOG2E
        block_m, block_n, warps, stages = cfg["dq"]
        _cca_bwd_dq[(B * HQ * triton.cdiv(T, block_m),)](
            q, k, v, ck, cv, do, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            ck.stride(0), ck.stride(1), ck.stride(2),
            T, HQ, GQ, CQ, D, window, group_size, qk_scale, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
        )
        block_m, block_n, warps, stages = cfg["dkdv"]
        _cca_bwd_dkdv[(B * H * triton.cdiv(T, block_n),)](
            q, k, v, do, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            T, HQ, H, GQ, D, window, group_size, qk_scale, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
        )
        if N > 0:
            dck = _empty(ck.shape, like=q, dtype=torch.float32)
            dcv = _empty(ck.shape, like=q, dtype=torch.float32)
            _cca_bwd_core[(B * HC * triton.cdiv(N, block_n),)](
                q, ck, cv, do, lse, delta, dck, dcv,
                q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
                T, N, HQ, HC, CQ, D, window, group_size, qk_scale, scale,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
            )
            block_dp = _pow2(D, 1)
            block_g, g_pad = _pool_block(group_size, block_dp)
            _pool_bwd[(triton.cdiv(N, block_g), B * H)](
                q, k, v, dck, dcv, dq, dk, dv,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                dck.stride(0), dck.stride(1), dck.stride(2),
                N, H, GQ, D, scale,
                GROUP=group_size, QPC=HQ // HC, CPK=HC // H, BLOCK_G=block_g, G_PAD=g_pad,
                BLOCK_D=block_dp, num_warps=4,
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def cca_attention_triton(q, k, v, *, group_size, window, scale, core_heads="query"):
    """CCA (see `reference.cca_attention_reference`) with the Triton kernels; differentiable."""
    return _CCAFunction.apply(q, k, v, group_size, window, scale, core_heads)


def _strided_pair(k, v):
    if k.stride(-1) == 1 and k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()


def _decode_config(block_d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel."""
    if interpreting():
        return 16, 4, 1
    return (64, 4, 2) if block_d <= 64 else (32, 4, 2)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_splits(keys: int, programs: int, block_n: int, device) -> int:
    if interpreting() or device.type != "cuda":
        target = 2
    else:
        target = 3 * _multiprocessors(device.index or 0)
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(keys, 4 * block_n)))
    return splits


def cca_decode_triton(q, core_k, core_v, raw_k, raw_v, *, raw_start, group_size, window, scale):
    """`reference.cca_decode` with the Triton split-K kernel; inputs already checked."""
    # views into a longer cache are read in place: only the last dim must be dense, and k/v
    # pairs must share strides (the kernel takes one set per pair)
    q = q if q.stride(-1) == 1 else q.contiguous()
    raw_k, raw_v = _strided_pair(raw_k, raw_v)
    B, TQ, HQ, D = q.shape
    R, H = raw_k.shape[1], raw_k.shape[2]
    if core_k is None or core_k.shape[1] == 0:
        N, HC = 0, H
        core_k = core_v = raw_k.new_zeros(B, 1, H, D)
    else:
        core_k, core_v = _strided_pair(core_k, core_v)
        N, HC = core_k.shape[1], core_k.shape[2]
    GQ, CQ = HQ // H, HQ // HC
    block_d = _pow2(D)
    block_m = _pow2(CQ * TQ)  # <= DECODE_MAX_ROWS (the caller's check)
    block_n, warps, stages = _decode_config(block_d)
    keys = N + R
    splits = _decode_splits(keys, B * HC, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
    splits = triton.cdiv(keys, split_len)
    acc = _empty((B, HQ, TQ, splits, D), like=q, dtype=torch.float32)
    m = _empty((B, HQ, TQ, splits), like=q, dtype=torch.float32)
    l_ = _empty(m.shape, like=q, dtype=torch.float32)
    _cca_decode[(splits, B * HC)](
        q, raw_k, raw_v, core_k, core_v, acc, m, l_,
        q.stride(0), q.stride(1), q.stride(2), raw_k.stride(0), raw_k.stride(1),
        raw_k.stride(2), core_k.stride(0), core_k.stride(1), core_k.stride(2),
        TQ, N, R, raw_start, raw_start + R - TQ, HQ, HC, GQ, CQ, D, window, group_size,
        scale * LOG2E, split_len, splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    out = _empty(q.shape, like=q)
    _decode_merge[(B * HQ * TQ,)](
        acc, m, l_, out, out.stride(0), out.stride(1), out.stride(2), TQ, HQ, splits, D,
        BLOCK_S=_pow2(splits, 2), BLOCK_D=block_d, num_warps=4,
    )
    return out


__all__ = ["cca_attention_triton", "cca_decode_triton", "cca_pool_triton"]
