"""Token-mixing operators. Each lives in its own folder: a pure-PyTorch reference (the spec)
beside a dispatching entry point.

Note: `longreach.ops.attention` is the function; import the folder's modules with
`from longreach.ops.attention.reference import attention_reference`.
"""

from .attention import attention, attention_reference
from .cca import cca_attention, cca_decode, cca_pool
from .gca import gca_attention, gca_decode
from .linear_recurrence import linear_recurrence, linear_recurrence_step

__all__ = [
    "attention",
    "attention_reference",
    "cca_attention",
    "cca_decode",
    "cca_pool",
    "gca_attention",
    "gca_decode",
    "linear_recurrence",
    "linear_recurrence_step",
]
