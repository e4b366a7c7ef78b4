"""longreach.ops.backend: the LONGREACH_KERNELS grammar, impl= validation, the value-check
switch (LONGREACH_CHECKS), compute_dtype, and that each public op validates its inputs once."""

import importlib

import pytest
import torch

from longreach.ops import (
    attention,
    backend,
    cca_attention,
    cca_decode,
    gca_attention,
    gca_decode,
    linear_recurrence,
    linear_recurrence_step,
)
from longreach.ops.backend import (
    OP_PATHS,
    debug_checks,
    kernel_path,
    needs_value_check,
    parse_kernels,
    use_kernels,
)
from longreach.ops.gca.reference import check_gca_inputs
from longreach.ops.linear_recurrence.reference import check_linear_recurrence_inputs

attention_module = importlib.import_module("longreach.ops.attention")
cca_module = importlib.import_module("longreach.ops.cca")
recurrence_module = importlib.import_module("longreach.ops.linear_recurrence")


@pytest.fixture(autouse=True)
def _no_kernel_or_check_variables(monkeypatch):
    monkeypatch.delenv("LONGREACH_KERNELS", raising=False)
    monkeypatch.delenv("LONGREACH_CHECKS", raising=False)


def qkv(T=8, S=None, HQ=2, H=2, D=8):
    S = T if S is None else S
    return torch.randn(1, T, HQ, D), torch.randn(1, S, H, D), torch.randn(1, S, H, D)


def gca_inputs():
    q, k, v = qkv(T=8, S=16)
    return q, k, v, torch.zeros(1, 1, 1, 2, dtype=torch.long), torch.ones(1, 1, 1, 2)


def recurrence_inputs(T=5):
    q = torch.randn(1, T, 2, 8)
    return q, q, q, -torch.rand(1, T, 2)


# ---- the LONGREACH_KERNELS grammar -------------------------------------------------------------


def test_a_bare_path_applies_to_every_op_that_has_it():
    assert parse_kernels("triton") == {
        "attention": "auto", "cca": "triton", "gca": "triton", "linear_recurrence": "auto",
        "lm_infinite": "auto",
    }
    assert parse_kernels("fla") == {
        "attention": "auto", "cca": "auto", "gca": "auto", "linear_recurrence": "fla",
        "lm_infinite": "auto",
    }
    assert parse_kernels("sdpa")["attention"] == parse_kernels("sdpa")["lm_infinite"] == "sdpa"
    assert parse_kernels("local") == {**dict.fromkeys(OP_PATHS, "auto"), "attention": "local"}
    assert parse_kernels("reference") == dict.fromkeys(OP_PATHS, "reference")
    assert parse_kernels("auto") == parse_kernels("") == dict.fromkeys(OP_PATHS, "auto")
    assert parse_kernels(" triton ") == parse_kernels("triton")


def test_a_list_sets_each_named_op_and_leaves_the_others_on_auto():
    assert parse_kernels("attention=flex,linear_recurrence=reference") == {
        "attention": "flex", "cca": "auto", "gca": "auto", "linear_recurrence": "reference",
        "lm_infinite": "auto",
    }
    assert parse_kernels(" cca = triton , gca=reference ") == {
        "attention": "auto", "cca": "triton", "gca": "reference", "linear_recurrence": "auto",
        "lm_infinite": "auto",
    }
    assert parse_kernels("gca=auto") == dict.fromkeys(OP_PATHS, "auto")


