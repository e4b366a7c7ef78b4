"""``--attention``: evaluate a local HF causal LM with a longreach attention plug-in.

    settings = attention_settings("streaming", sinks=4, window=1024)
    apply_attention(model, settings)       # enable_cca / enable_streaming / enable_lm_infinite
    cache = new_bounded_cache(model)       # what the runner prefills segments into

How long prompts stay bounded:
  - ``cca``: the plug-in gives the model a ``CCACache`` by itself (core tokens + a raw window);
  - ``streaming``: a :class:`SinkWindowCache` keeps only the sink tokens and the last
    ``window - 1`` tokens of every layer, which is all a StreamingLLM query can see;
  - ``lm-infinite``: the plug-in needs every key (it reads key positions from the cache
    length), so its cache grows with the context like full attention's and the runner's
    memory check applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

ATTENTION_KINDS = ("full", "cca", "streaming", "lm-infinite")
# option -> default, per kind (the plug-in's own defaults)
_OPTIONS = {
    "cca": {"group_size": 16, "window": 1024},
    "streaming": {"sinks": 4, "window": 1024},
    "lm-infinite": {"sinks": 4, "window": 1024},
}
_PLUGIN_KIND = {"cca": "cca", "streaming": "streaming", "lm-infinite": "lm_infinite"}


def attention_settings(kind: str | None = "full", **options: int | None) -> dict[str, Any] | None:
    """Checked settings for ``kind`` (None for ``full``: the model's own attention).

    ``options`` are ``group_size`` (cca), ``window`` (all) and ``sinks`` (streaming,
    lm-infinite); None means the default. An option the kind does not use is an error.
    """
    kind = (kind or "full").replace("_", "-")
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    given = {k: v for k, v in options.items() if v is not None}
    valid = _OPTIONS.get(kind, {})
    unused = sorted(set(given) - set(valid))
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{flags} do(es) not apply to --attention {kind}"
                         + (f" (it takes {', '.join(sorted(valid))})" if valid else ""))
    if kind == "full":
        return None
    settings: dict[str, Any] = {"kind": kind}
    for name, default in valid.items():
        value = given.get(name, default)
        minimum = 0 if name == "sinks" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        settings[name] = value
    return settings


def check_attention_model(model_dir: str | Path, settings: dict[str, Any] | None) -> None:
    """Refuse, before loading weights, a plug-in for a model it does not support."""
    if not settings:
        return
    from longreach.integrations.hf import SUPPORTED_MODEL_TYPES

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--attention {settings['kind']} plugs into transformers models of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; {model_dir} is {model_type!r} (longreach models "
            "choose their attention in their own config: use --attention full)"
        )


def apply_attention(model, settings: dict[str, Any] | None):
    """Switch ``model`` to the plug-in ``settings`` describe (in place); returns the model."""
    if not settings:
        return model
    from longreach.integrations import hf

    options = {k: v for k, v in settings.items() if k != "kind"}
    enable = {"cca": hf.enable_cca, "streaming": hf.enable_streaming,
              "lm-infinite": hf.enable_lm_infinite}[settings["kind"]]
    return enable(model, **options)


def _plugin_settings(model) -> dict[str, Any] | None:
    from longreach.integrations.hf import CONFIG_KEY

    return getattr(getattr(model, "config", None), CONFIG_KEY, None) or None


def new_bounded_cache(model) -> Cache | None:
    """A cache that stays bounded for a streaming model; None (the model picks) otherwise."""
    settings = _plugin_settings(model)
    if settings and settings.get("kind") == "streaming":
        return SinkWindowCache(model.config.num_hidden_layers, sinks=settings["sinks"],
                               window=settings["window"])
    return None


def plugin_cache_bytes_per_token(model) -> int | None:
    """Cache growth per token under the plug-in (None: no plug-in on this model)."""
    settings = _plugin_settings(model)
    if not settings:
        return None
    cfg = model.config
    element = next(model.parameters()).element_size()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * element
    kind = settings.get("kind")
    if kind == "streaming":
        return 0
    if kind == "cca":
        return -(-per_token // settings["group_size"])  # one core token per group
    return per_token  # lm_infinite keeps every key


class SinkWindowLayer(CacheLayerMixin):
    """One layer's StreamingLLM state: the first ``sinks`` keys/values and the last
    ``window - 1`` ones, which is every key a later query can attend to.

    The kept keys are contiguous up to the newest token, so index distances between the new
    queries and the window keys equal position distances (what the plug-in's mask uses);
    keys carry their RoPE rotation from their original positions.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, *, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window = sinks, window
        self.seen = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        keep = self.sinks + self.window - 1
        if keys.shape[-2] > keep:
            tail = keys.shape[-2] - (self.window - 1)
            self.keys = torch.cat([keys[..., : self.sinks, :], keys[..., tail:, :]], dim=-2)
            self.values = torch.cat([values[..., : self.sinks, :], values[..., tail:, :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # older signatures pass cache_position
            query_length = query_length.shape[0]
        held = 0 if self.keys is None else self.keys.shape[-2]
        return held + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen  # new tokens get positions after every token seen, not just the kept

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def offload(self):
        return None

    def prefetch(self):
        return None


class SinkWindowCache(Cache):
    """A transformers ``Cache`` of :class:`SinkWindowLayer`: bounded memory for a model
    switched to StreamingLLM attention with ``enable_streaming``."""

    def __init__(self, num_layers: int, *, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        super().__init__(layers=[SinkWindowLayer(sinks=sinks, window=window)
                                 for _ in range(num_layers)])

    @property
    def is_compileable(self) -> bool:
        return False

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0, *args) -> int:
        return self.layers[layer_idx or 0].seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args):
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def crop(self, max_length: int):
        raise ValueError("a SinkWindowCache cannot be cropped: dropped tokens are gone")

    def num_tokens(self) -> list[int]:
        """Keys held per layer (at most sinks + window - 1 between forward calls)."""
        return [0 if layer.keys is None else layer.keys.shape[-2] for layer in self.layers]


def resolve_attention(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``"cca"`` or ``{"kind": "cca", "window": 512}`` or None -> checked settings (or None)."""
    if value is None or isinstance(value, str):
        return attention_settings(value)
    if not isinstance(value, dict) or "kind" not in value:
        raise ValueError(f"attention must be a kind name or a dict with a 'kind', got {value!r}")
    options = {k: v for k, v in value.items() if k != "kind"}
    return attention_settings(value["kind"], **options)
