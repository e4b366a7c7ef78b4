"""HF-compatible longreach models, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from longreach.models.longreach import (
    LongReachConfig,
    LongReachForCausalLM,
    LongReachModel,
    LongReachPreTrainedModel,
)

AutoConfig.register(LongReachConfig.model_type, LongReachConfig, exist_ok=True)
AutoModel.register(LongReachConfig, LongReachModel, exist_ok=True)
AutoModelForCausalLM.register(LongReachConfig, LongReachForCausalLM, exist_ok=True)

__all__ = ["LongReachConfig", "LongReachForCausalLM", "LongReachModel", "LongReachPreTrainedModel"]
