"""How the ops run: which implementation (path) each op takes, the dtype they compute in,
when they check tensor values, and how Triton autotunes.

Kernel choice
-------------
Every op belongs to one family, and each family has its paths ("auto" is the op's default
rule, "reference" its pure-PyTorch specification):

    attention           auto, reference, sdpa, flex, local   `longreach.ops.attention`
    cca                 auto, reference, triton              `cca_attention`, `cca_decode`
    gca                 auto, reference, triton              `gca_attention`, `gca_decode`
    linear_recurrence   auto, reference, fla, fla-gla,       `linear_recurrence`
                        fla-simple
    lm_infinite         auto, reference, sdpa, flex          `lm_infinite_attention`

`impl=` on an op call forces one of its family's paths. Without it, a `use_kernels(value)`
block or else the environment variable LONGREACH_KERNELS decides; the value is either

  - a bare path: every family that has that path takes it, the others stay on "auto"
    ("auto" and "reference" exist in every family). LONGREACH_KERNELS=triton runs the CCA and
    GCA kernels and leaves attention and the recurrence on auto; =reference runs every
    reference; =fla forces fla-core for the recurrence;
  - or a comma-separated list of family=path entries; families not listed stay on "auto":
    LONGREACH_KERNELS=attention=flex,linear_recurrence=reference.

A value that names no path, an unknown family, or a path the family does not have is a
ValueError naming the valid ones (for `impl=` too). Unset or empty means "auto" everywhere.

The auto rules: CCA and GCA run their Triton kernels for CUDA tensors when Triton imports
and the reference otherwise (GCA also for sizes or dtypes its kernel does not take);
`linear_recurrence` runs fla-core's kernels for CUDA tensors in half or single precision
when fla-core is installed (`chunk_gla` for one decay per key; for one per head
`chunk_simple_gla` where no gradient is needed and `chunk_gla` with the decay broadcast over
the keys where one is; "fla-gla" and "fla-simple" force one of the two: the op's docstring);
`attention` picks among SDPA, FlexAttention, a blocked sliding window and the reference (its
module docstring has the rule); `lm_infinite` takes FlexAttention on CUDA for >= 128 queries,
SDPA for fewer or, elsewhere, for keys within about twice its window, the blocked reference
beyond. Under TRITON_INTERPRET=1 (set
before the kernels are imported) Triton runs its kernels on CPU tensors, slowly: tests use it
with tiny shapes; "auto" still picks the reference on CPU.

Checks
------
Every public op checks shapes, dtypes and devices once per call (host-side metadata, free for
the device). Checks that read tensor values (GCA indices in range, log-decays <= 0, sorted
positions) would make the host wait for the device on every call, so they run for CPU
tensors only, or everywhere when LONGREACH_CHECKS=1 (`debug_checks`, `needs_value_check`).

Compute dtype
-------------
The references accumulate in float64 for float64 inputs and in float32 for everything else
(`compute_dtype`).

Autotuning
----------
`autotune_override("first")` makes Triton's `@triton.autotune` kernels (fla-core's) take their
first valid config instead of timing every one on the first call of each shape, within a block.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

OP_PATHS = {
    "attention": ("auto", "reference", "sdpa", "flex", "local"),
    "cca": ("auto", "reference", "triton"),
    "gca": ("auto", "reference", "triton"),
    "linear_recurrence": ("auto", "reference", "fla", "fla-gla", "fla-simple"),
    "lm_infinite": ("auto", "reference", "sdpa", "flex"),
}
ALL_PATHS = tuple(dict.fromkeys(p for paths in OP_PATHS.values() for p in paths))
AUTOTUNE_MODES = ("first", "full")

_kernel_overrides: list[str] = []  # the values of the open `use_kernels` blocks, innermost last


@functools.lru_cache(maxsize=64)
def parse_kernels(value: str) -> dict[str, str]:
    """The path of every op family under LONGREACH_KERNELS=value (grammar: module docstring).

    Cached per distinct value, so reading the variable on every op call costs a dict lookup.
    """
    text = value.strip()
    if "=" not in text:
        path = text or "auto"
        if path not in ALL_PATHS:
            raise ValueError(
                f"LONGREACH_KERNELS={value!r} names no kernel path: use one of {ALL_PATHS} (for "
                f"every op that has it) or a comma-separated list of op=path with op in "
                f"{tuple(OP_PATHS)}, e.g. 'attention=flex,linear_recurrence=reference'"
            )
        return {op: path if path in paths else "auto" for op, paths in OP_PATHS.items()}
    chosen = dict.fromkeys(OP_PATHS, "auto")
    seen = set()
    for entry in text.split(","):
        op, sep, path = (part.strip() for part in entry.partition("="))
        if not sep:
            raise ValueError(
                f"LONGREACH_KERNELS={value!r}: {entry.strip()!r} is not an op=path entry (a list "
                f"takes only op=path entries, with op in {tuple(OP_PATHS)})"
            )
        if op not in OP_PATHS:
            raise ValueError(
                f"LONGREACH_KERNELS={value!r}: unknown op {op!r}; the ops are {tuple(OP_PATHS)}"
            )
        if op in seen:
            raise ValueError(f"LONGREACH_KERNELS={value!r}: op {op!r} is given twice")
        if path not in OP_PATHS[op]:
            raise ValueError(
                f"LONGREACH_KERNELS={value!r}: {op} has no path {path!r}; its paths are "
                f"{OP_PATHS[op]}"
            )
        seen.add(op)
        chosen[op] = path
    return chosen


def kernel_path(op: str, impl: str | None = None) -> str:
    """The path requested for a call of op family `op`: `impl` if given (validated), else the
    innermost `use_kernels` block's or LONGREACH_KERNELS's choice; "auto" by default."""
    paths = OP_PATHS[op]
    if impl is not None:
        if impl not in paths:
            raise ValueError(f"{op}: impl must be one of {paths}, got {impl!r}")
        return impl
    value = _kernel_overrides[-1] if _kernel_overrides else os.environ.get("LONGREACH_KERNELS")
    return parse_kernels(value)[op] if value else "auto"


@contextlib.contextmanager
def use_kernels(value: str) -> Iterator[None]:
    """Within the block, choose kernels as LONGREACH_KERNELS=value would (the variable itself
    is ignored there; `impl=` still wins). Blocks nest: the innermost decides."""
    parse_kernels(value)  # a bad value fails here, not at the first op call
    _kernel_overrides.append(value)
    try:
        yield
    finally:
        _kernel_overrides.pop()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_or_reference(path: str, *tensors: torch.Tensor, op: str) -> str:
    """'triton' or 'reference' for a CCA or GCA call with requested `path` on `tensors`.

    "auto" takes the kernel for CUDA tensors when Triton imports. A forced "triton" without
    Triton, or on CPU tensors outside the interpreter, is a ValueError.
    """
    on_cuda = all(t.is_cuda for t in tensors)
    if path == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if path == "triton":
        if not triton_available():
            raise ValueError(
                f"{op}: the Triton kernel was requested but Triton is not installed: "
                "pip install triton, or use impl='reference'"
            )
        if not (on_cuda or interpreting()):
            raise ValueError(
                f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run it "
                f"on CPU, slowly); got tensors on {tensors[0].device}"
            )
    return path


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reference computes (and keeps recurrent states) in: float64 for float64
    inputs, float32 for everything else (half-precision inputs are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=8)
def _parse_checks(value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", ""):
        return False
    raise ValueError(
        f"LONGREACH_CHECKS must be '1' or 'true' (check tensor values on every device) or "
        f"'0', '' or unset (only on CPU), got {value!r}"
    )


def debug_checks() -> bool:
    """Whether LONGREACH_CHECKS asks for value checks on every device ("1"/"true"; "0", ""
    or unset: no). Any other value is a ValueError."""
    return _parse_checks(os.environ.get("LONGREACH_CHECKS", ""))


def needs_value_check(tensor: torch.Tensor) -> bool:
    """Whether to run a check that reads `tensor`'s values on the host: always for CPU tensors
    (no synchronisation), on other devices only under LONGREACH_CHECKS=1."""
    return tensor.device.type == "cpu" or debug_checks()


_first_config_depth = 0  # open autotune_override("first") blocks
_tuned_prune = None  # Triton's own Autotuner.prune_configs while they are open


@contextlib.contextmanager
def autotune_override(mode: str) -> Iterator[None]:
    """Within the block, how Triton's `@triton.autotune` kernels pick a config on the first
    call of each shape: "first" takes the first config surviving the kernel's own pruning
    instead of timing them all; "full" changes nothing (Triton's autotuning as usual).

    For benchmarks and GPU test runs on a time budget: fla-core's kernels time up to 24 configs
    per kernel and shape, several minutes on the first call. The kernels compute the same
    function with any valid config; only the speed can differ (a tuned kernel is at least as
    fast, up to noise). A config chosen inside stays in the kernel's cache for that shape after
    the block. Triton's Autotuner is restored on exit; blocks nest.
    """
    global _first_config_depth, _tuned_prune
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"autotune mode must be one of {AUTOTUNE_MODES}, got {mode!r}")
    if mode == "full":
        yield
        return
    from triton.runtime.autotuner import Autotuner

    if _first_config_depth == 0:
        tuned = _tuned_prune = Autotuner.prune_configs

        def first_config(self, *args, **kwargs):
            return tuned(self, *args, **kwargs)[:1]

        Autotuner.prune_configs = first_config
    _first_config_depth += 1
    try:
        yield
    finally:
        _first_config_depth -= 1
        if _first_config_depth == 0:
            Autotuner.prune_configs = _tuned_prune
            _tuned_prune = None
