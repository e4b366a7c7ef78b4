"""longreach: long-context language modelling.

Importing the package registers the ``longreach`` model type with the Hugging Face
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` classes.
"""

__version__ = "0.1.0"

from longreach.models import (  # noqa: E402  (registration happens on import)
    LongReachConfig,
    LongReachForCausalLM,
    LongReachModel,
)

__all__ = ["LongReachConfig", "LongReachForCausalLM", "LongReachModel", "__version__"]
