"""Long-context attention for pretrained transformers Llama / Qwen2 / Mistral causal LMs.

    model = AutoModelForCausalLM.from_pretrained(path)
    enable_cca(model, group_size=16, window=1024)    # or enable_streaming / enable_lm_infinite
    model.generate(ids)                               # uses a bounded CCACache by itself
    restore_attention(model)                          # back to the model's own attention

How it plugs in, through public extension points only:
  - one attention function registered with ``transformers.AttentionInterface`` under the name
    ``"longreach"``; ``model.set_attn_implementation("longreach")`` selects it for one model;
  - the settings live in that model's config (``config.longreach_attention``, a plain dict), so
    two models in one process can use different settings and ``save_pretrained`` writes them
    to config.json; ``from_pretrained`` / ``enable_from_config`` restore them after loading;
  - a forward pre-hook on the model's decoder (``torch.nn.Module.register_forward_pre_hook``)
    gives CCA a ``CCACache`` and StreamingLLM / LM-Infinite a ``SinkWindowCache`` when the
    model would otherwise build a full ``DynamicCache`` (plain ``model(..., use_cache=True)``
    and ``generate``), and hands the attention function the cache and the RoPE frequencies
    through the keyword arguments transformers forwards to it. Nothing global is patched;
    ``restore_attention`` removes the hook.

The methods are registered in ``PLUGINS`` (name -> :class:`AttentionPlugin`: its enable
function, options and defaults, the generation cache that keeps it bounded, its cache growth
per token). Names are ``cca``, ``streaming`` and ``lm-infinite``; ``lm_infinite``, the
spelling of earlier versions, is read as ``lm-infinite`` (so saved config.json files load).

Padded batches are not supported (every attention_mask entry must be 1).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.cache_utils import Cache, DynamicCache

from longreach.cache.cca import CCACache
from longreach.cache.sink import SinkWindowCache
from longreach.models.compat import cache_argument, one_cache
from longreach.ops import attention
from longreach.ops.cca import cca_attention
from longreach.ops.lm_infinite import lm_infinite_attention

ATTENTION_NAME = "longreach"
CONFIG_KEY = "longreach_attention"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ALIASES = {"lm_infinite": "lm-infinite"}  # the spelling of earlier versions
_HOOK_ATTR = "_longreach_attention_hook"


# ---------------------------------------------------------------- the attention function


def longreach_attention_forward(
    module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs
):
    """The registered attention function: q [B, HQ, T, D], k, v [B, H, S, D] (post-RoPE).

    Returns (output [B, T, HQ, D], None) as transformers' attention functions do. The method
    and its options come from ``module.config.longreach_attention``.
    """
    settings = getattr(module.config, CONFIG_KEY, None)
    if not settings:
        raise ValueError(
            "attention implementation 'longreach' is selected but the config has no "
            f"{CONFIG_KEY!r} settings: call enable_cca / enable_streaming / enable_lm_infinite"
        )
    q, k, v = _one_dtype(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    kind = _ALIASES.get(settings["kind"], settings["kind"])
    if kind == "cca":
        cache = kwargs.get("longreach_cache")
        if cache is not None:
            state = cache.state(module.layer_idx)
            state.scale = scaling
            return state.step(q, k, v), None
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                "CCA got keys from a cache that is not a CCACache; pass past_key_values=None "
                "or a cache from longreach.integrations.hf.new_cache(model)"
            )
        out = cca_attention(
            q, k, v, group_size=settings["group_size"], window=settings["window"],
            scale=scaling, core_heads="kv",
        )
        return out, None
    # the keys end at the newest query: index S - T .. S - 1 relative to the first key
    start = k.shape[1] - q.shape[1]
    q_pos = torch.arange(start, k.shape[1], device=q.device)
    if kind == "streaming":  # index distances are position distances in a SinkWindowCache
        out = attention(
            q, k, v, causal=True, window=settings["window"], sinks=settings["sinks"],
            scale=scaling, q_pos=q_pos, k_pos=torch.arange(k.shape[1], device=q.device),
        )
        return out, None
    if kind == "lm-infinite":  # the distance cap needs positions in the text, not indices
        q_pos, k_pos, bounds = _positions(kwargs.get("longreach_cache"), module.layer_idx,
                                          q.shape[1], k.shape[1], settings["sinks"], q.device)
        out = lm_infinite_attention(
            q, k, v, q_pos, sinks=settings["sinks"], window=settings["window"],
            inv_freq=kwargs.get("longreach_inv_freq"), scale=scaling, k_pos=k_pos,
            position_bounds=bounds,
        )
        return out, None
    raise ValueError(f"unknown {CONFIG_KEY} kind {kind!r}; valid kinds: {', '.join(PLUGINS)}")


def _one_dtype(q, k, v):
    """q, k, v in one dtype: under autocast, transformers' RoPE leaves q and k in the float32
    of the weights while v comes from an autocast matmul; all go to the autocast dtype."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _positions(cache, layer: int, n_queries: int, n_keys: int, sinks: int, device):
    """Text positions of the queries and the keys a layer attends over, and their
    ``position_bounds`` (as ints, so the op reads nothing back). A SinkWindowCache that has
    dropped keys holds the ``sinks`` first ones, then a contiguous run ending at the newest
    token; any other cache (or none) holds every key from position 0."""
    seen = n_keys if cache is None else cache.get_seq_length(layer)
    q_pos = torch.arange(seen - n_queries, seen, device=device)
    if seen == n_keys:
        return q_pos, torch.arange(n_keys, device=device), (
            seen - n_queries, seen - 1, 0, n_keys - 1, min(sinks, n_keys))
    kept = min(sinks, n_keys)
    tail = seen - (n_keys - kept)  # the first position of the contiguous run
    k_pos = torch.cat([torch.arange(kept, device=device),
                       torch.arange(tail, seen, device=device)])
    below = kept + max(0, min(sinks, seen) - tail)  # keys at positions < sinks
    return q_pos, k_pos, (seen - n_queries, seen - 1, 0 if kept else tail, seen - 1, below)


