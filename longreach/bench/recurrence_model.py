"""``longreach bench recurrence --suite model``: one optimizer step of the mamba2-130m recipe
(bf16 autocast, its gradient checkpointing) at its training length 2K, the op on the reference
(LONGREACH_KERNELS=reference) vs the default dispatch.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from longreach.bench.harness import free_memory, length_label

if TYPE_CHECKING:
    from longreach.bench.recurrence import RecurrenceBench

# the smoke test's model: mamba2-tiny with the same (K, V) as the tiny op case
TINY_MODEL_OVERRIDES = ["model.mixers.state_size=8", "model.mixers.head_dim=16",
                        "model.num_hidden_layers=2"]


@contextlib.contextmanager
def kernels_env(value: str | None):
    """Set (or, for None, unset) LONGREACH_KERNELS for the block."""
    old = os.environ.get("LONGREACH_KERNELS")
    if value is None:
        os.environ.pop("LONGREACH_KERNELS", None)
    else:
        os.environ["LONGREACH_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LONGREACH_KERNELS", None)
        else:
            os.environ["LONGREACH_KERNELS"] = old


def run(bench: RecurrenceBench) -> None:
    from longreach.bench.training import measure_training

    recipe, overrides, seq_len, steps, warmup = "mamba2-130m", [], None, 3, 2
    if bench.tiny:
        recipe, overrides, seq_len, steps, warmup = "mamba2-tiny", TINY_MODEL_OVERRIDES, 64, 1, 1
    batch = bench.args.train_batch or (1 if bench.tiny else 8)
    runs = [("reference", "reference")] + ([("fla", None)] if bench.fla else [])
    for kind, env in runs:
        with kernels_env(env):
            r = measure_training(recipe, overrides, device=bench.device, seq_len=seq_len,
                                 batch=batch, steps=steps, warmup=warmup)
        note = f"{r['tokens_per_s']:,} tok/s, {r['params_M']}M params, loss {r['loss']}"
        if "peak_mem_GiB" in r:
            note += f", peak {r['peak_mem_GiB']} GiB"
        bench.add(suite="recurrence-model",
                  case=f"{recipe} T={length_label(r['seq_len'])} B={batch}",
                  pass_="train step", kind=kind,
                  impl=f"{recipe}, op on " + ("fla-core" if kind == "fla" else "the reference"),
                  ms=1e3 * r["step_s"], shape=r, note=note)
        free_memory(bench.device)
