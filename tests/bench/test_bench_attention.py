"""`longreach bench attention`: the floor formulas against brute-force counts, the baselines
against the reference ops, and the command on tiny CPU shapes (no timing is checked)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longreach.bench import baselines as bench
from longreach.bench import floors, harness
from longreach.cli import main
from longreach.ops.cca import cca_attention_reference, cca_pool, core_count
from longreach.ops.gca import gca_attention_reference

ROOT = Path(__file__).resolve().parents[2]


def cca_visible(T, g, s):
    """Dense [T, n_core + T] visibility from the definition: core n iff n < J(t); raw j iff
    J(t) g <= j <= t."""
    n_core = core_count(T - 1, group_size=g, window=s)
    mask = torch.zeros(T, n_core + T, dtype=torch.bool)
    for t in range(T):
        J = max(0, t + 1 - s) // g
        mask[t, :J] = True
        for j in range(T):
            mask[t, n_core + j] = J * g <= j <= t
    return mask


@pytest.mark.parametrize("T,g,s", [(1, 4, 8), (7, 4, 8), (8, 4, 8), (40, 4, 8), (37, 3, 5),
                                   (50, 1, 1), (64, 16, 16)])
def test_cca_flops_count_the_visible_pairs(T, g, s):
    visible = cca_visible(T, g, s)
    pairs = int(visible.sum())
    assert floors.cca_pairs(T, group_size=g, window=s) == pairs
    B, HQ, D = 2, 3, 8
    assert floors.cca_attention_flops(B, HQ, T, D, group_size=g, window=s) == 4 * B * HQ * D * pairs
    # pooling: every group some query sees (the widest core row), 3 matvecs of g keys
    groups = int(visible[:, : visible.shape[1] - T].any(dim=0).sum())
    with_pool = floors.cca_attention_flops(B, HQ, T, D, group_size=g, window=s, pool_heads=2)
    assert with_pool - 4 * B * HQ * D * pairs == 6 * B * 2 * groups * g * D
    both = floors.cca_attention_flops(B, HQ, T, D, group_size=g, window=s, pool_heads=2,
                                     backward=True)
    assert both == round(3.5 * 4 * B * HQ * D * pairs) + 3 * 6 * B * 2 * groups * g * D


@pytest.mark.parametrize("T,w", [(1, 4), (5, 8), (8, 8), (30, 8), (33, 1)])
def test_causal_and_window_flops_count_the_visible_pairs(T, w):
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = int((j <= t).sum())
    window = int(((j <= t) & (t - j < w)).sum())
    assert floors.causal_pairs(T) == causal
    assert floors.window_pairs(T, w) == window
    assert floors.causal_attention_flops(2, 3, T, 16) == 4 * 2 * 3 * 16 * causal
    assert floors.causal_attention_flops(2, 3, T, 16, backward=True) == round(
        3.5 * 4 * 2 * 3 * 16 * causal)
    assert floors.window_attention_flops(1, 2, T, 8, window=w) == 4 * 2 * 8 * window


@pytest.mark.parametrize("T,Hr", [(64, 1), (70, 2), (16, 2)])
def test_gca_flops_count_the_retrieved_pairs(T, Hr):
    B, HQ, H, cs, D, K = 2, 4, 2, 16, 8, 3
    NQ = math.ceil(T / cs)
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(-1, 5, (B, NQ, Hr, K), generator=gen)
    pairs = 0  # (query, key) pairs per query head, from the definition
    for b in range(B):
        for t in range(T):
            for h in range(HQ):
                row = 0 if Hr == 1 else h // (HQ // H)
                pairs += cs * int((indices[b, t // cs, row] >= 0).sum())
    got = floors.gca_attention_flops(indices, q_heads=HQ, kv_heads=H, seq_len=T, chunk_size=cs,
                                    head_dim=D)
    assert got == 4 * D * pairs


def test_bytes_and_floor():
    assert floors.min_bytes(q_elems=10, kv_elems=3) == (2 * 10 + 2 * 3) * 2
    assert floors.min_bytes(q_elems=10, kv_elems=3, extra=4, backward=True) == 2 * (52 + 4)
    # whichever floor is slower wins
    assert floors.floor_ms(2e12, 1, peak_flops=1e12, peak_bytes_per_s=1e12) == pytest.approx(2e3)
    assert floors.floor_ms(1, 3e12, peak_flops=1e12, peak_bytes_per_s=1e12) == pytest.approx(3e3)


def test_parse_lengths():
    assert harness.parse_lengths("8k, 32K,131072") == [8192, 32768, 131072]
    assert harness.parse_lengths("1m") == [1 << 20]
    for bad in ("", "8x", "k", "0"):
        with pytest.raises(ValueError):
            harness.parse_lengths(bad)


def test_flex_cca_mask_computes_cca(monkeypatch):
    """The FlexAttention baseline (mask over [core ; raw], core per kv head) is CCA."""
    import importlib

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # torch warns of eager (unfused) FlexAttention once per process, and any earlier flex call,
    # compiled ones too, uses that once up: start from none shown, so the warning checks that
    # this call took the eager path whatever ran before it
    flex_module = importlib.import_module("torch.nn.attention.flex_attention")
    monkeypatch.setattr(flex_module, "_WARNINGS_SHOWN", set(), raising=False)

    B, T, HQ, H, D, g, s = 1, 70, 4, 2, 16, 4, 12
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, H, H))
    n_core = core_count(T - 1, group_size=g, window=s)
    core_k, core_v = cca_pool(q[:, : n_core * g], k[:, : n_core * g], v[:, : n_core * g],
                              group_size=g, core_heads="kv")
    mask_mod = bench.cca_mask_mod(n_core, group_size=g, window=s)
    dense = mask_mod(0, 0, torch.arange(T)[:, None], torch.arange(n_core + T)[None, :])
    assert torch.equal(dense, cca_visible(T, g, s))
    mask = create_block_mask(mask_mod, None, None, T, n_core + T, device="cpu")
    with pytest.warns(UserWarning, match="without torch.compile"):
        out = flex_attention(
            q.transpose(1, 2), torch.cat([core_k, k], 1).transpose(1, 2),
            torch.cat([core_v, v], 1).transpose(1, 2), block_mask=mask, enable_gqa=True,
        ).transpose(1, 2)
    ref = cca_attention_reference(q, k, v, group_size=g, window=s, core_heads="kv")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gather_sdpa_baseline_is_gca():
    B, T, HQ, H, D, cs, K = 2, 96, 4, 2, 16, 16, 3
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, H, H))
    indices = bench.random_gca_indices(B, T // cs, K, device="cpu",
                                       generator=torch.Generator().manual_seed(0))
    w = torch.softmax(torch.randn(B, T // cs, 1, K), -1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = bench.gca_gather_sdpa(*leaves[:3], indices, leaves[3], chunk_size=cs)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref = gca_attention_reference(*ref_leaves[:3], indices, ref_leaves[3], chunk_size=cs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_random_gca_indices_are_causal_and_distinct():
    idx = bench.random_gca_indices(3, 12, 4, device="cpu")
    assert idx.shape == (3, 12, 1, 4)
    for c in range(12):
        row = idx[:, c, 0]
        valid = row[row >= 0]
        assert (valid < c).all()
        assert int((row >= 0).sum(-1).min()) == min(c, 4)  # full when c >= K
        for b in range(3):
            chosen = row[b][row[b] >= 0]
            assert len(set(chosen.tolist())) == len(chosen)


def test_cli_quick_cpu_writes_json(tmp_path, capsys):
    out = tmp_path / "bench" / "attention.json"
    rc = main(["bench", "attention", "--device", "cpu", "--quick", "--suite", "cca,decode,gca",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["smoke_test"] is True and data["command"].startswith("longreach bench attention")
    assert data["device"].startswith("cpu") and data["torch"] == torch.__version__
    rows = data["rows"]
    by_suite = {s: [r for r in rows if r["suite"] == s] for s in ("cca", "decode", "gca")}
    # cca: sdpa fwd+bwd, flex fwd (no flex backward on CPU), cca fwd+bwd (+ core=kv for GQA)
    assert len(by_suite["cca"]) == 5 + 7
    assert len(by_suite["decode"]) == 2 * 3
    assert len(by_suite["gca"]) == 5
    for r in rows:
        assert r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    cca_kv = [r for r in by_suite["cca"] if r["kind"] == "cca-kv" and r["pass"] == "fwd"][0]
    assert set(cca_kv["speedup"]) == {"sdpa", "flex"}
    decode = [r for r in by_suite["decode"] if r["kind"] != "sdpa"]
    assert all(set(r["speedup"]) == {"sdpa"} for r in decode)
    # per-kv-head core tokens read less than per-query-head ones, both less than the full cache
    b1 = {r["kind"]: r["bytes"] for r in by_suite["decode"] if r["shape"]["batch"] == 1}
    assert b1["cca-kv"] < b1["cca-query"] < b1["sdpa"]
    printed = capsys.readouterr().out
    assert "SMOKE TEST" in printed and "bench attention: gca" in printed


def test_lm_infinite_suite_quick_cpu(tmp_path):
    out = tmp_path / "lminf.json"
    assert main(["bench", "attention", "--device", "cpu", "--quick", "--suite", "lm-infinite",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # streaming fwd (no flex backward on CPU); reference and sdpa fwd + fwd+bwd; flex fwd
    assert [(r["kind"], r["pass"]) for r in rows] == [
        ("streaming", "fwd"), ("reference", "fwd"), ("reference", "fwd+bwd"), ("sdpa", "fwd"),
        ("sdpa", "fwd+bwd"), ("flex", "fwd")]
    sdpa = [r for r in rows if r["kind"] == "sdpa" and r["pass"] == "fwd"][0]
    assert set(sdpa["speedup"]) == {"reference", "streaming"}


def test_cli_rejects_unknown_suite(tmp_path, capsys):
    rc = main(["bench", "attention", "--device", "cpu", "--suite", "cca,nope",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_model_suite_quick_cpu(tmp_path):
    out = tmp_path / "m.json"
    assert main(["bench", "attention", "--device", "cpu", "--suite", "model", "--out",
                 str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    train = [r for r in rows if r["pass"] == "train step"]
    assert [r["kind"] for r in train] == ["swa", "gca"]
    # the SWA model is as deep as the GCA model plus its chunk encoder
    from longreach.train import find_recipe, load_config

    encoder = load_config(find_recipe("gca-tiny")).model["gca"]["encoder_layers"]
    assert train[0]["shape"]["layers"] == train[1]["shape"]["layers"] + encoder
    assert [r["kind"] for r in rows if r["pass"] == "prefill"] == ["sdpa", "cca"]


@pytest.mark.slow
def test_command_in_a_fresh_process(tmp_path):
    out = tmp_path / "d.json"
    proc = subprocess.run(
        [sys.executable, "-m", "longreach.cli", "bench", "attention", "--device", "cpu",
         "--suite", "decode", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["command"].startswith("longreach bench attention")
    assert len(data["rows"]) == 6


@pytest.mark.gpu
def test_cli_quick_cuda_runs_the_kernels(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["bench", "attention", "--device", "cuda", "--quick", "--suite",
                 "cca,decode,gca", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = {(r["suite"], r["kind"], r["pass"]) for r in rows}
    for suite, kind in (("cca", "flex"), ("cca", "cca-query"), ("cca", "cca-kv"),
                        ("gca", "gca"), ("gca", "flex")):
        assert {(suite, kind, "fwd"), (suite, kind, "fwd+bwd")} <= kinds
    assert ("decode", "cca-kv", "decode") in kinds
    assert all("reference" not in r["impl"] for r in rows)
