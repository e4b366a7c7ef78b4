"""LM-Infinite attention: sinks plus a local window, with the relative distance capped at the
window. Only the dense reference exists (evaluation baselines); it is the entry point."""

from .reference import lm_infinite_attention

__all__ = ["lm_infinite_attention"]
