"""Configuration of a GCA language model (``model_type`` ``"longreach-gca"``).

A GCA model is a longreach decoder whose upper layers are ``"gca"`` layers (sliding window +
GCA over retrieved chunks) on top of a lower stack of ordinary mixers (e.g. 6 ``swa`` then
6 ``gca``); ``gca`` holds the model-level retrieval settings (``GCA_DEFAULTS``).

Configs saved before GCA had a family of its own (``model_type`` ``"longreach"`` with gca
layers: the shipped ``gca-tiny`` and runs trained then) load as a ``GCAConfig``.
"""

from __future__ import annotations

from longreach.cache.gca import parse_memory
from longreach.layers.gca import GCAMixer
from longreach.layers.registry import make_options, split_spec
from longreach.models.longreach.configuration_longreach import LongReachConfig

LANDMARK_KINDS = ("token", "cls", "mean")

GCA_DEFAULTS = {
    "chunk_size": 64,  # positions per chunk (with landmark="token": 63 text tokens + 1 landmark)
    "landmark": "token",  # token (in-stream landmark, the paper) | cls | mean (HSA-style pooling)
    "encoder_layers": 2,  # bidirectional layers in the chunk encoder
    "top_k": 8,  # chunks retrieved per query chunk
    "retrieval_groups": 1,  # retrievals per forward: the upper layers split into this many groups
    "gumbel": True,  # Gumbel noise on the top-k selection while training
    "gumbel_scale": 1.0,  # its scale (0: none); the fusion weights never see the noise
    "bypass": False,  # the read also joins the residual stream, not only the MLP input
    "memory": "cpu",  # where generation caches keep chunk keys/values: cpu | device | disk:PATH
}


def gca_settings(gca: dict | None) -> dict:
    """The complete GCA settings (defaults filled in). Raises ValueError on a bad entry."""
    given = dict(gca or {})
    unknown = sorted(set(given) - set(GCA_DEFAULTS))
    if unknown:
        raise ValueError(f"gca got unknown option(s) {unknown}; valid options: {sorted(GCA_DEFAULTS)}")
    s = {**GCA_DEFAULTS, **given}
    for key in ("chunk_size", "top_k", "retrieval_groups"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"gca.{key} must be a positive integer, got {s[key]!r}")
    if isinstance(s["encoder_layers"], bool) or not isinstance(s["encoder_layers"], int) or s["encoder_layers"] < 0:
        raise ValueError(f"gca.encoder_layers must be a non-negative integer, got {s['encoder_layers']!r}")
    if s["landmark"] not in LANDMARK_KINDS:
        raise ValueError(f"gca.landmark must be one of {LANDMARK_KINDS}, got {s['landmark']!r}")
    if s["landmark"] == "token" and s["chunk_size"] < 2:
        raise ValueError("gca.chunk_size must be >= 2 with landmark='token' (one slot is the landmark)")
    for key in ("gumbel", "bypass"):
        if not isinstance(s[key], bool):
            raise ValueError(f"gca.{key} must be true or false, got {s[key]!r}")
    scale = s["gumbel_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"gca.gumbel_scale must be a number >= 0, got {scale!r}")
    s["gumbel_scale"] = float(scale)
    parse_memory(s["memory"])
    return s




def is_gca_layer(spec) -> bool:
    return isinstance(spec, (str, dict)) and (spec if isinstance(spec, str) else spec.get("type")) == "gca"


class GCAConfig(LongReachConfig):
    """``LongReachConfig`` plus ``gca`` (model-level settings, defaults in ``GCA_DEFAULTS``).
    ``mixers`` entries of type ``"gca"`` (options: ``window`` 512, ``sinks`` 0, ``position``
    alibi, ``rope_theta``) must form the top of the stack."""

    model_type = "longreach-gca"

    def __init__(self, gca: dict | None = None, **kwargs):
        self.gca = gca
        if kwargs.get("mixers") is None:  # a valid default: sliding windows, then gca layers
            n = kwargs.get("num_hidden_layers", 4)
            kwargs["mixers"] = ["swa"] * (n // 2) + ["gca"] * (n - n // 2)
        super().__init__(**kwargs)

    def check_mixer(self, i: int, spec) -> None:
        if is_gca_layer(spec):
            make_options(GCAMixer.Options, "gca", split_spec(spec)[1], i)
        else:
            super().check_mixer(i, spec)

    def validate_longreach(self) -> None:
        super().validate_longreach()
        layers = self.gca_layers
        if not layers:
            raise ValueError("a GCA model needs at least one 'gca' layer in mixers")
        if layers != list(range(layers[0], self.num_hidden_layers)):
            raise ValueError(
                f"gca layers must form the top of the stack (every layer after the first gca "
                f"layer is gca), got gca at layers {layers} of {self.num_hidden_layers}"
            )
        self.gca = gca_settings(self.gca)

    @property
    def gca_layers(self) -> list[int]:
        """Indices of the layers whose mixer is ``"gca"``."""
        return [i for i, spec in enumerate(self.mixers) if is_gca_layer(spec)]


def describes_gca(config_dict: dict) -> bool:
    """Whether a config dict (or a recipe's ``model:`` section) has gca layers or settings."""
    mixers = config_dict.get("mixers")
    specs = mixers if isinstance(mixers, list) else [mixers]
    return config_dict.get("gca") is not None or any(is_gca_layer(s) for s in specs)


def read_legacy_config(config_dict: dict, **kwargs):
    """A GCAConfig for a config.json saved as ``model_type`` "longreach" with gca layers
    (before GCA had a family of its own); None for any other."""
    if not describes_gca(config_dict):
        return None
    return GCAConfig.from_dict({**config_dict, "model_type": GCAConfig.model_type}, **kwargs)
