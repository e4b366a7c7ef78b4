"""Token mixers. Importing this package imports every module in it, which registers the
mixers they define (``full``, ``swa``, ``cca``, ``mamba2``, ``gla``, and any new one): a new
mixer is one file here, with no line to add anywhere else."""

import importlib
import pkgutil

from longreach.layers.registry import available_mixers, build_mixer, register_mixer, resolve_mixer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["available_mixers", "build_mixer", "register_mixer", "resolve_mixer"]
