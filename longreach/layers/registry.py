"""The token-mixer registry.

A model's ``mixers`` list names one mixer per layer. Each entry is a registered name or a
dict ``{"type": name, **options}``; options left out take the defaults of the mixer's
``Options`` dataclass (``longreach.layers.base``). New mixers register here
(``@register_mixer("name")``) and never touch the model file.
"""

from __future__ import annotations

from dataclasses import dataclass

from longreach.layers.base import Mixer, MixerOptions

_MIXERS: dict[str, MixerEntry] = {}


@dataclass(frozen=True)
class MixerEntry:
    name: str
    cls: type[Mixer]
    options: type[MixerOptions]


def register_mixer(name: str, options: type[MixerOptions] | None = None):
    """Class decorator: make the ``Mixer`` subclass available as mixer ``name``.

    ``options`` (default: the class's ``Options``) is the dataclass of its options; one class
    may be registered under several names with different options classes (``full`` and
    ``swa`` share one attention class and differ in the window's default).
    """

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"mixer {name!r} must be a subclass of longreach.layers.base.Mixer")
        opts = options or cls.Options
        if not (isinstance(opts, type) and issubclass(opts, MixerOptions)):
            raise TypeError(f"mixer {name!r}: options must be a MixerOptions dataclass")
        if name in _MIXERS and _MIXERS[name].cls is not cls:
            raise ValueError(f"mixer {name!r} is already registered to {_MIXERS[name].cls.__name__}")
        _MIXERS[name] = MixerEntry(name, cls, opts)
        return cls

    return wrap


def unregister_mixer(name: str) -> None:
    """Remove mixer ``name`` from the registry (for plug-ins and tests that add their own)."""
    _MIXERS.pop(name, None)


def available_mixers() -> list[str]:
    return sorted(_MIXERS)


def split_spec(spec: str | dict) -> tuple[str, dict]:
    """A ``mixers`` entry -> (name, the options it gives). Raises ValueError."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        if "type" not in spec:
            raise ValueError(f"mixer entry {spec!r} has no 'type' key")
        return spec["type"], {k: v for k, v in spec.items() if k != "type"}
    raise ValueError(f"a mixer entry must be a name or a dict, got {type(spec).__name__}: {spec!r}")


def make_options(options_cls: type[MixerOptions], name: str, given: dict,
                 layer_idx: int | None = None) -> MixerOptions:
    """``options_cls(**given)``, validated; errors name the mixer (and the layer)."""
    where = f"layer {layer_idx}: " if layer_idx is not None else ""
    unknown = sorted(set(given) - set(options_cls.names()))
    if unknown:
        raise ValueError(
            f"{where}mixer {name!r} got unknown option(s) {unknown}; "
            f"valid options: {sorted(options_cls.names())}"
        )
    options = options_cls(**given)
    try:
        options.validate()
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    return options


def resolve_mixer(spec: str | dict, layer_idx: int | None = None) -> tuple[MixerEntry, MixerOptions]:
    """Turn a ``mixers`` entry into (registry entry, complete validated options)."""
    name, given = split_spec(spec)
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(available_mixers())}")
    entry = _MIXERS[name]
    return entry, make_options(entry.options, name, given, layer_idx)


def build_mixer(spec: str | dict, config, layer_idx: int) -> Mixer:
    entry, options = resolve_mixer(spec, layer_idx)
    return entry.cls(config, layer_idx, options)
