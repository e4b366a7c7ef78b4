"""``longreach bench attention``: the CCA and GCA kernels against their baselines, side by side.

    longreach bench attention --suite cca,decode,gca --out runs/bench/attention.json
    longreach bench attention --suite model
    longreach bench attention --quick --device cpu        # smoke test: tiny shapes

Suites (every comparison is measured in the same run, on the same random bf16 inputs):
  cca     CCA (pooling included) vs SDPA causal (flash) vs FlexAttention with the exact CCA
          mask over [core tokens ; raw tokens] (its core tokens pooled beforehand, not timed),
          forward and forward+backward, batch 1, 32 query heads, d=128, 32 (MHA) or 8 (GQA)
          key/value heads, g=16, window=1024, T in --lengths.
  decode  one decode step at 128K context, GQA 32/8, batch 1 and 8: SDPA over the full cache
          vs `cca_decode` over a CCA cache of the same context (core per query or kv head).
  gca     GCA vs gather-then-SDPA in PyTorch vs FlexAttention sliding-window-512, batch 4,
          T=16K, 12 heads, d=64, top-8 of 64-token chunks, forward and forward+backward.
  model   training tokens/s of the GCA-128M recipe vs a sliding-window model of equal depth
          (its layers + the chunk encoder's) at 16K; Llama-2-7B-shaped prefill (random
          weights) time to first token, SDPA vs `enable_cca`, at --prefill-lengths.

Times are medians of `triton.testing.do_bench` (warm-up 25 ms, rep 100 ms) on CUDA; the
prefill uses CUDA events. Every row also gets its two floors, the FLOP count and the minimum
bytes moved, and the time they allow on a chip with --peak-tflops / --peak-tbps: the row's
"x floor" is measured / that time. On CPU (or with --quick) the shapes are tiny and the
longreach ops run their reference implementations: a smoke test of the code paths whose
times mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from longreach.bench import ATTENTION_SUITES, add_attention_arguments
from longreach.ops.cca import cca_attention, cca_pool, core_count
from longreach.ops.cca import reference as cca_reference
from longreach.ops.gca import gca_attention, gca_attention_reference

# Flash-attention convention: the backward pass does 2.5x the forward's matmul FLOPs.
BACKWARD_FACTOR = 2.5
DTYPE = torch.bfloat16
# which rows each suite's others are compared with (by `Row.kind`), first = "the" baseline
BASELINES = {
    "cca": ("sdpa", "flex"),
    "decode": ("sdpa",),
    "gca": ("gather", "flex"),
    "model": ("swa", "sdpa"),
    "recurrence-op": ("reference",),
    "recurrence-model": ("reference",),
}


# ---------------------------------------------------------------- floors: FLOPs and bytes


def causal_pairs(seq_len: int) -> int:
    """(query, key) pairs causal attention computes: T (T + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def window_pairs(seq_len: int, window: int) -> int:
    """Pairs of causal sliding-window attention (query t sees keys t - window + 1 .. t)."""
    if seq_len <= window:
        return causal_pairs(seq_len)
    return causal_pairs(window) + (seq_len - window) * window


def cca_pairs(seq_len: int, *, group_size: int, window: int) -> int:
    """Keys CCA's queries see, summed over t: J(t) core tokens + the raw tokens J(t) g .. t."""
    t = torch.arange(seq_len, dtype=torch.int64)
    J = core_count(t, group_size=group_size, window=window)
    return int((J + t + 1 - J * group_size).sum())


def attention_flops(pairs: int, *, batch: int, q_heads: int, head_dim: int,
                    backward: bool = False) -> int:
    """Matmul FLOPs of attention over `pairs` (query, key) pairs per head: QK^T and PV, 2 FLOPs
    per multiply-add each, so 4 D per pair; forward+backward is 3.5x that."""
    flops = 4 * batch * q_heads * head_dim * pairs
    return round(flops * (1 + BACKWARD_FACTOR)) if backward else flops


def causal_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                           backward: bool = False) -> int:
    """Causal self-attention: 4 B HQ D T (T + 1) / 2 forward (x3.5 with the backward)."""
    return attention_flops(causal_pairs(seq_len), batch=batch, q_heads=q_heads,
                           head_dim=head_dim, backward=backward)


def window_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                           window: int, backward: bool = False) -> int:
    """Causal sliding-window attention: 4 B HQ D sum_t min(t + 1, window)."""
    return attention_flops(window_pairs(seq_len, window), batch=batch, q_heads=q_heads,
                           head_dim=head_dim, backward=backward)


def cca_pool_flops(batch: int, pool_heads: int, seq_len: int, head_dim: int, *, group_size: int,
                   window: int, backward: bool = False) -> int:
    """Pooling the groups some query sees (J(T - 1) of them), per pooling head: the scores of
    the group's last query against its g keys and the weighted sums of keys and values, 3
    matvecs of 2 g D FLOPs. pool_heads: HQ (core_heads="query") or H ("kv"). Backward: 2x."""
    groups = core_count(seq_len - 1, group_size=group_size, window=window)
    flops = 6 * batch * pool_heads * groups * group_size * head_dim
    return 3 * flops if backward else flops


