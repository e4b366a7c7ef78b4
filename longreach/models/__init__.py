"""HF-compatible longreach models, registered with the Auto classes on import.

Families: ``longreach`` (the generic decoder, one mixer per layer) and ``longreach-gca`` (GCA:
retrieval over chunk memory on top of it). A recipe can also pre-train one of transformers' own
decoders (``model_type: llama``, ``mistral`` or ``qwen2``): the plain transformers class, e.g.
a full-attention baseline to plug CCA into later.
"""

import inspect

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from longreach.models.gca import GCAConfig, GCAForCausalLM, GCAModel
from longreach.models.gca.configuration_gca import describes_gca, read_legacy_config
from longreach.models.longreach import (
    LongReachConfig,
    LongReachForCausalLM,
    LongReachModel,
    LongReachPreTrainedModel,
)

for _config, _model, _lm in ((LongReachConfig, LongReachModel, LongReachForCausalLM),
                             (GCAConfig, GCAModel, GCAForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

# GCA configs saved as model_type "longreach" (before GCA had its own) load as GCAConfig
if read_legacy_config not in LongReachConfig.legacy_readers:
    LongReachConfig.legacy_readers.append(read_legacy_config)


# transformers' decoders a recipe may pre-train as they are (model_type: llama, ...)
TRANSFORMERS_FAMILIES = ("llama", "mistral", "qwen2")


def config_from_dict(section: dict):
    """The config of a recipe's ``model:`` section: ``model_type`` picks the family
    ("longreach", "longreach-gca", or transformers' "llama", "mistral", "qwen2"); without it,
    a section with ``gca`` layers or settings is a GCA model, any other the generic decoder."""
    section = dict(section)
    model_type = section.pop("model_type", None)
    if model_type is None:
        model_type = GCAConfig.model_type if describes_gca(section) else LongReachConfig.model_type
    families = {c.model_type: c for c in (LongReachConfig, GCAConfig)}
    families.update({name: CONFIG_MAPPING[name] for name in TRANSFORMERS_FAMILIES})
    if model_type not in families:
        raise ValueError(f"model.model_type must be one of {sorted(families)}, got {model_type!r}")
    config_class = families[model_type]
    # a typo would otherwise be kept as an unknown attribute and the default used instead
    valid = settings_of(config_class)
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown} for model_type {model_type!r}; "
                         f"valid settings: {sorted(valid | {'model_type'})}")
    return config_class(**section)


def settings_of(config_class) -> set[str]:
    """The settings a family's config takes by name (its ``__init__``'s and its bases')."""
    names = set()
    own = config_class.__module__.split(".")[0]  # longreach's, or transformers' own class
    for cls in config_class.__mro__:
        if cls.__dict__.get("__init__") is not None and cls.__module__.startswith(own + "."):
            params = inspect.signature(cls.__dict__["__init__"]).parameters.values()
            names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names - {"self"}


def causal_lm_class(config) -> type:
    """The causal-LM class of ``config``'s family (transformers' own for its configs)."""
    if isinstance(config, GCAConfig):
        return GCAForCausalLM
    if isinstance(config, LongReachConfig):
        return LongReachForCausalLM
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def build_model(section: dict) -> LongReachForCausalLM:
    """A freshly initialized causal LM for a recipe's ``model:`` section."""
    config = config_from_dict(section)
    return causal_lm_class(config)(config)


__all__ = ["TRANSFORMERS_FAMILIES", "GCAConfig", "GCAForCausalLM", "GCAModel", "LongReachConfig", "LongReachForCausalLM",
           "LongReachModel", "LongReachPreTrainedModel", "build_model", "causal_lm_class", "config_from_dict"]
