"""Passing and reading generation caches across transformers versions.

transformers 5.2x renamed the cache argument of its models' `forward` (and the field of their
outputs) from `past_key_values` to `cache`; the old name is converted, with a warning, until
5.40. longreach supports `transformers>=5.17,<6`, so code that drives a model it did not build
(a Hugging Face Llama, say) passes the cache under the name that model takes and reads it back
from either field. longreach's own models take both names. Gradient checkpointing was renamed
the same way (``enable_checkpointing``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from transformers.modeling_outputs import CausalLMOutputWithPast


@functools.cache
def cache_argument(cls) -> str:
    """The name under which `cls.forward` takes its cache: "cache" or "past_key_values"."""
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` to pass to `model(...)`, under the name its forward takes."""
    return {cache_argument(type(model)): cache}


def one_cache(past_key_values, cache):
    """The cache a caller passed under either name (a ValueError if it passed two)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("pass the cache once: past_key_values and cache are two different objects")
    return cache


@functools.cache
def _has_cache_field(cls) -> bool:
    return "cache" in {f.name for f in dataclasses.fields(cls)}


def output_cache(out):
    """The cache a model output carries, whichever transformers version made it."""
    return out.cache if _has_cache_field(type(out)) else out.past_key_values


def output_fields(cls, cache) -> dict:
    """``{name: cache}`` for building output class ``cls`` under the field name it has (the
    old name makes newer transformers warn on every forward)."""
    return {"cache" if _has_cache_field(cls) else "past_key_values": cache}


def generate_cache_kwargs(cache) -> dict:
    """``{name: cache}`` to pass to ``generate(...)``: the name under which this transformers
    version's ``generate`` keeps the cache (it renamed the key together with the output field)."""
    return {"cache" if _has_cache_field(CausalLMOutputWithPast) else "past_key_values": cache}


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing on ``model``: newer transformers renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    warns); older ones have only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