def cca_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, *,
                        group_size: int, window: int, pool_heads: int | None = None,
                        backward: bool = False) -> int:
    """CCA: 4 B HQ D sum_t (J(t) + t + 1 - J(t) g), plus the pooling when pool_heads is given
    (None: core tokens are inputs, as for FlexAttention with the CCA mask)."""
    flops = attention_flops(
        cca_pairs(seq_len, group_size=group_size, window=window), batch=batch,
        q_heads=q_heads, head_dim=head_dim, backward=backward,
    )
    if pool_heads is not None:
        flops += cca_pool_flops(batch, pool_heads, seq_len, head_dim, group_size=group_size,
                                window=window, backward=backward)
    return flops


def gca_attention_flops(indices: torch.Tensor, *, q_heads: int, kv_heads: int, seq_len: int,
                        chunk_size: int, head_dim: int, backward: bool = False) -> int:
    """GCA: every query of chunk c attends to the chunk_size keys of each non-empty slot of
    its row; 4 D per pair as for attention (the K-way weighted sum, 2 FLOPs per output
    element and slot, is left out). With every slot full: 4 B HQ T K cs D.

    indices: [B, ceil(T / cs), 1 or H, K] (-1 = empty), as `gca_attention` takes them.
    """
    n_chunks = indices.shape[1]
    queries = torch.full((n_chunks,), chunk_size, dtype=torch.int64)
    queries[-1] = seq_len - (n_chunks - 1) * chunk_size  # a partial last chunk
    full_slots = (indices >= 0).sum(dim=3).cpu().to(torch.int64)  # [B, NQ, Hr]
    heads_per_row = q_heads if indices.shape[2] == 1 else q_heads // kv_heads
    pairs = int((full_slots * queries[None, :, None]).sum()) * chunk_size * heads_per_row
    return attention_flops(pairs, batch=1, q_heads=1, head_dim=head_dim, backward=backward)


def min_bytes(*, q_elems: int, kv_elems: int, elem_bytes: int = 2, extra: int = 0,
              backward: bool = False) -> int:
    """Minimum bytes moved: read q, k, v once and write o (q-sized); forward+backward adds
    reading do and writing dq, dk, dv (twice the forward). kv_elems: elements of k (= of v),
    core tokens included where they are read; `extra` bytes (indices, weights) are added as
    they are (twice with the backward: dweights)."""
    fwd = (2 * q_elems + 2 * kv_elems) * elem_bytes + extra
    return 2 * fwd if backward else fwd


def floor_ms(flops: int, nbytes: int, *, peak_flops: float, peak_bytes_per_s: float) -> float:
    """The time the two floors allow: max(flops / peak FLOP/s, bytes / peak bandwidth), in ms."""
    return 1e3 * max(flops / peak_flops, nbytes / peak_bytes_per_s)


# ---------------------------------------------------------------- rows, JSON and tables


@dataclass
class Row:
    suite: str
    case: str  # the shape: rows of one case and pass are compared with each other
    pass_: str  # fwd, fwd+bwd, decode, train step, prefill
    kind: str  # short id the baselines are looked up by
    impl: str  # what ran, in words
    ms: float
    flops: int | None = None
    bytes: int | None = None
    shape: dict = field(default_factory=dict)
    note: str = ""
    tflops: float | None = None
    floor_ms: float | None = None
    x_floor: float | None = None
    speedup: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d["pass"] = d.pop("pass_")
        return d


