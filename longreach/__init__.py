"""longreach: long-context language modelling.

Importing the package registers the ``longreach`` and ``longreach-gca`` model types with the
Hugging Face ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` classes.
"""

from longreach.models import (  # registration happens on import
    GCAConfig,
    GCAForCausalLM,
    LongReachConfig,
    LongReachForCausalLM,
    LongReachModel,
)
from longreach.runtime import __version__

__all__ = ["GCAConfig", "GCAForCausalLM", "LongReachConfig", "LongReachForCausalLM", "LongReachModel",
           "__version__"]