@pytest.mark.parametrize(
    "value, message",
    [
        ("triton-please", r"names no kernel path.*'sdpa'.*'triton'.*'fla'.*op=path"),
        ("cuda", r"'attention', 'cca', 'gca', 'linear_recurrence'"),
        ("attention=triton", r"attention has no path 'triton'.*'sdpa', 'flex', 'local'"),
        ("linear_recurrence=triton", r"'auto', 'reference', 'fla'"),
        ("mamba=fla", r"unknown op 'mamba'.*'attention', 'cca', 'gca', 'linear_recurrence'"),
        ("cca_attention=triton", r"unknown op 'cca_attention'"),
        ("attention=flex,reference", r"'reference' is not an op=path entry"),
        ("cca=triton,cca=reference", r"'cca' is given twice"),
        ("cca=", r"cca has no path ''"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_valid_ones(value, message):
    with pytest.raises(ValueError, match=message):
        parse_kernels(value)


def test_every_op_rejects_a_bad_environment_value(monkeypatch):
    monkeypatch.setenv("LONGREACH_KERNELS", "triton-please")
    q, k, v = qkv()
    for call in (
        lambda: attention(q, k, v),
        lambda: cca_attention(q, k, v, group_size=2, window=4),
        lambda: cca_decode(q[:, -1:], None, None, k, v, raw_start=0, group_size=2, window=16),
        lambda: gca_attention(*gca_inputs(), chunk_size=8),
        lambda: gca_decode(*gca_inputs(), chunk_size=8),
        lambda: linear_recurrence(*recurrence_inputs()),
    ):
        with pytest.raises(ValueError, match="LONGREACH_KERNELS='triton-please'"):
            call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: attention(*qkv(), impl="triton"), r"attention: impl must be one of .*'local'"),
        (lambda: cca_attention(*qkv(), impl="sdpa"), r"cca: impl must be one of .*'triton'"),
        (lambda: cca_decode(*qkv()[:1], None, None, *qkv()[1:], raw_start=0, impl="fla"),
         r"cca: impl must be one of"),
        (lambda: gca_attention(*gca_inputs(), chunk_size=8, impl="flex"),
         r"gca: impl must be one of .*'triton'"),
        (lambda: gca_decode(*gca_inputs(), chunk_size=8, impl="fla"), r"gca: impl must be one of"),
        (lambda: linear_recurrence(*recurrence_inputs(), impl="triton"),
         r"linear_recurrence: impl must be one of .*'fla'"),
    ],
)
def test_impl_is_validated_by_the_same_rule(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_variable_is_parsed_once_per_distinct_value(monkeypatch):
    parse_kernels.cache_clear()
    monkeypatch.setenv("LONGREACH_KERNELS", "attention=reference")
    for _ in range(5):
        assert kernel_path("attention") == "reference"
        assert kernel_path("cca") == "auto"
    assert parse_kernels.cache_info().misses == 1
    assert kernel_path("attention", "sdpa") == "sdpa"  # impl wins over the variable


def test_a_per_op_list_reaches_the_ops(monkeypatch):
    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    spy(attention_module, "blocked_attention")
    spy(cca_module, "blocked_cca_attention")
    q, k, v = qkv()
    monkeypatch.setenv("LONGREACH_KERNELS", "cca=reference")
    cca_attention(q, k, v, group_size=2, window=16)  # forced: no shortcut to attention
    attention(q, k, v)  # auto: SDPA
    assert calls == ["blocked_cca_attention"]
    calls.clear()
    monkeypatch.setenv("LONGREACH_KERNELS", "attention=reference")
    cca_attention(q, k, v, group_size=2, window=16)  # auto: window >= T is causal attention
    assert calls == ["blocked_attention"]


def test_use_kernels_overrides_the_variable_within_its_block(monkeypatch):
    monkeypatch.setenv("LONGREACH_KERNELS", "reference")
    with use_kernels("triton"):
        assert kernel_path("cca") == "triton" and kernel_path("attention") == "auto"
        with use_kernels("attention=flex"):
            assert kernel_path("attention") == "flex" and kernel_path("cca") == "auto"
        assert kernel_path("cca") == "triton"
        assert kernel_path("cca", "reference") == "reference"
    assert kernel_path("cca") == "reference"
    with pytest.raises(ValueError, match="names no kernel path"), use_kernels("fast"):
        pass
    assert kernel_path("gca") == "reference"


# ---- value checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, on", [(None, False), ("", False), ("0", False), ("1", True), ("true", True)]
)
def test_debug_checks_reads_longreach_checks(monkeypatch, value, on):
    if value is not None:
        monkeypatch.setenv("LONGREACH_CHECKS", value)
    assert debug_checks() is on
    assert needs_value_check(torch.zeros(1)) is True  # CPU: always, it costs no sync
    assert needs_value_check(torch.zeros(1, device="meta")) is on


