"""Token-mixing operators. Each lives in its own folder: a pure-PyTorch reference (the spec)
beside a dispatching entry point.

Note: `longreach.ops.attention` is the function; import the folder's modules with
`from longreach.ops.attention.reference import attention_reference`.
"""

from .attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