class Recorder:
    """Collects rows, prints a progress line per row and rewrites the JSON after each one."""

    def __init__(self, out: Path | None, meta: dict, *, peak_flops: float, peak_bw: float,
                 title: str = "bench attention"):
        self.out, self.meta, self.rows = out, meta, []
        self.peak_flops, self.peak_bw, self.title = peak_flops, peak_bw, title

    def add(self, row: Row) -> Row:
        if row.flops is not None and row.bytes is not None:
            row.tflops = row.flops / (row.ms * 1e-3) / 1e12
            row.floor_ms = floor_ms(row.flops, row.bytes, peak_flops=self.peak_flops,
                                    peak_bytes_per_s=self.peak_bw)
            row.x_floor = row.ms / row.floor_ms
        for base in self.rows:
            if (base.suite, base.case, base.pass_) == (row.suite, row.case, row.pass_) and (
                base.kind in BASELINES.get(row.suite, ()) and base.kind != row.kind
            ):
                row.speedup[base.kind] = base.ms / row.ms
        self.rows.append(row)
        vs = "".join(f", {x:.2f}x vs {k}" for k, x in row.speedup.items())
        tf = f", {row.tflops:.1f} TFLOP/s" if row.tflops is not None else ""
        fl = f", {row.x_floor:.2f}x floor" if row.x_floor is not None else ""
        note = f" ({row.note})" if row.note else ""
        print(f"[{row.suite}] {row.case} {row.pass_} {row.impl}: {row.ms:.3f} ms{tf}{fl}{vs}"
              f"{note}", flush=True)
        self.write()
        return row

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.meta, "rows": [r.as_json() for r in self.rows]}
        with tempfile.NamedTemporaryFile(
            "w", dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp", delete=False
        ) as f:
            json.dump(payload, f, indent=2)
        os.replace(f.name, self.out)

    def print_table(self, suite: str, title_note: str = "") -> None:
        from rich.console import Console
        from rich.table import Table

        rows = [r for r in self.rows if r.suite == suite]
        if not rows:
            return
        bases = BASELINES.get(suite, ())
        table = Table(title=f"{self.title}: {suite}{title_note}")
        for name in ("case", "pass", "impl", "ms", "TFLOP/s", "floor ms", "x floor",
                     *(f"vs {b}" for b in bases), "note"):
            table.add_column(name, justify="left" if name in ("case", "pass", "impl", "note")
                             else "right")

        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        for r in rows:
            table.add_row(
                r.case, r.pass_, r.impl, num(r.ms, ".4g"), num(r.tflops, ".1f"),
                num(r.floor_ms, ".4g"), num(r.x_floor, ".2f"),
                *(num(r.speedup.get(b), ".2f") for b in bases), r.note,
            )
        Console(width=200).print(table)


# ---------------------------------------------------------------- timing


class Timer:
    """Median time of fn() in ms: triton's do_bench on CUDA, wall-clock medians elsewhere."""

    def __init__(self, device: torch.device, cpu_repeats: int = 3):
        self.device, self.cpu_repeats = device, cpu_repeats

    def __call__(self, fn, grads=()) -> float:
        grads = list(grads)
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads or None,
                                  return_mode="median"))
        times = []
        for i in range(1 + self.cpu_repeats):  # one warm-up call
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            if i:
                times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)


def _fused_sdpa(device: torch.device):
    """On CUDA, SDPA restricted to its fused kernels (flash, cuDNN, memory-efficient): a shape
    they cannot take fails loudly instead of falling back to the math path (T x T scores:
    slow, or out of memory at 32K and more), which would make a weak baseline."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION])


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _rand(*shape, device, dtype=DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _len_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def parse_lengths(text: str) -> list[int]:
    """'8k,32k,128k' -> [8192, 32768, 131072] (k = 1024, m = 1024^2; plain numbers too)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = {"k": 1024, "m": 1024**2}.get(part[-1], 1)
        digits = part[:-1] if mult > 1 else part
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"bad length {part!r}: use e.g. 8k,32k,131072")
        out.append(int(digits) * mult)
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return out


# ---------------------------------------------------------------- the baselines' attention


def cca_mask_mod(n_core: int, *, group_size: int, window: int):
    """FlexAttention mask over keys [n_core core tokens ; raw tokens 0..T-1] with CCA's exact
    visibility: core token n is visible to query t iff n < J(t); raw token j iff
    J(t) g <= j <= t."""

    def mask_mod(b, h, q_idx, kv_idx):
        J = torch.clamp(q_idx + 1 - window, min=0) // group_size
        raw = kv_idx - n_core
        core_visible = (kv_idx < n_core) & (kv_idx < J)
        raw_visible = (kv_idx >= n_core) & (raw >= J * group_size) & (raw <= q_idx)
        return core_visible | raw_visible

    return mask_mod