AttentionInterface.register(ATTENTION_NAME, longreach_attention_forward)


# ---------------------------------------------------------------- per-model settings


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type {model_type!r}); longreach "
            f"attention supports transformers models of type {SUPPORTED_MODEL_TYPES}"
        )


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _enable(model, settings: dict):
    _check_model(model)
    previous = getattr(model.config, CONFIG_KEY, None)
    current = model.config._attn_implementation
    if previous and current == ATTENTION_NAME:
        settings["previous"] = previous.get("previous", "sdpa")
    else:
        settings["previous"] = current if current != ATTENTION_NAME else "sdpa"
    setattr(model.config, CONFIG_KEY, settings)
    model.set_attn_implementation(ATTENTION_NAME)
    base = model.base_model
    old = getattr(base, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
    setattr(base, _HOOK_ATTR, base.register_forward_pre_hook(_before_forward, with_kwargs=True))
    return model


def enable_cca(model, *, group_size: int = 16, window: int = 1024):
    """Switch a Llama / Qwen2 / Mistral model to CCA attention (in place); returns the model.

    Core tokens are pooled per key/value head; a cached model keeps per layer and key/value
    head at most T / group_size + window + group_size tokens. Calling it again updates the
    settings; start a new cache after a change.
    """
    return _enable(model, PLUGINS["cca"].settings(group_size=group_size, window=window))


def enable_streaming(model, *, sinks: int = 4, window: int = 1024):
    """StreamingLLM (Xiao et al., 2024): each query sees the first ``sinks`` tokens and the
    last ``window`` tokens (itself included), at their original positions."""
    return _enable(model, PLUGINS["streaming"].settings(sinks=sinks, window=window))


def enable_lm_infinite(model, *, sinks: int = 4, window: int = 1024):
    """LM-Infinite: the first ``sinks`` tokens and the last ``window`` tokens, with the relative
    distance capped at ``window`` (see ``longreach.ops.lm_infinite``)."""
    return _enable(model, PLUGINS["lm-infinite"].settings(sinks=sinks, window=window))


def restore_attention(model):
    """Undo enable_*: the model's previous attention implementation, no hook, no settings."""
    _check_model(model)
    settings = getattr(model.config, CONFIG_KEY, None)
    base = model.base_model
    hook = getattr(base, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(base, _HOOK_ATTR)
    if settings:
        model.set_attn_implementation(settings.get("previous", "sdpa"))
        delattr(model.config, CONFIG_KEY)
    return model


def enable_from_config(model):
    """Re-apply the settings ``save_pretrained`` wrote to config.json (no-op without them)."""
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        return model
    return enable(model, {k: v for k, v in settings.items() if k != "previous"})


def from_pretrained(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` followed by ``enable_from_config``."""
    return enable_from_config(AutoModelForCausalLM.from_pretrained(path, **kwargs))


def new_cache(model) -> CCACache:
    """An empty CCACache for a CCA-enabled model (to pass as ``past_key_values=``)."""
    settings = plugin_settings(model) or {}
    if settings.get("kind") != "cca":
        raise ValueError("new_cache needs a model switched to CCA with enable_cca")
    return _cca_cache(model, settings)


def _is_fresh(cache) -> bool:
    # generate builds an empty DynamicCache unless the caller passed one
    return (
        isinstance(cache, DynamicCache)
        and cache.get_seq_length() == 0
        and not getattr(cache, "_is_user_defined", False)
    )


def _before_forward(base, args, kwargs):
    """Pick the cache this method needs and pass the attention function what it reads."""
    settings = plugin_settings(base)
    if not settings or base.config._attn_implementation != ATTENTION_NAME:
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
        raise ValueError(
            "padded batches are not supported with longreach attention: attention_mask must be "
            "all ones (run prompts of different lengths separately)"
        )
    # transformers renamed the decoder's `past_key_values` argument to `cache` (5.2x; the old
    # name is converted until 5.40): read whichever the caller used, pass the one it takes
    name = cache_argument(type(base))
    cache = one_cache(kwargs.pop("past_key_values", None), kwargs.pop("cache", None))
    use_cache = kwargs.get("use_cache")
    use_cache = base.config.use_cache if use_cache is None else use_cache
    if _ALIASES.get(settings["kind"], settings["kind"]) == "cca":
        # training passes whole sequences: the full-sequence op, no cache to fill
        if (cache is None and use_cache and not base.training) or _is_fresh(cache):
            cache = new_cache(base)
        if cache is not None and not isinstance(cache, CCACache):
            raise ValueError(
                f"a CCA model needs a longreach CCACache, got {type(cache).__name__}: pass "
                "past_key_values=None or longreach.integrations.hf.new_cache(model)"
            )
        if cache is not None and (cache.group_size, cache.window) != (
            settings["group_size"], settings["window"]
        ):
            raise ValueError(
                f"the CCACache was made for group_size={cache.group_size}, window={cache.window}; "
                f"the model now uses {settings['group_size']}, {settings['window']}: start a new cache"
            )
        kwargs[name] = cache
        kwargs["longreach_cache"] = cache
    else:
        # a bounded cache of the sinks and the window (a config-built DynamicCache could drop
        # the sinks in sliding-window layers); a cache the caller passed is used as it is
        if (cache is None and use_cache and not base.training) or _is_fresh(cache):
            cache = _sink_window_cache(base, settings)
        kwargs[name] = cache
        kwargs["longreach_cache"] = cache
        rotary = getattr(base, "rotary_emb", None)
        kwargs["longreach_inv_freq"] = getattr(rotary, "inv_freq", None)
    return args, kwargs


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class AttentionPlugin:
    """One attention method of the plug-in.

    ``enable(model, **options)`` switches a model to it; its keyword-only arguments are the
    options and their defaults. ``new_cache(model, settings)`` is the generation cache that
    keeps the method bounded (None: the forward hook's own, a DynamicCache that keeps every
    key). ``bytes_per_token(model, settings)`` is how much that cache grows per token.
    """

    name: str
    enable: Callable
    new_cache: Callable[..., Cache | None]
    bytes_per_token: Callable[..., int]
    minimums: dict[str, int] = field(default_factory=dict)  # option -> smallest value (else 1)
    check: Callable[[dict], None] | None = None  # ValueError for options that do not fit together

    @functools.cached_property
    def options(self) -> dict[str, int]:
        """Option -> default."""
        params = inspect.signature(self.enable).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def settings(self, **options) -> dict:
        """``{"kind": name, option: value, ...}`` with defaults for the options not given;
        ValueError for an option the method does not take or a value out of range."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"attention {self.name!r} takes {', '.join(self.options)}; got "
                             f"{', '.join(unknown)}")
        values = {**self.options, **options}
        settings = {"kind": self.name, **{name: _check_size(name, value, self.minimums.get(name, 1))
                                          for name, value in values.items()}}
        if self.check is not None:
            self.check(settings)
        return settings


def kv_cache_bytes_per_token(model) -> int:
    """Cache growth per token of a model keeping keys and values of every token in every
    layer (a transformers model's own attention)."""
    cfg = model.config
    element = next(model.parameters()).element_size()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * element


def _check_cca(settings: dict) -> None:
    if settings["window"] < settings["group_size"]:
        raise ValueError(
            f"cca window={settings['window']} is smaller than group_size="
            f"{settings['group_size']}: the exact window must hold at least one group "
            "(CCA-Attention uses window >= group size, e.g. 1024 and 16)"
        )


def _cca_cache(model, settings) -> CCACache:
    return CCACache(model.config.num_hidden_layers, group_size=settings["group_size"],
                    window=settings["window"])


def _sink_window_cache(model, settings) -> SinkWindowCache:
    return SinkWindowCache(model.config.num_hidden_layers, sinks=settings["sinks"],
                           window=settings["window"])


PLUGINS: dict[str, AttentionPlugin] = {
    plugin.name: plugin for plugin in (
        # one pooled core token per group; the raw window is bounded
        AttentionPlugin("cca", enable_cca, _cca_cache,
                        lambda model, s: -(-kv_cache_bytes_per_token(model) // s["group_size"]),
                        check=_check_cca),
        AttentionPlugin("streaming", enable_streaming, _sink_window_cache, lambda model, s: 0,
                        minimums={"sinks": 0}),
        # the sinks and the window, like streaming; the cache's token count gives positions
        AttentionPlugin("lm-infinite", enable_lm_infinite, _sink_window_cache,
                        lambda model, s: 0, minimums={"sinks": 0}),
    )
}


def get_plugin(name: str) -> AttentionPlugin:
    """The plug-in called ``name`` (``lm_infinite`` is read as ``lm-infinite``)."""
    plugin = PLUGINS.get(_ALIASES.get(name, name))
    if plugin is None:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(PLUGINS)}")
    return plugin


def enable(model, settings: dict):
    """Switch ``model`` to ``{"kind": name, option: value, ...}`` (in place); returns it."""
    plugin = get_plugin(settings.get("kind"))
    options = {k: v for k, v in settings.items() if k != "kind"}
    plugin.settings(**options)  # a ValueError naming a bad option before the model changes
    return plugin.enable(model, **options)


def plugin_settings(model) -> dict | None:
    """The settings of the plug-in ``model`` is switched to (None: its own attention)."""
    return getattr(getattr(model, "config", None), CONFIG_KEY, None) or None


def generation_cache(model) -> Cache | None:
    """A new cache that keeps generation with the model's plug-in bounded (None: no plug-in,
    or one whose cache the forward hook builds)."""
    settings = plugin_settings(model)
    return None if settings is None else get_plugin(settings["kind"]).new_cache(model, settings)


def cache_bytes_per_token(model) -> int | None:
    """Bytes the plug-in's generation cache grows by per token (None: no plug-in)."""
    settings = plugin_settings(model)
    if settings is None:
        return None
    return get_plugin(settings["kind"]).bytes_per_token(model, settings)
