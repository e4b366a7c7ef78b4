"""`longreach bench recurrence`: the floor formulas against the tensors they describe, and the
command on tiny CPU shapes (no timing is checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longreach.bench import floors, recurrence_model
from longreach.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("chunk", [4, 64])
def test_flops_count_the_chunked_products(chunk):
    B, H, K, V, n_chunks = 2, 3, 16, 8, 5
    T = n_chunks * chunk
    per_chunk = (2 * chunk * chunk * K  # scores q k^T inside the chunk
                 + 2 * chunk * chunk * V  # scores @ v
                 + 2 * chunk * K * V  # q @ carried state
                 + 2 * K * chunk * V)  # state update k^T v
    want = B * H * n_chunks * per_chunk
    assert floors.recurrence_flops(B, T, H, K, V, chunk=chunk) == want
    assert floors.recurrence_flops(B, T, H, K, V, chunk=chunk, backward=True) == 3 * want


@pytest.mark.parametrize("per_key", [False, True])
def test_bytes_are_the_tensors_read_and_written(per_key):
    B, T, H, K, V = 2, 7, 3, 16, 8
    bf16 = dict(dtype=torch.bfloat16)
    q, k, dq, dk = (torch.empty(B, T, H, K, **bf16) for _ in range(4))
    v, o, do, dv = (torch.empty(B, T, H, V, **bf16) for _ in range(4))
    g, dg = (torch.empty((B, T, H, K) if per_key else (B, T, H)) for _ in range(2))
    h0, final, dfinal, dh0 = (torch.empty(B, H, K, V) for _ in range(4))

    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts)

    fwd = nbytes(q, k, v, g, h0, o, final)
    bwd = nbytes(q, k, v, g, h0, do, dfinal, dq, dk, dv, dg, dh0)
    assert floors.recurrence_bytes(B, T, H, K, V, per_key=per_key) == fwd
    assert floors.recurrence_bytes(B, T, H, K, V, per_key=per_key, backward=True) == fwd + bwd


def test_kernels_env_restores_the_variable(monkeypatch):
    monkeypatch.setenv("LONGREACH_KERNELS", "triton")
    with recurrence_model.kernels_env("reference"):
        assert os.environ["LONGREACH_KERNELS"] == "reference"
    assert os.environ["LONGREACH_KERNELS"] == "triton"
    with recurrence_model.kernels_env(None):
        assert "LONGREACH_KERNELS" not in os.environ
    assert os.environ["LONGREACH_KERNELS"] == "triton"


def test_cli_cpu_writes_json(tmp_path, capsys):
    out = tmp_path / "bench" / "recurrence.json"
    assert main(["bench", "recurrence", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke_test"] is True and data["command"].startswith("longreach bench recurrence")
    assert data["device"].startswith("cpu") and "fla-core" in data and "finished" in data
    rows = data["rows"]
    ops = [r for r in rows if r["suite"] == "recurrence-op"]
    # CPU: the reference only, both decay shapes, forward and forward+backward
    assert [(r["shape"]["decay"], r["pass"], r["kind"]) for r in ops] == [
        ("scalar", "fwd", "reference"), ("scalar", "fwd+bwd", "reference"),
        ("per key", "fwd", "reference"), ("per key", "fwd+bwd", "reference")]
    for r in ops:
        assert r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    model = [r for r in rows if r["suite"] == "recurrence-model"]
    assert len(model) == 1 and model[0]["pass"] == "train step" and model[0]["shape"]["loss"] > 0
    printed = capsys.readouterr().out
    assert "SMOKE TEST" in printed and "reference only" in printed


@pytest.mark.parametrize("args,match", [
    (["--suite", "op,decode"], "unknown suite"),
    (["--lengths", "2q"], "bad length"),
    (["--train-batch", "0"], "--train-batch"),
    (["--peak-tbps", "0"], "--peak-tflops and --peak-tbps"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, args, match):
    out = tmp_path / "x.json"
    assert main(["bench", "recurrence", "--device", "cpu", *args, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_command_in_a_fresh_process(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "longreach.cli", "bench", "recurrence", "--device", "cpu",
         "--suite", "op", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["command"].startswith("longreach bench recurrence") and len(data["rows"]) == 4


@pytest.mark.gpu
def test_cli_quick_cuda_compares_fla_with_the_reference(tmp_path):
    pytest.importorskip("fla")
    out = tmp_path / "gpu.json"
    assert main(["bench", "recurrence", "--device", "cuda", "--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    fla = [r for r in rows if r["kind"] == "fla"]
    assert len(fla) == 4 and all("reference" in r["speedup"] for r in fla)
    # a scalar decay: chunk_simple_gla's forward against chunk_gla's (fla-gla)
    scalar = [r for r in fla if r["suite"] == "recurrence-op" and r["shape"]["decay"] == "scalar"]
    assert [r["pass"] for r in scalar] == ["fwd"] and "fla-gla" in scalar[0]["speedup"]
    assert {"reference", "fla"} <= {r["kind"] for r in rows if r["suite"] == "recurrence-model"}


def test_autotune_override_keeps_the_first_pruned_config_inside_the_block(monkeypatch):
    autotuner = pytest.importorskip("triton.runtime.autotuner")
    from longreach.ops.backend import autotune_override

    pruned = ["cfg-a", "cfg-b", "cfg-c"]  # what a kernel's own pruning leaves

    def tuned(self, kwargs):
        return list(pruned)

    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", tuned)
    with autotune_override("first"):
        assert autotuner.Autotuner.prune_configs(None, {}) == ["cfg-a"]
        with autotune_override("first"):  # nested: still one wrapper, not a wrapper of one
            assert autotuner.Autotuner.prune_configs(None, {}) == ["cfg-a"]
        with autotune_override("full"):  # changes nothing
            assert autotuner.Autotuner.prune_configs(None, {}) == ["cfg-a"]
        assert autotuner.Autotuner.prune_configs(None, {}) == ["cfg-a"]  # inner exits keep it
        pruned[:] = ["only"]
        assert autotuner.Autotuner.prune_configs(None, {}) == ["only"]
    assert autotuner.Autotuner.prune_configs is tuned  # Triton's own method is back
    with autotune_override("full"):
        assert autotuner.Autotuner.prune_configs is tuned
    with pytest.raises(RuntimeError), autotune_override("first"):
        raise RuntimeError  # an error inside still restores the method
    assert autotuner.Autotuner.prune_configs is tuned
    with pytest.raises(ValueError, match="first.*full"), autotune_override("fast"):
        pass


def test_fla_layers_take_the_mamba2_mixers_place_at_the_same_shape():
    """The fla-layers row's model: every Mamba-2 mixer replaced by flash-linear-attention's
    SimpleGatedLinearAttention with the same heads, state size (K) and head dim (V)."""
    pytest.importorskip("fla.layers.gla")
    from longreach.models import build_model
    from longreach.train import find_recipe, load_config

    cfg = load_config(find_recipe("mamba2-tiny"), recurrence_model.TINY_MODEL_OVERRIDES)
    model = build_model(cfg.model)
    mixer = model.model.layers[0].mixer
    heads, K, V = mixer.num_heads, mixer.state_size, mixer.head_dim
    for kind in ("simple_gla", "gla"):
        model = build_model(cfg.model)
        recurrence_model.swap_in_fla_layers(model, kind)
        for block in model.model.layers:
            layer = block.mixer.layer
            assert isinstance(layer, recurrence_model.fla_layer_class(kind))
            assert (layer.num_heads, layer.head_k_dim, layer.head_v_dim) == (heads, K, V)
            assert layer.q_proj.out_features == heads * K
            assert layer.v_proj.out_features == heads * V