@pytest.mark.parametrize("value", ["yes", "2", "on", "True "])
def test_debug_checks_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("LONGREACH_CHECKS", value)
    with pytest.raises(ValueError, match=r"LONGREACH_CHECKS must be '1' or 'true'.*'0'"):
        debug_checks()


def test_value_checks_raise_on_cpu_tensors():
    q, k, v, idx, w = gca_inputs()
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 1\]"):
        gca_attention(q, k, v, idx + 2, w, chunk_size=8)
    with pytest.raises(ValueError, match="indices must lie"):
        gca_decode(q, k, v, idx - 2, w, chunk_size=8)
    q, k, v, g = recurrence_inputs()
    with pytest.raises(ValueError, match="g is a log-decay"):
        linear_recurrence(q, k, v, -g)
    with pytest.raises(ValueError, match="g is a log-decay"):
        linear_recurrence(q, k, v, g.masked_fill(g < -0.5, float("nan")), impl="reference")
    with pytest.raises(ValueError, match="g is a log-decay"):
        linear_recurrence_step(q[:, 0], k[:, 0], v[:, 0], -g[:, 0], None)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k_pos must be sorted"):
        attention(q, k, v, k_pos=torch.arange(8).flip(0), q_pos=torch.arange(8))


def test_value_checks_are_skipped_off_cpu_unless_longreach_checks(monkeypatch):
    """On a device other than the CPU (here "meta", which holds no data) the checks that read
    values do not run; with LONGREACH_CHECKS=1 they try to read the data (and cannot here)."""
    meta = dict(device="meta")
    q, k, v = (torch.empty(1, 8, 2, 8, **meta) for _ in range(3))
    idx = torch.empty(1, 1, 1, 2, dtype=torch.long, **meta)
    w = torch.empty(1, 1, 1, 2, **meta)
    g = torch.empty(1, 8, 2, **meta)
    assert check_gca_inputs(q, k, v, idx, w, chunk_size=8) == pytest.approx(8**-0.5)
    assert check_linear_recurrence_inputs(q, k, v, g, None, None) == pytest.approx(8**-0.5)
    monkeypatch.setenv("LONGREACH_CHECKS", "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_gca_inputs(q, k, v, idx, w, chunk_size=8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_linear_recurrence_inputs(q, k, v, g, None, None)


# ---- validation once per call ------------------------------------------------------------------


def count_calls(monkeypatch, modules, name):
    calls = []
    for module in modules:
        module = importlib.import_module(module)
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    return calls


def test_each_public_op_validates_its_inputs_once(monkeypatch):
    checks = count_calls(monkeypatch, ["longreach.ops.attention.reference",
                                       "longreach.ops.cca.reference",
                                       "longreach.ops.gca.reference"], "check_qkv")
    q, k, v = qkv(T=12)
    for impl in ("reference", "auto", "sdpa", "local"):
        checks.clear()
        attention(q, k, v, window=4, impl=impl)
        assert len(checks) == 1, impl
    for window in (4, 16):  # the blocked reference; the causal-attention shortcut
        checks.clear()
        cca_attention(q, k, v, group_size=2, window=window)
        assert len(checks) == 1, window
    checks.clear()
    cca_decode(q[:, -1:], None, None, k, v, raw_start=0, group_size=2, window=16)
    assert len(checks) == 1
    for op in (gca_attention, gca_decode):
        checks.clear()
        op(*gca_inputs(), chunk_size=8)
        assert len(checks) == 1
    checks = count_calls(monkeypatch, ["longreach.ops.linear_recurrence",
                                       "longreach.ops.linear_recurrence.reference"],
                         "check_linear_recurrence_inputs")
    linear_recurrence(*recurrence_inputs())
    assert len(checks) == 1


def test_compute_dtype_is_float64_for_float64_else_float32():
    assert backend.compute_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert backend.compute_dtype(dtype) == torch.float32
    assert recurrence_module.compute_dtype is backend.compute_dtype  # the layers import it there