def window_mask_mod(window: int):
    """FlexAttention mask of causal sliding-window attention (keys t - window + 1 .. t)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


def gca_gather_sdpa(q, k, v, indices, weights, *, chunk_size: int) -> torch.Tensor:
    """GCA in plain PyTorch the published way: gather the retrieved chunks into a K-times copy
    [B, NQ, K, cs, H, D], run SDPA (non-causal) per (query chunk, slot), sum with the weights.

    Shared retrieval only (indices [B, NQ, 1, K]) and T a multiple of chunk_size; empty slots
    (-1) get weight 0 (a query chunk with only empty slots returns zeros, as the op does).
    """
    B, T, HQ, D = q.shape
    M, H = k.shape[1], k.shape[2]
    cs, NQ, K = chunk_size, indices.shape[1], indices.shape[3]
    if indices.shape[2] != 1 or T != NQ * cs:
        raise ValueError("gca_gather_sdpa: needs shared retrieval and T a multiple of chunk_size")
    slots = indices[:, :, 0]  # [B, NQ, K]
    batch_ids = torch.arange(B, device=q.device)[:, None, None]
    k_g = k.reshape(B, M // cs, cs, H, D)[batch_ids, slots.clamp_min(0)]  # [B, NQ, K, cs, H, D]
    v_g = v.reshape(B, M // cs, cs, H, D)[batch_ids, slots.clamp_min(0)]
    q_g = q.reshape(B, NQ, 1, cs, HQ, D).expand(B, NQ, K, cs, HQ, D)
    out = F.scaled_dot_product_attention(
        q_g.reshape(-1, cs, HQ, D).transpose(1, 2), k_g.reshape(-1, cs, H, D).transpose(1, 2),
        v_g.reshape(-1, cs, H, D).transpose(1, 2), enable_gqa=HQ != H,
    ).reshape(B, NQ, K, HQ, cs, D)
    w = torch.where(slots >= 0, weights[:, :, 0], torch.zeros_like(weights[:, :, 0]))
    out = torch.einsum("bnkhcd,bnk->bnchd", out, w.to(out.dtype))
    return out.reshape(B, T, HQ, D)


def random_gca_indices(batch: int, n_chunks: int, top_k: int, *, device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Causal-ish retrieval [B, NQ, 1, K]: query chunk c gets top_k distinct random chunks < c,
    padded with -1 (empty) when c < top_k."""
    scores = torch.rand(batch, n_chunks, n_chunks, generator=generator)
    past = torch.arange(n_chunks)[None, :] < torch.arange(n_chunks)[:, None]
    scores = scores.masked_fill(~past, -1.0)
    top, idx = scores.topk(min(top_k, n_chunks), dim=-1)
    idx = idx.masked_fill(top < 0, -1)
    if top_k > n_chunks:
        idx = torch.cat([idx, idx.new_full((batch, n_chunks, top_k - n_chunks), -1)], dim=-1)
    return idx[:, :, None].to(device)


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args, device: torch.device, recorder: Recorder):
        self.args, self.device, self.rec = args, device, recorder
        self.tiny = args.quick or device.type != "cuda"
        self.impl = args.impl if args.impl != "auto" else (
            "triton" if device.type == "cuda" else "reference")
        self.time = Timer(device)
        # FlexAttention has no backward on CPU (torch 2.11 - 2.13)
        self.flex_backward = device.type == "cuda"

    # the longreach ops, forced to one implementation; "reference" calls the pure-PyTorch
    # specification (what every kernel matches) directly
    def cca(self, *a, **kw):
        if self.impl == "reference":
            return cca_reference.cca_attention_reference(*a, **kw)
        return cca_attention(*a, impl=self.impl, **kw)

    def cca_decode(self, *a, **kw):
        if self.impl == "reference":
            return cca_reference.cca_decode(*a, **kw)
        from longreach.ops.cca import cca_decode

        return cca_decode(*a, impl=self.impl, **kw)

    def gca(self, *a, **kw):
        if self.impl == "reference":
            return gca_attention_reference(*a, **kw)
        return gca_attention(*a, impl=self.impl, **kw)

    def flex(self):
        """(flex_attention, create_block_mask): compiled afresh on CUDA (call once per shape, so
        recompiles never hit the compile cache's limit), eager (unfused) elsewhere."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.device.type == "cuda":
            torch.compiler.reset()
            return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)
        return flex_attention, create_block_mask

    def add(self, **kw) -> Row:
        return self.rec.add(Row(**kw))

    # ------------------------------------------------------------ cca
    def run_cca(self) -> None:
        B, HQ, D, g, s = 1, 32, 128, 16, 1024
        lengths = parse_lengths(self.args.lengths)
        if self.tiny:
            HQ, D, g, s, lengths = 4, 64, 8, 32, [160]
        dev = self.device
        for T in lengths:
            for label, H in (("MHA", HQ), ("GQA", HQ // 4)):
                case = f"T={_len_label(T)} {label} {HQ}/{H}"
                shape = dict(batch=B, seq_len=T, q_heads=HQ, kv_heads=H, head_dim=D,
                             group_size=g, window=s)
                self._cca_case(case, shape)
                _free(dev)

    def _pair(self, common: dict, kind: str, impl: str, fwd, fwdbwd, grads, flops, nbytes,
              note: str = "") -> None:
        """A forward row (no grad) and a forward+backward row (grads reset between calls);
        fwdbwd None: forward only."""
        for backward, fn in ((False, fwd), (True, fwdbwd)):
            if fn is None:
                print(f"[{common['suite']}] {common['case']} fwd+bwd {impl}: skipped (no "
                      f"backward on {self.device.type})", flush=True)
                continue
            try:
                with contextlib.nullcontext() if backward else torch.no_grad(), _fused_sdpa(
                    self.device
                ):
                    ms = self.time(fn, grads if backward else ())
            except torch.OutOfMemoryError:
                # one baseline out of memory must not cost the rest of the run
                print(f"[{common['suite']}] {common['case']} {'fwd+bwd' if backward else 'fwd'} "
                      f"{impl}: out of memory", flush=True)
                _free(self.device)
                continue
            self.add(**common, pass_="fwd+bwd" if backward else "fwd", kind=kind, impl=impl,
                     ms=ms, flops=flops(backward), bytes=nbytes(backward), note=note)
            _free(self.device)

    def _cca_case(self, case: str, shape: dict) -> None:
        B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
        torch.manual_seed(0)
        qkv = tuple(_rand(B, T, h, D, device=self.device) for h in (HQ, H, H))
        do = _rand(B, T, HQ, D, device=self.device)
        common = dict(suite="cca", case=case, shape=shape)
        # one method per row pair: its tensors die when it returns, then memory is released
        self._cca_sdpa(common, qkv, do)
        _free(self.device)
        self._cca_flex(common, qkv, do)
        _free(self.device)
        for core_heads in ("query", "kv") if HQ != H else ("query",):
            self._cca_op(common, qkv, do, core_heads)
            _free(self.device)

    def _cca_bytes(self, shape: dict, keys: int | None = None):
        B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
        return lambda bw: min_bytes(q_elems=B * T * HQ * D, kv_elems=B * (keys or T) * H * D,
                                    backward=bw)

    def _cca_sdpa(self, common: dict, qkv, do) -> None:
        """SDPA causal (flash) on [B, H, T, D] views of the [B, T, H, D] tensors."""
        shape = common["shape"]
        B, T, HQ, D, gqa = shape["batch"], shape["seq_len"], shape["q_heads"], shape["head_dim"], (
            shape["q_heads"] != shape["kv_heads"])
        views = [t.transpose(1, 2) for t in qkv]
        leaves = [_leaf(t) for t in qkv]
        do_view = do.transpose(1, 2)
        self._pair(
            common, "sdpa", "sdpa causal",
            lambda: F.scaled_dot_product_attention(*views, is_causal=True, enable_gqa=gqa),
            lambda: F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in leaves), is_causal=True, enable_gqa=gqa,
            ).backward(do_view),
            leaves,
            lambda bw: causal_attention_flops(B, HQ, T, D, backward=bw),
            self._cca_bytes(shape),
        )

    def _cca_flex(self, common: dict, qkv, do) -> None:
        """FlexAttention over [core ; raw] keys with the exact CCA mask; its core tokens (one per
        kv head, so it can use GQA) are pooled beforehand and are leaf inputs."""
        shape = common["shape"]
        B, T, HQ, D = shape["batch"], shape["seq_len"], shape["q_heads"], shape["head_dim"]
        g, s, gqa = shape["group_size"], shape["window"], HQ != shape["kv_heads"]
        q, k, v = qkv
        n_core = core_count(T - 1, group_size=g, window=s)
        flex, make_mask = self.flex()
        with torch.no_grad():
            core_k, core_v = cca_pool(q[:, : n_core * g], k[:, : n_core * g],
                                      v[:, : n_core * g], group_size=g, core_heads="kv")
            inputs = [q.transpose(1, 2).contiguous(),
                      torch.cat([core_k, k], dim=1).transpose(1, 2).contiguous(),
                      torch.cat([core_v, v], dim=1).transpose(1, 2).contiguous()]
            do_flex = do.transpose(1, 2).contiguous()
        mask = make_mask(cca_mask_mod(n_core, group_size=g, window=s), None, None, T,
                         n_core + T, device=self.device)
        leaves = [_leaf(t) for t in inputs]
        self._pair(
            common, "flex", "flex cca-mask",
            lambda: flex(*inputs, block_mask=mask, enable_gqa=gqa),
            (lambda: flex(*leaves, block_mask=mask, enable_gqa=gqa).backward(do_flex))
            if self.flex_backward else None,
            leaves,
            lambda bw: cca_attention_flops(B, HQ, T, D, group_size=g, window=s, backward=bw),
            self._cca_bytes(shape, keys=n_core + T),
            note="core tokens (per kv head) given: pooling not timed",
        )

    def _cca_op(self, common: dict, qkv, do, core_heads: str) -> None:
        """The CCA op, pooling included."""
        shape = common["shape"]
        B, T, HQ, H, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
        opts = dict(group_size=shape["group_size"], window=shape["window"], core_heads=core_heads)
        leaves = [_leaf(t) for t in qkv]
        self._pair(
            common, f"cca-{core_heads}", f"cca {self.impl} core={core_heads}",
            lambda: self.cca(*qkv, **opts),
            lambda: self.cca(*leaves, **opts).backward(do),
            leaves,
            lambda bw: cca_attention_flops(
                B, HQ, T, D, group_size=opts["group_size"], window=opts["window"],
                pool_heads=HQ if core_heads == "query" else H, backward=bw),
            self._cca_bytes(shape),
            note="pooling included",
        )

    # ------------------------------------------------------------ decode
    def run_decode(self) -> None:
        context, HQ, H, D, g, s, batches = 128 * 1024, 32, 8, 128, 16, 1024, (1, 8)
        if self.tiny:
            context, HQ, H, D, g, s, batches = 300, 4, 1, 64, 8, 32, (1, 2)
        p = context - 1  # the new token's position: the cache holds the context before it
        n_core = core_count(p, group_size=g, window=s)
        for B in batches:
            shape = dict(batch=B, context=context, q_heads=HQ, kv_heads=H, head_dim=D,
                         group_size=g, window=s, core_tokens=n_core,
                         raw_tokens=context - n_core * g)
            common = dict(suite="decode", case=f"ctx={_len_label(context)} B={B} GQA {HQ}/{H}",
                          shape=shape, pass_="decode")
            torch.manual_seed(0)
            q = _rand(B, 1, HQ, D, device=self.device)
            full_bytes = self._decode_full(common, q)
            _free(self.device)  # the row's tensors died with its method
            for core_heads in ("query", "kv"):
                self._decode_cca(common, q, core_heads, full_bytes)
                _free(self.device)

    def _decode_full(self, common: dict, q) -> int:
        """SDPA of the new query over the whole cache ([B, H, S, D], as HF caches hold it)."""
        B, S, HQ, H, D = (common["shape"][k] for k in ("batch", "context", "q_heads", "kv_heads",
                                                        "head_dim"))
        k, v = (_rand(B, H, S, D, device=self.device) for _ in range(2))
        qt = q.transpose(1, 2)
        with torch.inference_mode(), _fused_sdpa(self.device):
            ms = self.time(lambda: F.scaled_dot_product_attention(qt, k, v, enable_gqa=True))
        nbytes = min_bytes(q_elems=B * HQ * D, kv_elems=B * S * H * D)
        self.add(**common, kind="sdpa", impl="sdpa full cache", ms=ms, bytes=nbytes,
                 flops=attention_flops(S, batch=B, q_heads=HQ, head_dim=D),
                 note=f"reads {nbytes / 2**20:.4g} MiB")
        return nbytes

    def _decode_cca(self, common: dict, q, core_heads: str, full_bytes: int) -> None:
        """cca_decode over the cache a CCA model holds at this point: the core tokens of groups
        0 .. J(p) - 1 and the raw K/V from J(p) g to p (the docstring of cca_decode)."""
        shape = common["shape"]
        B, HQ, H, D = (shape[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
        N, R, g = shape["core_tokens"], shape["raw_tokens"], shape["group_size"]
        Hc = HQ if core_heads == "query" else H
        core_k, core_v = (_rand(B, N, Hc, D, device=self.device) for _ in range(2))
        raw_k, raw_v = (_rand(B, R, H, D, device=self.device) for _ in range(2))
        with torch.inference_mode():
            ms = self.time(lambda: self.cca_decode(
                q, core_k, core_v, raw_k, raw_v, raw_start=N * g, group_size=g,
                window=shape["window"]))
        nbytes = min_bytes(q_elems=B * HQ * D, kv_elems=B * (N * Hc + R * H) * D)
        self.add(**common, kind=f"cca-{core_heads}",
                 impl=f"cca_decode {self.impl} core={core_heads}", ms=ms, bytes=nbytes,
                 flops=attention_flops(N + R, batch=B, q_heads=HQ, head_dim=D),
                 note=f"reads {nbytes / 2**20:.4g} MiB, {full_bytes / nbytes:.1f}x less than full")

    # ------------------------------------------------------------ gca
    def run_gca(self) -> None:
        B, T, H, D, cs, K = 4, 16 * 1024, 12, 64, 64, 8
        if self.tiny:
            B, T, H, D, cs, K = 2, 256, 2, 64, 32, 4
        NQ = T // cs
        shape = dict(batch=B, seq_len=T, heads=H, head_dim=D, chunk_size=cs, top_k=K,
                     memory_chunks=NQ, window=K * cs)
        common = dict(suite="gca", case=f"B={B} T={_len_label(T)} {H} heads d={D} top-{K}x{cs}",
                      shape=shape)
        torch.manual_seed(0)
        qkv = tuple(_rand(B, T, H, D, device=self.device) for _ in range(3))
        do = _rand(B, T, H, D, device=self.device)
        indices = random_gca_indices(B, NQ, K, device=self.device,
                                     generator=torch.Generator().manual_seed(0))
        # fusion weights as the model makes them: a float32 softmax over the filled slots
        valid = indices >= 0
        weights = torch.softmax(
            torch.randn(B, NQ, 1, K, device=self.device).masked_fill(~valid, float("-inf")), -1)
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        extra = indices.numel() * (indices.element_size() + weights.element_size())
        el = B * T * H * D

        def flops(bw):
            return gca_attention_flops(indices, q_heads=H, kv_heads=H, seq_len=T, chunk_size=cs,
                                       head_dim=D, backward=bw)

        def nbytes(bw):
            return min_bytes(q_elems=el, kv_elems=el, extra=extra, backward=bw)

        self._gca_op(common, "gather", "gather + sdpa (PyTorch)", gca_gather_sdpa, qkv, do,
                     indices, weights, flops, nbytes, note="K-times copy of the chunks")
        _free(self.device)
        self._gca_flex(common, qkv, do)
        _free(self.device)
        self._gca_op(common, "gca", f"gca {self.impl}", self.gca, qkv, do, indices, weights,
                     flops, nbytes)
        _free(self.device)

    def _gca_op(self, common, kind, impl, op, qkv, do, indices, weights, flops, nbytes,
                note="") -> None:
        cs = common["shape"]["chunk_size"]
        leaves = [_leaf(t) for t in (*qkv, weights)]
        self._pair(
            common, kind, impl,
            lambda: op(*qkv, indices, weights, chunk_size=cs),
            lambda: op(*leaves[:3], indices, leaves[3], chunk_size=cs).backward(do),
            leaves, flops, nbytes, note=note,
        )

    def _gca_flex(self, common: dict, qkv, do) -> None:
        """FlexAttention causal sliding window of top_k * chunk_size keys at the same shape."""
        shape = common["shape"]
        B, T, H, D, window = (shape[k] for k in ("batch", "seq_len", "heads", "head_dim",
                                                 "window"))
        flex, make_mask = self.flex()
        inputs = [t.transpose(1, 2).contiguous() for t in qkv]
        do_flex = do.transpose(1, 2).contiguous()
        mask = make_mask(window_mask_mod(window), None, None, T, T, device=self.device)
        leaves = [_leaf(t) for t in inputs]
        el = B * T * H * D
        self._pair(
            common, "flex", f"flex sliding-window-{window}",
            lambda: flex(*inputs, block_mask=mask),
            (lambda: flex(*leaves, block_mask=mask).backward(do_flex))
            if self.flex_backward else None,
            leaves,
            lambda bw: window_attention_flops(B, H, T, D, window=window, backward=bw),
            lambda bw: min_bytes(q_elems=el, kv_elems=el, backward=bw),
            note=f"causal, window {window} = top-{shape['top_k']} x {shape['chunk_size']}",
        )

    # ------------------------------------------------------------ model
    def run_model(self) -> None:
        self._model_training()
        _free(self.device)
        self._model_prefill()
        _free(self.device)

    def _model_training(self) -> None:
        from longreach.bench.training import measure_training
        from longreach.train import find_recipe, load_config

        gca_recipe, swa_recipe, seq_len, steps, warmup = "gca-128m", "swa-128m", 16384, 3, 2
        if self.tiny:
            gca_recipe, swa_recipe, seq_len, steps, warmup = "gca-tiny", "swa-tiny", 256, 1, 1
        gca_cfg = load_config(find_recipe(gca_recipe), [])
        encoder = gca_cfg.model["gca"]["encoder_layers"]
        layers = gca_cfg.model["num_hidden_layers"] + encoder
        # the recipe's batch (4 sequences of 16K for the 128M recipes): at batch 1 a 128M model's
        # step is bound by Python and kernel launches, not by the GPU
        batch = self.args.train_batch or (1 if self.tiny else gca_cfg.train.batch_size)
        case = f"T={_len_label(seq_len)} B={batch}"
        for kind, recipe, overrides in (
            ("swa", swa_recipe, [f"model.num_hidden_layers={layers}"]),
            ("gca", gca_recipe, []),
        ):
            r = measure_training(recipe, overrides, device=self.device, seq_len=seq_len,
                                 batch=batch, steps=steps, warmup=warmup)
            note = f"{r['tokens_per_s']:,} tok/s, {r['params_M']}M params"
            if "peak_mem_GiB" in r:
                note += f", peak {r['peak_mem_GiB']} GiB"
            self.add(suite="model", case=case, pass_="train step", kind=kind,
                     impl=f"{recipe} ({r['layers']} layers" + (
                         f" + {encoder} encoder)" if kind == "gca" else ")"),
                     ms=1e3 * r["step_s"], shape=r, note=note)
            _free(self.device)

    def _model_prefill(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from longreach.integrations import hf

        if self.args.prefill_lengths.strip().lower() in ("", "none"):
            print("[model] prefill skipped (--prefill-lengths none)", flush=True)
            return
        dev = self.device
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000)
        layers = self.args.model_layers or 32
        lengths = parse_lengths(self.args.prefill_lengths)
        g, s = 16, 1024
        if self.tiny:
            dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256)
            layers, lengths, s = self.args.model_layers or 2, [256], 64
        config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(lengths),
                             **dims)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(DTYPE)
        try:
            with torch.device(dev):
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
        model.set_attn_implementation("sdpa")
        hidden, inter, heads = dims["hidden_size"], dims["intermediate_size"], dims[
            "num_attention_heads"]
        D = hidden // heads
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for T in lengths:
            ids = torch.randint(0, dims["vocab_size"], (1, T), device=dev)
            # per token and layer: q, k, v, o projections and the SwiGLU MLP; one logit row
            dense = 2 * T * layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * hidden * (
                dims["vocab_size"])
            case = f"T={_len_label(T)} {layers} layers"
            shape = dict(seq_len=T, layers=layers, **dims)
            for kind in ("sdpa", "cca"):
                if kind == "cca":
                    hf.enable_cca(model, group_size=g, window=s)
                    attn = cca_attention_flops(1, heads, T, D, group_size=g, window=s,
                                               pool_heads=dims["num_key_value_heads"])
                else:
                    attn = causal_attention_flops(1, heads, T, D)
                ms = self._prefill_ms(model, ids)
                if kind == "cca":
                    hf.restore_attention(model)
                self.add(suite="model", case=case, pass_="prefill", kind=kind,
                         impl="llama sdpa" if kind == "sdpa" else f"llama enable_cca(g={g}, "
                         f"window={s})", ms=ms, shape=shape, flops=dense + layers * attn,
                         bytes=weight_bytes,  # the weights, read once: activations left out
                         note="time to first token, random weights")
                _free(dev)
            del ids
        del model
        _free(dev)

    def _prefill_ms(self, model, ids) -> float:
        def once():
            model(ids, use_cache=False, logits_to_keep=1)

        times = []
        with torch.inference_mode():
            once()  # warm-up
            for _ in range(2):
                if self.device.type == "cuda":
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    once()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    once()
                    times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


# ---------------------------------------------------------------- entry points


def _versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:
            info[pkg] = "not installed"
    return info


def parse_suites(spec: str, valid: tuple[str, ...]) -> list[str]:
    """The comma-separated suites of --suite, checked against `valid`."""
    suites = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(valid))
    if unknown or not suites:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {','.join(valid)}")
    return suites


def check_peaks(args) -> None:
    if args.peak_tflops <= 0 or args.peak_tbps <= 0:
        raise ValueError("--peak-tflops and --peak-tbps must be positive")


def resolve_device(name: str) -> tuple[torch.device, str]:
    """The device of --device (auto: CUDA when there is one) and its name for the report."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return device, device_name


