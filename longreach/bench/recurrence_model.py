"""``longreach bench recurrence --suite model``: one optimizer step of the mamba2-130m recipe
(bf16 autocast, its gradient checkpointing) at its training length 2K, measured side by side:

- ``reference``: the op on the PyTorch reference (LONGREACH_KERNELS=reference);
- ``fla-layers``: the same model with every Mamba-2 mixer replaced by flash-linear-attention's
  own `SimpleGatedLinearAttention` layer at the same recurrence shape (24 heads, K=128, V=64,
  a short conv of 4, its fused gated norm): what the same model costs on fla's own layers;
- ``fla-gla-layers``: the same with fla's `GatedLinearAttention` layers (per-key decays, the
  kernel that longreach's Mamba-2 trains on), for where SimpleGLA's backward does not run
  (Hopper GPUs with Triton 3.4-3.7.0: the op module's docstring);
- ``fla``: the default dispatch.

The fla rows need the `flash-linear-attention` package (`fla.layers`); a row whose layers
fail (e.g. fla-core refusing a kernel on this GPU) is reported and skipped.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

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


class FlaMixer(nn.Module):
    """A flash-linear-attention layer (SimpleGLA or GLA) in a longreach block's mixer slot
    (training only: no cache)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def init_state(self):
        return None

    def forward(self, x, positions=None, state=None):
        return self.layer(x)[0]


def fla_layer_class(kind: str = "simple_gla"):
    """flash-linear-attention's SimpleGatedLinearAttention ("simple_gla") or
    GatedLinearAttention ("gla") class, or None when the package is absent."""
    try:
        if kind == "simple_gla":
            from fla.layers.simple_gla import SimpleGatedLinearAttention as layer
        else:
            from fla.layers.gla import GatedLinearAttention as layer
    except ImportError:
        return None
    return layer


def swap_in_fla_layers(model, kind: str = "simple_gla") -> None:
    """Replace every Mamba-2 mixer of ``model`` by an fla layer (``fla_layer_class(kind)``) of
    the same heads, state size (K) and head dim (V), with a short conv of the same size."""
    layer_cls = fla_layer_class(kind)
    hidden = model.config.hidden_size
    for i, block in enumerate(model.model.layers):
        mixer = block.mixer
        heads, K, V = mixer.num_heads, mixer.state_size, mixer.head_dim
        block.mixer = FlaMixer(layer_cls(
            mode="chunk", hidden_size=hidden, expand_k=heads * K / hidden,
            expand_v=heads * V / hidden, num_heads=heads, use_short_conv=mixer.conv.size > 0,
            conv_size=max(mixer.conv.size, 1), layer_idx=i))


def run(bench: RecurrenceBench) -> None:
    from longreach.bench.training import measure_training

    recipe, overrides, seq_len, steps, warmup = "mamba2-130m", [], None, 3, 2
    if bench.tiny:
        recipe, overrides, seq_len, steps, warmup = "mamba2-tiny", TINY_MODEL_OVERRIDES, 64, 1, 1
    batch = bench.args.train_batch or (1 if bench.tiny else 8)
    runs = [("reference", "reference", None, "the op on the reference")]
    if bench.fla:
        if fla_layer_class() is not None:
            runs += [("fla-layers", None, swap_in_fla_layers,
                      "mixers replaced by fla.layers.SimpleGatedLinearAttention"),
                     ("fla-gla-layers", None, partial(swap_in_fla_layers, kind="gla"),
                      "mixers replaced by fla.layers.GatedLinearAttention")]
        else:
            print("[model] flash-linear-attention (fla.layers) not installed: no fla-layers rows",
                  flush=True)
        runs.append(("fla", None, None, "the default dispatch (fla-core chunk_gla)"))
    for kind, env, transform, what in runs:
        try:
            with kernels_env(env):
                r = measure_training(recipe, overrides, device=bench.device, seq_len=seq_len,
                                     batch=batch, steps=steps, warmup=warmup,
                                     transform=transform)
        except RuntimeError as err:
            if transform is None:
                raise
            print(f"[model] {kind} skipped: {str(err).splitlines()[0]}", flush=True)
            free_memory(bench.device)
            continue
        note = f"{r['tokens_per_s']:,} tok/s, {r['params_M']}M params, loss {r['loss']}"
        if "peak_mem_GiB" in r:
            note += f", peak {r['peak_mem_GiB']} GiB"
        bench.add(suite="recurrence-model",
                  case=f"{recipe} T={length_label(r['seq_len'])} B={batch}",
                  pass_="train step", kind=kind, impl=f"{recipe}, {what}",
                  ms=1e3 * r["step_s"], shape=r, note=note)
        free_memory(bench.device)
