"""What every part of longreach asks of the machine it runs on: the device and dtype to use,
the versions to record beside a result, and files and folders written so that a crash never
leaves half of one (``write_atomic`` / ``atomic_path`` for files: results, plots, configs;
``atomic_dir`` for folders: checkpoints, tokenizers). The token cache
(``data.token_cache``) keeps its own swap: there a folder another process finished first is
kept, not replaced.

This module sits below everything else in the package (it imports nothing of longreach), so
data, train, eval, bench and the CLI all share one definition of each.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__version__ = "0.1.0"  # the package's version (longreach.__version__), kept here at the bottom

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def resolve_device(name: str | None = "auto"):
    """``"auto"`` (CUDA when there is one, else CPU) or a torch device string -> torch.device.

    Raises ValueError for a CUDA device on a machine without CUDA.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device):
    """``"auto"`` (bf16 on CUDA, float32 elsewhere) or a dtype name -> torch.dtype."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(DTYPE_NAMES)}")
    return names[name]


class MissingPackageError(ImportError):
    """A feature needs an optional package that is not installed; the message says which and
    how to install it (the CLI prints it as one line)."""


def package_version(name: str) -> str:
    """The installed version of ``name``, or "not installed"."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions to record beside a result: longreach, python, torch, transformers, and the
    distributions named in ``extra`` (e.g. "triton", "fla-core")."""
    import torch

    info = {"longreach": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": package_version("transformers")}
    for name in extra:
        info[name] = package_version(name)
    return info


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` in one rename when
    the block ends without an error, and is removed when it raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it a new file's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, prefix: str | None = None,
               fsync: bool = False) -> Iterator[Path]:
    """A new empty folder beside ``path`` to fill; it becomes ``path`` when the block ends
    without an error (replacing a folder there), and is removed when it raises.

    The folder gets the umask's mode, like any new folder (mkdir, not mkdtemp's 0700). A
    folder cannot be renamed onto a non-empty one, so an existing ``path`` is moved aside
    first: ``path`` is missing only between two renames, never half-written. The temporary
    names start with ``prefix`` (default ``.NAME.``), so a reader can skip and clean them.
    ``fsync``: flush every file and folder to disk before and after the swap (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if prefix is None else prefix
    tmp = path.parent / f"{prefix}tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        if path.exists():
            old = path.parent / f"{prefix}old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return path
