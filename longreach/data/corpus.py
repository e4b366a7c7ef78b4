"""Corpora: where documents come from, read offline from local files.

A *source* is one of:

- ``"builtin"``: the King James Bible shipped with the package (1,189 chapters, ~4.2 MB);
- a ``.txt`` file (the whole file is one document);
- a ``.jsonl`` file (one document per line, taken from ``text_field``);
- a ``.parquet`` file (column ``text_field``, needs ``pyarrow``);
  ``.txt.gz`` and ``.jsonl.gz`` are read through gzip;
- a folder written by ``datasets``' ``save_to_disk`` (needs ``datasets``; a DatasetDict
  uses its ``"train"`` split);
- any other folder: every supported file below it, recursively, in sorted order
  (hidden files and unsupported extensions are skipped);
- a glob pattern such as ``"data/*.jsonl"`` (``**`` recurses);
- a list of any of these, read in order.

Empty documents (``""``) are skipped everywhere.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longreach.runtime import MissingPackageError

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).with_name("builtin") / "kjv.jsonl.gz"

# Suffix -> reader kind. Longest suffixes first, so "a.jsonl.gz" is not taken for ".gz".
FILE_KINDS = {
    ".jsonl.gz": "jsonl",
    ".txt.gz": "txt",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
}
# A folder holding any of these was written by datasets' save_to_disk.
HF_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
OPTIONAL_MODULES = {"parquet": "pyarrow", "hf_dataset": "datasets"}


@dataclass(frozen=True)
class CorpusPart:
    """One readable unit of a source: a file, or a saved HF dataset folder."""

    kind: str  # "txt", "jsonl", "parquet" or "hf_dataset"
    path: Path


def describe(source) -> str:
    if isinstance(source, (list, tuple)):
        return "[" + ", ".join(describe(s) for s in source) + "]"
    return str(source)


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in FILE_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def _is_hf_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def _folder_parts(folder: Path) -> list[CorpusPart]:
    parts = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            kind = _file_kind(path)
            if kind is not None and not name.startswith("."):
                parts.append(CorpusPart(kind, path))
    if not parts:
        raise ValueError(
            f"corpus folder {str(folder)!r} has no supported files "
            f"({', '.join(FILE_KINDS)}) and is not a saved HF dataset"
        )
    return parts


def _path_parts(path: Path, named_as) -> list[CorpusPart]:
    if path.is_dir():
        if _is_hf_dataset(path):
            return [CorpusPart("hf_dataset", path)]
        return _folder_parts(path)
    kind = _file_kind(path)
    if kind is None:
        raise ValueError(
            f"corpus file {str(named_as)!r} has an unsupported extension "
            f"(supported: {', '.join(FILE_KINDS)})"
        )
    return [CorpusPart(kind, path)]


def _resolve_one(source) -> list[CorpusPart]:
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("corpus source is an empty list")
        return [part for item in source for part in _resolve_one(item)]
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"corpus source must be 'builtin', a path, a glob or a list of them, "
            f"not {type(source).__name__}"
        )
    if str(source) == BUILTIN:
        return [CorpusPart("jsonl", BUILTIN_PATH)]
    path = Path(source).expanduser()
    if path.exists():
        return _path_parts(path, source)
    if isinstance(source, str) and any(ch in source for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        if not matches:
            raise ValueError(f"corpus glob {source!r} matches no files")
        return [part for match in matches for part in _path_parts(Path(match), match)]
    raise ValueError(f"corpus source {str(source)!r} does not exist")


def resolve_source(source) -> list[CorpusPart]:
    """The files (and saved datasets) a source names, in reading order.

    Raises ValueError for a missing path, an unsupported extension or an empty match, and
    MissingPackageError (an ImportError) when a part needs an optional package that is not
    installed.
    """
    parts = _resolve_one(source)
    for part in parts:
        module = OPTIONAL_MODULES.get(part.kind)
        if module is not None and importlib.util.find_spec(module) is None:
            raise MissingPackageError(
                f"reading {str(part.path)!r} needs the optional package {module!r}: "
                "pip install 'longreach[data]'"
            )
    return parts


def iter_documents(source, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``source`` as strings, in a fixed order.

    The source is checked when this is called (missing paths raise at once); a source that
    yields no non-empty document raises ValueError once it is exhausted.
    """
    parts = resolve_source(source)
    return _documents(parts, source, text_field)


def _documents(parts: list[CorpusPart], source, text_field: str) -> Iterator[str]:
    count = 0
    for part in parts:
        for text in READERS[part.kind](part.path, text_field):
            if text:
                count += 1
                yield text
    if count == 0:
        raise ValueError(f"corpus source {describe(source)!r} has no (non-empty) documents")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            yield f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text: {err}") from err


def _text_value(value, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where}: no field {text_field!r} (has: {fields})")
            yield _text_value(record[text_field], where, text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"parquet file {str(path)!r} has no column {text_field!r} (has: {names})")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _text_value(value, str(path), text_field)


def _read_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"saved dataset {str(path)!r} has no 'train' split (splits: {sorted(dataset)}); "
                "point the source at one split's folder instead"
            )
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        raise ValueError(
            f"saved dataset {str(path)!r} has no column {text_field!r} "
            f"(has: {dataset.column_names})"
        )
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            yield _text_value(value, str(path), text_field)


READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "hf_dataset": _read_hf_dataset,
}


def source_fingerprint(source) -> str:
    """sha256 over the resolved files of ``source``: absolute paths, sizes and mtimes.

    Editing, adding or removing a file changes it; reading the files is not needed.
    """
    entries = []
    for part in resolve_source(source):
        files = [part.path]
        if part.kind == "hf_dataset":
            files = sorted(p for p in part.path.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            entries.append([part.kind, str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def split_lines(text: str, max_chars: int) -> list[str]:
    """``text`` cut after line ends into pieces of at most ``max_chars`` characters where a
    line allows (a longer line is a piece of its own); joined, the pieces are ``text``."""
    pieces, at = [], 0
    while len(text) - at > max_chars:
        cut = text.rfind("\n", at, at + max_chars) + 1
        if cut <= at:  # no line end in reach: cut after the long line
            cut = text.find("\n", at + max_chars)
            cut = len(text) if cut < 0 else cut + 1
        pieces.append(text[at:cut])
        at = cut
    if at < len(text) or not pieces:
        pieces.append(text[at:])
    return pieces