def run_meta(args, device: torch.device, device_name: str, versions: dict, suites: list[str],
             smoke: bool, *, cuda_timing: str) -> dict:
    """The header of a results file: command, device, versions, settings, how rows were timed."""
    meta = {
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "device": device_name, **versions, "smoke_test": smoke,
        "peak_tflops": args.peak_tflops, "peak_tbps": args.peak_tbps, "suites": suites,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timing": f"triton.testing.do_bench median (warmup 25 ms, rep 100 ms); {cuda_timing}"
                  if device.type == "cuda" else "median wall time of 3 calls after 1 warm-up (CPU)",
    }
    if smoke:
        meta["warning"] = "smoke test: tiny shapes; the times mean nothing"
    return meta


def run_suites(bench, recorder: Recorder, suites: list[str], title_note: str, *,
               table_prefix: str = "") -> None:
    """Run `bench.run_<suite>()` for each suite, print its table, then write the results."""
    for suite in suites:
        start = time.perf_counter()
        getattr(bench, f"run_{suite}")()
        print(f"[{suite}] done in {time.perf_counter() - start:.0f} s", flush=True)
        recorder.print_table(table_prefix + suite, title_note)
    recorder.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    recorder.write()
    if recorder.out is not None:
        print(f"results written to {recorder.out}")


