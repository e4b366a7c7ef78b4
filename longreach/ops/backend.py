"""Which implementation an op runs: its Triton kernel or its pure-PyTorch reference.

Ops with a Triton kernel (CCA, GCA) use it for CUDA tensors when Triton imports, and the
reference otherwise. `impl=` on the op, or the environment variable LONGREACH_KERNELS,
forces either: "triton" or "reference" ("auto" = the default rule). Other values of the
variable name paths of other ops (e.g. "sdpa" or "flex" for `longreach.ops.attention`) and
mean "auto" for ops that do not have them.

Under TRITON_INTERPRET=1 (set before the kernels are imported) Triton runs its kernels on CPU
tensors, slowly: tests use it with tiny shapes; "auto" still picks the reference on CPU.
"""

from __future__ import annotations

import functools
import os

import torch

KERNEL_IMPLS = ("auto", "triton", "reference")


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


def select_impl(impl: str | None, *tensors: torch.Tensor, op: str) -> str:
    """'triton' or 'reference' for an op called on `tensors` (see the module docstring)."""
    forced = impl is not None
    if impl is None:
        impl = os.environ.get("LONGREACH_KERNELS") or "auto"
        if impl not in KERNEL_IMPLS:
            impl = "auto"
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"{op}: impl must be one of {KERNEL_IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if impl == "triton":
        if not triton_available():
            raise ValueError(
                f"{op}: the Triton kernel was requested "
                f"({'impl' if forced else 'LONGREACH_KERNELS'}='triton') but Triton is not "
                "installed: pip install triton, or use impl='reference'"
            )
        if not (on_cuda or interpreting()):
            raise ValueError(
                f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run it "
                f"on CPU, slowly); got tensors on {tensors[0].device}"
            )
    return impl


def first_config_autotuning() -> None:
    """Make every Triton `@autotune` kernel compiled from now on in this process take the
    first of its configs that survive the kernel's own pruning, instead of timing them all.

    For benchmarks and GPU test runs that must fit a time budget: fla-core's kernels time up
    to 24 configs per kernel and shape, several minutes on the first call. The kernels compute
    the same function with any valid config; only the speed can differ (a tuned kernel is at
    least as fast, up to noise). Idempotent; there is no way back in the same process.
    """
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    if getattr(prune, "_longreach_first_config", False):
        return

    def first(self, kwargs):
        return prune(self, kwargs)[:1]

    first._longreach_first_config = True
    Autotuner.prune_configs = first
