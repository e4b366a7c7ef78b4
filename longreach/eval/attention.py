"""``--attention``: evaluate a local HF causal LM with a longreach attention plug-in.

    settings = attention_settings("streaming", sinks=4, window=1024)
    check_attention_model(model_dir, settings)   # before loading the weights
    apply_attention(model, settings)             # hf.enable: enable_cca / enable_streaming / ...

A folder saved with a plug-in switched on (``longreach finetune --attention cca`` writes its
settings to config.json, ``longreach_attention``) is evaluated with those settings when no
plug-in is asked for (``full``, the default), as ``hf.from_pretrained`` loads it:
``saved_attention(model_dir)``. Plain ``from_pretrained`` would keep the settings in the
config but run the model's own attention, and the bounded cache the settings describe would
not match it.

The plug-ins, their options and defaults, their generation caches and their cache growth are
``longreach.integrations.hf.PLUGINS``; this module turns the command line's value into
settings. How long prompts stay bounded:
  - ``cca``: a ``CCACache`` (core tokens + a raw window);
  - ``streaming``: a ``SinkWindowCache`` keeps only the sink tokens and the last
    ``window - 1`` tokens of every layer, which is all a StreamingLLM query can see;
  - ``lm-infinite``: the plug-in needs every key (it reads key positions from the cache
    length), so its cache grows with the context like full attention's and the runner's
    memory check applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longreach.integrations import hf

ATTENTION_KINDS = ("full", *hf.PLUGINS)  # full: the model's own attention


def attention_settings(kind: str | None = "full", **options: int | None) -> dict[str, Any] | None:
    """Checked settings for ``kind`` (None for ``full``: the model's own attention).

    ``options`` are the plug-in's (``group_size``, ``window``, ``sinks``); None means the
    default. An option the kind does not use is an error naming its command-line flag.
    """
    kind = kind or "full"
    plugin = None if kind == "full" else hf.get_plugin(kind)  # ValueError for unknown names
    given = {k: v for k, v in options.items() if v is not None}
    valid = plugin.options if plugin else {}
    unused = sorted(set(given) - set(valid))
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{flags} do(es) not apply to --attention {kind}"
                         + (f" (it takes {', '.join(sorted(valid))})" if valid else ""))
    return plugin.settings(**given) if plugin else None


def resolve_attention(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``"cca"`` or ``{"kind": "cca", "window": 512}`` or None -> checked settings (or None)."""
    if value is None or isinstance(value, str):
        return attention_settings(value)
    if not isinstance(value, dict) or "kind" not in value:
        raise ValueError(f"attention must be a kind name or a dict with a 'kind', got {value!r}")
    options = {k: v for k, v in value.items() if k != "kind"}
    return attention_settings(value["kind"], **options)


def saved_attention(model_dir: str | Path) -> dict[str, Any] | None:
    """The checked plug-in settings a model folder's config.json carries (None: none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    saved = config.get(hf.CONFIG_KEY)
    if not saved:
        return None
    try:
        return resolve_attention({k: v for k, v in saved.items() if k != "previous"})
    except ValueError as err:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: {hf.CONFIG_KEY}: {err}") from None


def check_attention_model(model_dir: str | Path, settings: dict[str, Any] | None) -> None:
    """Refuse, before loading weights, a plug-in for a model it does not support."""
    if not settings:
        return
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--attention {settings['kind']} plugs into transformers models of type "
            f"{', '.join(hf.SUPPORTED_MODEL_TYPES)}; {model_dir} is {model_type!r} (longreach "
            "models choose their attention in their own config: use --attention full)"
        )


def apply_attention(model, settings: dict[str, Any] | None):
    """Switch ``model`` to the plug-in ``settings`` describe (in place); returns the model."""
    return hf.enable(model, settings) if settings else model