def script_main(argv: list[str] | None, add_arguments, run_fn, *, script: str, doc: str) -> int:
    """`python benchmarks/<script> ...`: parse the options of its `longreach bench` command,
    run it, and turn a ValueError into a message and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = add_arguments(argparse.ArgumentParser(prog=script, description=doc.splitlines()[0]))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", script, *argv])
    try:
        return run_fn(args)
    except ValueError as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    """Run the suites named in args (as parsed by `add_attention_arguments`); 0 on success."""
    suites = parse_suites(args.suite, ATTENTION_SUITES)
    check_peaks(args)
    if args.model_layers is not None and args.model_layers < 1:
        raise ValueError(f"--model-layers must be >= 1, got {args.model_layers}")
    parse_lengths(args.lengths)  # fail before any work
    if args.prefill_lengths.strip().lower() not in ("", "none"):
        parse_lengths(args.prefill_lengths)
    device, device_name = resolve_device(args.device)
    smoke = args.quick or device.type != "cuda"
    meta = run_meta(args, device, device_name, _versions(), suites, smoke,
                    cuda_timing="prefill: CUDA events, median of 2 after 1 warm-up")
    out = Path(args.out) if args.out else None
    recorder = Recorder(out, meta, peak_flops=args.peak_tflops * 1e12,
                        peak_bw=args.peak_tbps * 1e12)
    bench = Bench(args, device, recorder)
    print(f"bench attention on {device_name}: suites {','.join(suites)}, impl {bench.impl}"
          f"{' (SMOKE TEST: tiny shapes, times mean nothing)' if smoke else ''}", flush=True)
    title_note = " (SMOKE TEST: tiny shapes, times mean nothing)" if smoke else f" on {device_name}"
    with warnings.catch_warnings():
        # eager FlexAttention on CPU warns that it is unfused: expected for a smoke test
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        run_suites(bench, recorder, suites, title_note)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/attention.py ...`: the same options as `longreach bench attention`."""
    return script_main(argv, add_attention_arguments, run, script="benchmarks/attention.py", doc=__doc__)
