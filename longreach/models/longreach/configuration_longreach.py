"""Configuration of a longreach decoder language model."""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig

from longreach.layers import resolve_mixer


class LongReachConfig(PretrainedConfig):
    """A pre-norm decoder LM whose token mixer is chosen per layer.

    ``mixers`` has one entry per layer: a mixer name (``"full"``, ``"swa"``, ...) or a dict
    ``{"type": name, **options}``, e.g. ``{"type": "swa", "window": 512, "sinks": 4}``.
    A single entry (not a list) is used for every layer. Defaults to ``"full"``.
    ``max_position_embeddings=None`` means no length limit (the point of this library);
    set it to make longer inputs an error.

    Model families built on this decoder (GCA: ``longreach.models.gca.GCAConfig``) subclass
    it and add their own settings.
    """

    model_type = "longreach"
    keys_to_ignore_at_inference = ["past_key_values"]
    # readers of config.json files that other families saved under model_type "longreach"
    # before they had a model_type of their own: each returns a config, or None
    legacy_readers: ClassVar[list] = []

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if cls is LongReachConfig:
            for read in cls.legacy_readers:
                config = read(config_dict, **kwargs)
                if config is not None:
                    return config
        return super().from_dict(config_dict, **kwargs)

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        mixers=None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = 256,
        eos_token_id: int | None = 257,
        pad_token_id: int | None = 258,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        # SwiGLU with ~8/3 expansion keeps the MLP's parameter count at a 4x GELU MLP's
        self.intermediate_size = intermediate_size or _round_up(8 * hidden_size // 3, 64)
        if mixers is None:
            mixers = "full"
        if isinstance(mixers, (str, dict)):
            mixers = [mixers] * num_hidden_layers
        self.mixers = list(mixers)
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_longreach()

    def validate_longreach(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.mixers) != self.num_hidden_layers:
            raise ValueError(
                f"mixers lists {len(self.mixers)} layers but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, spec in enumerate(self.mixers):
            self.check_mixer(i, spec)
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be positive or None, got {self.max_position_embeddings}")

    def check_mixer(self, i: int, spec) -> None:
        """Raise ValueError naming layer ``i``'s bad mixer or option (families extend it)."""
        resolve_mixer(spec, i)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
