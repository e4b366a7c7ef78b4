"""longreach: long-context language modelling.

Importing the package registers the ``longreach`` and ``longreach-gca`` model types with the
Hugging Face ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` classes: at once when
transformers' Auto classes are already imported, otherwise as soon as they are. The
registration imports ``longreach.models`` (torch and transformers' modeling code, seconds), so
``import longreach`` itself stays light, and so does the ``longreach`` command: ``longreach
--help`` imports neither torch nor transformers. The model classes exported here
(``LongReachConfig``, ``LongReachForCausalLM``, ...) import ``longreach.models`` on first use.
"""

import importlib
import importlib.abc
import sys
import threading

from longreach.runtime import __version__

_MODEL_EXPORTS = ("GCAConfig", "GCAForCausalLM", "LongReachConfig", "LongReachForCausalLM",
                  "LongReachModel")

__all__ = [*_MODEL_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        value = getattr(importlib.import_module("longreach.models"), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'longreach' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODEL_EXPORTS))


# ---------------------------------------------------------------- the Auto registration
#
# transformers' Auto classes live in the package ``transformers.models.auto``; no one can use
# them before it is imported. Registering means importing ``longreach.models``, which needs
# longreach's lower layers (cache, layers, ...) and transformers' modeling code complete: it
# cannot run while one of them is half-imported (``longreach.cache`` imports
# ``transformers.cache_utils``; ``transformers.modeling_utils`` imports the Auto package midway).
# So the finder below follows every import of a longreach or transformers module until the
# registration is done, and registers when the Auto package has been imported and no such
# import is still running: before the import statement that brought in the Auto classes
# returns to its caller.

_AUTO_PACKAGE = "transformers.models.auto"
_WATCHED = ("longreach", "transformers")


def _register_models() -> None:
    importlib.import_module("longreach.models")  # registers the model types on import


class _WatchedLoader:
    """A watched module's own loader, and a word to the finder when it has run. The module
    keeps the original loader (``__loader__``, ``__spec__.loader``) as if never watched."""

    def __init__(self, finder, spec):
        self.finder, self.spec, self.loader = finder, spec, spec.loader

    def __getattr__(self, name):  # get_code, get_resource_reader, ...: the loader's own
        if name in ("finder", "spec", "loader"):  # not set yet (a copy, say)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self.spec.loader = self.loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        self.finder.started()
        try:
            self.loader.exec_module(module)
        except BaseException:
            self.finder.ended(self.spec.name, ok=False)
            raise
        self.finder.ended(self.spec.name, ok=True)


class _AutoRegistration(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` until the registration is done (then it finds nothing; it
    stays in the list, which another thread may be walking): finds longreach and
    transformers modules with the finders after it and watches their imports."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0  # watched imports under way, in all threads
        self.auto_imported = False
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if self.done or fullname.partition(".")[0] not in _WATCHED:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WatchedLoader(self, spec)
                return spec
        return None

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def ended(self, name: str, ok: bool) -> None:
        with self.lock:
            self.running -= 1
            self.auto_imported |= ok and name == _AUTO_PACKAGE
            # after a failed import, the next one that succeeds registers
            register = ok and self.auto_imported and self.running == 0 and not self.done
            if register:
                self.done = True  # from here on the imports below are plain ones
        if register:
            _register_models()


if _AUTO_PACKAGE in sys.modules:
    _register_models()
elif not any(type(f).__name__ == _AutoRegistration.__name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoRegistration())
