"""Token mixers. Importing this package registers the built-in mixers."""

from longreach.layers import attention as _attention  # noqa: F401  (registers "full", "swa")
from longreach.layers import cca as _cca  # noqa: F401  (registers "cca")
from longreach.layers import gca as _gca  # noqa: F401  (registers "gca")
from longreach.layers import recurrent as _recurrent  # noqa: F401  (registers "mamba2", "gla")
from longreach.layers.registry import available_mixers, build_mixer, register_mixer, resolve_mixer

__all__ = ["available_mixers", "build_mixer", "register_mixer", "resolve_mixer"]
