"""LM-Infinite attention: sinks plus a local window, with the relative distance capped at the
window. Pure PyTorch (evaluation baselines and their fine-tunes): the dense specification and
the blocked entry point, whose memory grows with the window, not the key count."""

from .reference import lm_infinite_attention, lm_infinite_reference

__all__ = ["lm_infinite_attention", "lm_infinite_reference"]
