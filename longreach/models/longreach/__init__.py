from longreach.models.longreach.configuration_longreach import LongReachConfig
from longreach.models.longreach.modeling_longreach import (
    LongReachForCausalLM,
    LongReachModel,
    LongReachPreTrainedModel,
)

__all__ = ["LongReachConfig", "LongReachForCausalLM", "LongReachModel", "LongReachPreTrainedModel"]
