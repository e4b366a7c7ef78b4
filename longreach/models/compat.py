"""Passing and reading generation caches across transformers versions.

transformers 5.2x renamed the cache argument of its models' `forward` (and the field of their
outputs) from `past_key_values` to `cache`; the old name is converted, with a warning, until
5.40. longreach supports `transformers>=5.17,<6`, so code that drives a model it did not build
(a Hugging Face Llama, say) passes the cache under the name that model takes and reads it back
from either field. longreach's own models take both names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect


@functools.cache
def cache_argument(cls) -> str:
    """The name under which `cls.forward` takes its cache: "cache" or "past_key_values"."""
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` to pass to `model(...)`, under the name its forward takes."""
    return {cache_argument(type(model)): cache}


def output_cache(out):
    """The cache a model output carries, whichever transformers version made it."""
    if "cache" in {f.name for f in dataclasses.fields(out)}:
        return out.cache
    return out.past_key_values
