"""A long-document corpus built offline from the Python packages a machine has installed.

Each installed distribution (``*.dist-info`` / ``*.egg-info`` with a file list) in the
site-packages folders becomes ONE document: its ``.py`` files, sorted by path, each preceded
by a header line ``# file: pkg/sub/mod.py``. Repository-level code is long (on a typical ML
machine dozens of documents pass 256K tokens), so it is a real corpus for long-context
training and held-out evaluation that needs no network.

The output folder holds ``train.jsonl.gz`` and ``heldout.jsonl.gz`` (one JSON line per
package: ``package``, ``version``, ``licence`` and ``text``; any ``longreach.data.corpus``
source reads them) and ``manifest.json``: per package its name, version, licence (from the
METADATA fields ``License-Expression``, ``License`` and ``Classifier: License ::``), number
of files, bytes, split, and the files it skipped.

The split is by package: a package is held out when a hash of its normalized name falls
below ``heldout_fraction`` (a choice independent of what else is installed); if that leaves
fewer than ``heldout_min_large`` large packages (>= ``large_bytes`` of code) in ``heldout``,
the large ones with the smallest hashes are moved there, so held-out evaluation always has
long documents (those moves depend on which large packages are installed and kept).

The text is the installed packages' own source under their own licences: the corpus is for
local training on the machine that built it. longreach ships this builder, never the text.

    python -m longreach.data.pycode --out ~/corpora/pycode          # or: longreach corpus build-pycode
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import site
import stat
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TOOL = "longreach.data.pycode"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
TMP_PREFIX = ".pycode-tmp-"
HASH_SALT = "longreach-pycode-v1"

DEFAULT_HELDOUT_FRACTION = 0.05
DEFAULT_MAX_FILE_BYTES = 1_000_000
DEFAULT_HELDOUT_MIN_LARGE = 3
DEFAULT_LARGE_BYTES = 1 << 20  # ~1 MiB of code: about 300K BPE tokens, 1M byte tokens

# --licences: which licence classes are kept
LICENCE_FILTERS = {
    "all": ("permissive", "copyleft", "unknown"),
    "osi": ("permissive", "copyleft"),
    "permissive": ("permissive",),
}
_CLASS_RANK = {"permissive": 0, "copyleft": 1, "unknown": 2}

# SPDX identifiers (lower case); "-only", "-or-later" and "+" are stripped before lookup
_PERMISSIVE_IDS = {
    "0bsd", "afl-3.0", "apache-1.1", "apache-2.0", "blueoak-1.0.0", "bsd-1-clause",
    "bsd-2-clause", "bsd-2-clause-patent", "bsd-3-clause", "bsd-3-clause-clear",
    "bsd-4-clause", "bsl-1.0", "cc0-1.0", "cnri-python", "hpnd", "isc", "mit", "mit-0",
    "mit-cmu", "mit-modern-variant", "ncsa", "postgresql", "psf-2.0", "python-2.0",
    "python-2.0.1", "unlicense", "upl-1.0", "x11", "zlib", "zpl-2.1", "wtfpl",
}
_COPYLEFT_PREFIXES = (
    "agpl-", "gpl-", "lgpl-", "mpl-", "epl-", "eupl-", "cddl-", "osl-", "cecill", "cpl-",
    "ms-rl", "sleepycat",
)
# free text (the License field, classifiers): regex -> class; every match counts
_KEYWORDS = [
    (re.compile(r"\b(a|l)?gpl|\bgnu\b|general public licen[cs]e"), "copyleft"),
    (re.compile(r"\bmpl\b|mozilla public"), "copyleft"),
    (re.compile(r"\beupl\b|european union public|\bepl\b|eclipse public|\bcddl\b|"
                r"common development and distribution"), "copyleft"),
    (re.compile(r"\bmit\b|\bexpat\b"), "permissive"),
    (re.compile(r"\bbsd\b"), "permissive"),
    (re.compile(r"\bapache\b|\basl\b"), "permissive"),
    (re.compile(r"\bpsfl?\b|python software foundation"), "permissive"),
    (re.compile(r"\bisc\b|\biscl\b|\bzlib\b|\bunlicen[cs]e\b|public domain|\bcc0\b|"
                r"\bboost\b|\bhpnd\b|historical permission|universal permissive|\bupl\b|"
                r"academic free|zope public|\bpostgresql\b"), "permissive"),
]


def normalize_name(name: str) -> str:
    """PEP 503: runs of ``-_.`` become ``-``, lower case (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def heldout_hash(name: str) -> float:
    """A number in [0, 1) fixed by the package's normalized name (sha256)."""
    digest = hashlib.sha256(f"{HASH_SALT}:{normalize_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# --- licences -------------------------------------------------------------------------


def _worst(classes: Iterable[str]) -> str:
    return max(classes, key=_CLASS_RANK.__getitem__)


def _best(classes: Iterable[str]) -> str:
    return min(classes, key=_CLASS_RANK.__getitem__)


def _spdx_id_class(identifier: str) -> str:
    ident = identifier.lower().rstrip("+")
    for suffix in ("-only", "-or-later"):
        ident = ident.removesuffix(suffix)
    if ident in _PERMISSIVE_IDS:
        return "permissive"
    if ident.startswith(_COPYLEFT_PREFIXES):
        return "copyleft"
    return "unknown"


_SPDX_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z0-9.+:-]+)")


def spdx_class(expression: str) -> str | None:
    """The class of an SPDX licence expression: ``AND`` takes the most restrictive part,
    ``OR`` the least, ``WITH`` the licence's own (an exception only adds permissions).
    None when the text is not an SPDX expression (say "Apache 2.0 License")."""
    tokens, pos = [], 0
    while pos < len(expression):
        match = _SPDX_TOKEN.match(expression, pos)
        if match is None:
            if expression[pos:].strip():
                return None
            break
        tokens.append(match.group(1))
        pos = match.end()
    if not tokens:
        return None
    state = {"i": 0}

    def peek() -> str | None:
        return tokens[state["i"]] if state["i"] < len(tokens) else None

    def take() -> str:
        state["i"] += 1
        return tokens[state["i"] - 1]

    def atom() -> str:
        token = peek()
        if token is None or token.upper() in ("AND", "OR", "WITH") or token == ")":
            raise ValueError
        take()
        if token == "(":
            value = disjunction()
            if peek() != ")":
                raise ValueError
            take()
            return value
        value = _spdx_id_class(token)
        if peek() is not None and peek().upper() == "WITH":
            take()
            exception = peek()
            if exception is None or exception in "()":
                raise ValueError
            take()
        return value

    def conjunction() -> str:
        parts = [atom()]
        while peek() is not None and peek().upper() == "AND":
            take()
            parts.append(atom())
        return _worst(parts)

    def disjunction() -> str:
        parts = [conjunction()]
        while peek() is not None and peek().upper() == "OR":
            take()
            parts.append(conjunction())
        return _best(parts)

    try:
        value = disjunction()
    except ValueError:
        return None
    return value if state["i"] == len(tokens) else None


def keyword_class(text: str) -> str:
    """The class of a free-text licence name: the most restrictive licence it names."""
    found = [cls for pattern, cls in _KEYWORDS if pattern.search(text.lower())]
    return _worst(found) if found else "unknown"


def _short_class(text: str) -> str:
    cls = spdx_class(text)
    return cls if cls not in (None, "unknown") else keyword_class(text)


@dataclass(frozen=True)
class Licence:
    """What a distribution's METADATA says about its licence."""

    name: str  # for people: the expression, the License field, or the classifiers
    cls: str  # "permissive", "copyleft" or "unknown"
    expression: str | None  # License-Expression
    field: str | None  # the License field (its first line, at most 200 characters)
    classifiers: tuple[str, ...]  # "License :: ..." classifiers, without "License :: "


def read_licence(metadata) -> Licence:
    """The licence of a distribution from its METADATA (an ``email.message.Message``).

    The class comes from ``License-Expression`` when it has one (SPDX); otherwise from the
    ``License`` field when it is a short name and every ``License ::`` classifier, taking the
    most restrictive of those it recognises (a package listing MIT and GPL counts as
    copyleft); a long licence text in ``License`` is read only when nothing else is known.
    """
    expression = (metadata.get("License-Expression") or "").strip() or None
    raw = (metadata.get("License") or "").strip()
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    first = lines[0][:200] if lines else None
    is_short = len(lines) == 1 and len(raw) <= 100 and raw.upper() not in ("UNKNOWN", "NONE")
    classifiers = tuple(
        c.split("::", 1)[1].strip()
        for c in (metadata.get_all("Classifier") or [])
        if c.replace(" ", "").startswith("License::")
    )
    tails = [c.rsplit("::", 1)[-1].strip() for c in classifiers]
    if expression:
        cls = spdx_class(expression) or keyword_class(expression)
    else:
        known = [c for c in [_short_class(raw) if is_short else "unknown"]
                 + [keyword_class(t) for t in tails] if c != "unknown"]
        if known:
            cls = _worst(known)
        elif lines and not is_short:
            cls = keyword_class(" ".join(lines[:3]))
        else:
            cls = "unknown"
    if expression:
        name = expression
    elif is_short:
        name = raw
    elif any(t != "OSI Approved" for t in tails):
        name = " / ".join(t for t in tails if t != "OSI Approved")
    elif first and first.upper() not in ("UNKNOWN", "NONE"):
        name = first if len(first) <= 80 else first[:77] + "..."
    else:
        name = "UNKNOWN"
    return Licence(name, cls, expression, first, classifiers)


# --- finding the packages ------------------------------------------------------------


def default_site_dirs() -> list[Path]:
    """The site-packages (and Debian's dist-packages) folders on ``sys.path``, in its order;
    ``site``'s own list when sys.path names none."""
    candidates = [p for p in sys.path if Path(p or ".").name in ("site-packages", "dist-packages")]
    if not candidates:
        candidates = [*site.getsitepackages(), site.getusersitepackages()]
    return _unique_dirs(candidates)


def _unique_dirs(paths: Iterable) -> list[Path]:
    seen, dirs = set(), []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                dirs.append(path)
    return dirs


@dataclass
class _Package:
    name: str
    version: str
    root: Path
    licence: Licence
    files: list[tuple[str, Path, int]] = field(default_factory=list)  # (rel path, path, size)
    skipped: list[dict] = field(default_factory=list)
    hash: float = 0.0
    split: str = "train"

    @property
    def key(self) -> str:
        return normalize_name(self.name)

    @property
    def source_bytes(self) -> int:
        return sum(size for _, _, size in self.files)


def _within(path: str, root: str) -> bool:
    return path.startswith(root.rstrip(os.sep) + os.sep)


def find_packages(roots: list[Path], *, max_file_bytes: int) -> tuple[list[_Package], list[dict]]:
    """(packages with .py files to read, excluded distributions) found in ``roots``.

    A distribution found in an earlier root shadows one of the same name in a later root
    (as on ``sys.path``). A file listed by two distributions goes to the first by name.
    """
    found: dict[str, _Package] = {}
    excluded: list[dict] = []
    for root in roots:
        root_str = os.path.normpath(os.path.abspath(root))
        dists = []
        for dist in importlib.metadata.distributions(path=[str(root)]):
            name = (dist.metadata.get("Name") or "").strip()
            dists.append((normalize_name(name), name, dist))
        for key, name, dist in sorted(dists, key=lambda d: (d[0], d[1])):
            version = (dist.metadata.get("Version") or "").strip() or "unknown"
            if not name:
                excluded.append({"name": None, "version": version, "root": root_str,
                                 "reason": "METADATA has no Name"})
                continue
            if key in found:
                excluded.append({"name": name, "version": version, "root": root_str,
                                 "reason": f"shadowed by {found[key].name} "
                                 f"{found[key].version} in {found[key].root}"})
                continue
            pkg = _Package(name, version, Path(root_str), read_licence(dist.metadata))
            found[key] = pkg
            files = dist.files
            if files is None:
                pkg.skipped.append({"path": None, "reason": "no file list (RECORD)"})
                continue
            for rel in files:
                if rel.suffix != ".py":
                    continue
                path = os.path.normpath(os.path.join(root_str, str(rel)))
                if not _within(path, root_str):
                    pkg.skipped.append({"path": str(rel), "reason": "outside site-packages"})
                    continue
                pkg.files.append((Path(os.path.relpath(path, root_str)).as_posix(), Path(path), 0))
    # sizes, path order, a file to one owner, the size cap
    claimed: set[str] = set()
    for key in sorted(found):
        pkg = found[key]
        kept = []
        for rel, path, _ in sorted(set(pkg.files)):
            if str(path) in claimed:
                continue
            try:
                info = os.stat(path)
            except FileNotFoundError:
                pkg.skipped.append({"path": rel, "reason": "missing"})
                continue
            except OSError as err:
                pkg.skipped.append({"path": rel, "reason": f"unreadable ({err.strerror})"})
                continue
            if not stat.S_ISREG(info.st_mode):
                pkg.skipped.append({"path": rel, "reason": "not a file"})
                continue
            size = info.st_size
            claimed.add(str(path))
            if size > max_file_bytes:
                pkg.skipped.append({"path": rel, "reason": "over max_file_bytes", "bytes": size})
                continue
            kept.append((rel, path, size))
        pkg.files = kept
    return [found[k] for k in sorted(found)], excluded


def assign_splits(packages: list[_Package], *, heldout_fraction: float, heldout_min_large: int,
                  large_bytes: int) -> None:
    """Set each package's ``split``: see the module docstring."""
    for pkg in packages:
        pkg.hash = heldout_hash(pkg.name)
        pkg.split = "heldout" if pkg.hash < heldout_fraction else "train"
    if heldout_fraction <= 0 or len(packages) < 2:
        for pkg in packages:
            pkg.split = "train"
        return
    by_hash = sorted(packages, key=lambda p: (p.hash, p.key))
    large = [p for p in by_hash if p.source_bytes >= large_bytes]
    missing = heldout_min_large - sum(p.split == "heldout" for p in large)
    for pkg in large:
        if missing <= 0:
            break
        if pkg.split == "train":
            pkg.split, missing = "heldout", missing - 1
    if not any(p.split == "heldout" for p in packages):
        by_hash[0].split = "heldout"
    if not any(p.split == "train" for p in packages):
        by_hash[-1].split = "train"


# --- the output folder ---------------------------------------------------------------


def _data_name(split: str, compress: bool) -> str:
    return f"{split}.jsonl.gz" if compress else f"{split}.jsonl"


OUTPUT_NAMES = (MANIFEST, *(_data_name(s, c) for s in SPLITS for c in (True, False)))


def _check_out(out: Path) -> None:
    """Raise ValueError unless ``out`` is missing, empty, or a corpus this tool made."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    if not out.is_dir():
        return
    entries = [e for e in os.listdir(out) if not e.startswith(TMP_PREFIX)]
    if not entries:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        ours = isinstance(manifest, dict) and manifest.get("tool") == TOOL
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(
            f"--out {str(out)!r} exists, is not empty and was not made by {TOOL} (no "
            f"{MANIFEST} of it): nothing was changed; pass a new or empty folder"
        )


class _Writer:
    """One split's JSON lines, written to a temporary file in the output folder."""

    def __init__(self, out: Path, split: str, compress: bool):
        self.final = out / _data_name(split, compress)
        self.tmp = out / f"{TMP_PREFIX}{uuid.uuid4().hex}-{self.final.name}"
        self.raw = open(self.tmp, "wb")
        # mtime=0 and no file name in the header: the same input gives the same bytes
        self.file = (gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=self.raw,
                                   mtime=0) if compress else self.raw)
        self.documents = self.files = self.bytes = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def close(self) -> None:
        if self.file is not self.raw:
            self.file.close()
        self.raw.close()


def _escape(text: str) -> str:
    """``text`` as the inside of a JSON string (so a document can be written piece by piece)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _read_source(path: Path) -> str | None:
    """The file as text with ``\\n`` newlines and no BOM; None when it is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _write_document(pkg: _Package, writer: _Writer) -> dict:
    """Stream one package's document into ``writer``; its manifest entry."""
    head = (f'{{"package": {json.dumps(pkg.name)}, "version": {json.dumps(pkg.version)}, '
            f'"licence": {json.dumps(pkg.licence.name)}, "text": "').encode()
    started = False
    n_files = text_bytes = source_bytes = 0
    for rel, path, size in pkg.files:
        try:
            text = _read_source(path)
        except OSError as err:
            pkg.skipped.append({"path": rel, "reason": f"unreadable ({err.strerror})"})
            continue
        if text is None:
            pkg.skipped.append({"path": rel, "reason": "not UTF-8", "bytes": size})
            continue
        block = f"# file: {rel}\n{text}"
        if not block.endswith("\n"):
            block += "\n"
        if started:
            block = "\n" + block  # one blank line between files
        else:
            writer.write(head)
            started = True
        writer.write(_escape(block).encode())
        n_files += 1
        text_bytes += len(block.encode())
        source_bytes += size
    if started:
        writer.write(b'"}\n')
        writer.documents += 1
        writer.files += n_files
        writer.bytes += text_bytes
    return {"files": n_files, "bytes": text_bytes, "source_bytes": source_bytes}


def _package_entry(pkg: _Package, counts: dict) -> dict:
    lic = pkg.licence
    return {
        "name": pkg.name,
        "version": pkg.version,
        "licence": lic.name,
        "licence_class": lic.cls,
        "licence_expression": lic.expression,
        "licence_field": lic.field,
        "licence_classifiers": list(lic.classifiers),
        "files": counts["files"],
        "bytes": counts["bytes"],
        "source_bytes": counts["source_bytes"],
        "split": pkg.split,
        "skipped": sorted(pkg.skipped, key=lambda s: (s["path"] or "", s["reason"])),
    }


class _Progress:
    def __init__(self, enabled: bool, total_bytes: int, n_packages: int):
        self.enabled, self.total, self.n = enabled, total_bytes, n_packages
        self.start = self.last = time.monotonic()

    def update(self, done_packages: int, done_bytes: int, name: str) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= 2.0:
            self.last = now
            print(f"pycode: {done_packages}/{self.n} packages, {done_bytes / 1e6:,.0f}/"
                  f"{self.total / 1e6:,.0f} MB, {now - self.start:.0f} s ({name})",
                  file=sys.stderr, flush=True)


def build_pycode_corpus(
    out: str | os.PathLike,
    *,
    paths: Iterable[str | os.PathLike] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    licences: str = "all",
    heldout_min_large: int = DEFAULT_HELDOUT_MIN_LARGE,
    large_bytes: int = DEFAULT_LARGE_BYTES,
    compress: bool = True,
    progress: bool = True,
) -> dict:
    """Build the corpus into ``out``; returns the manifest (also ``out/manifest.json``).

    ``paths``: the site-packages folders to read (default ``default_site_dirs()``).
    ``licences``: ``"all"``, ``"osi"`` (recognised permissive or copyleft licences) or
    ``"permissive"`` (MIT / BSD / Apache / PSF / ISC-like, public domain). ``out`` may be
    missing (it is created), empty, or a corpus this function built (it is replaced);
    anything else is a ValueError that changes nothing. The files are written under
    temporary names and renamed into place at the end, the manifest last.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
    if heldout_min_large < 0 or large_bytes < 1:
        raise ValueError("heldout_min_large must be >= 0 and large_bytes >= 1")
    if licences not in LICENCE_FILTERS:
        raise ValueError(f"licences must be one of {sorted(LICENCE_FILTERS)}, got {licences!r}")
    if paths is None:
        roots = default_site_dirs()
        if not roots:
            raise ValueError(f"no site-packages folder found on sys.path ({sys.path})")
    else:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        for p in paths:
            if not Path(p).expanduser().is_dir():
                raise ValueError(f"site-packages folder {str(p)!r} does not exist")
        roots = _unique_dirs(paths)
        if not roots:
            raise ValueError("paths is empty: name at least one site-packages folder")
    out = Path(out).expanduser()
    _check_out(out)
    started = time.monotonic()

    packages, excluded = find_packages(roots, max_file_bytes=max_file_bytes)
    searched = [str(r) for r in roots]
    if not packages:
        raise ValueError(
            "no installed Python distributions (*.dist-info or *.egg-info folders) found in "
            f"{', '.join(searched)}"
        )
    keep = LICENCE_FILTERS[licences]
    readable = []
    for pkg in packages:
        if pkg.licence.cls not in keep:
            excluded.append({"name": pkg.name, "version": pkg.version, "root": str(pkg.root),
                             "reason": f"licence {pkg.licence.name!r} is {pkg.licence.cls}, "
                             f"not kept by licences={licences!r}"})
        elif not pkg.files:
            why = "; ".join(sorted({s["reason"] for s in pkg.skipped})) or "no .py files"
            excluded.append({"name": pkg.name, "version": pkg.version, "root": str(pkg.root),
                             "reason": f"no .py files to read ({why})"})
        else:
            readable.append(pkg)
    if not readable:
        raise ValueError(
            f"none of the {len(packages)} distributions found in {', '.join(searched)} has "
            f".py files to read with licences={licences!r}"
        )
    assign_splits(readable, heldout_fraction=heldout_fraction,
                  heldout_min_large=heldout_min_large, large_bytes=large_bytes)

    out.mkdir(parents=True, exist_ok=True)
    for entry in os.listdir(out):  # a crashed build's leftovers
        if entry.startswith(TMP_PREFIX):
            (out / entry).unlink(missing_ok=True)
    writers = {s: _Writer(out, s, compress) for s in SPLITS
               if any(p.split == s for p in readable)}
    entries = []
    bar = _Progress(progress, sum(p.source_bytes for p in readable), len(readable))
    try:
        done_bytes = 0
        for i, pkg in enumerate(readable):
            counts = _write_document(pkg, writers[pkg.split])
            done_bytes += pkg.source_bytes
            bar.update(i + 1, done_bytes, pkg.name)
            if counts["files"]:
                entries.append(_package_entry(pkg, counts))
            else:
                excluded.append({"name": pkg.name, "version": pkg.version,
                                 "root": str(pkg.root), "reason": "no readable UTF-8 .py files"})
        for writer in writers.values():
            writer.close()
        splits = {}
        for split, writer in writers.items():
            if writer.documents:
                splits[split] = {"file": writer.final.name, "documents": writer.documents,
                                 "files": writer.files, "bytes": writer.bytes}
        if "train" not in splits:
            raise ValueError(f"no package in {', '.join(searched)} has readable UTF-8 .py files")
        manifest = {
            "tool": TOOL,
            "format_version": FORMAT_VERSION,
            "note": "Built on this machine from its installed Python packages, each under its "
            "own licence (see packages[].licence): for local training only. longreach ships "
            "the builder, never this text.",
            "python": sys.version.split()[0],
            "paths": searched,
            "options": {"heldout_fraction": heldout_fraction, "max_file_bytes": max_file_bytes,
                        "licences": licences, "heldout_min_large": heldout_min_large,
                        "large_bytes": large_bytes, "compress": compress},
            "splits": splits,
            "packages": entries,
            "excluded": sorted(excluded, key=lambda e: (normalize_name(e["name"] or ""),
                                                        e["root"], e["reason"])),
        }
        manifest_tmp = out / f"{TMP_PREFIX}{uuid.uuid4().hex}-{MANIFEST}"
        manifest_tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        for writer in writers.values():
            if writer.documents:
                os.replace(writer.tmp, writer.final)
        written = {info["file"] for info in splits.values()} | {MANIFEST}
        for name in OUTPUT_NAMES:  # an earlier build's files this one did not write
            if name not in written:
                (out / name).unlink(missing_ok=True)
        os.replace(manifest_tmp, out / MANIFEST)
    finally:
        for writer in writers.values():
            writer.close()
            writer.tmp.unlink(missing_ok=True)
        for entry in os.listdir(out):
            if entry.startswith(TMP_PREFIX):
                (out / entry).unlink(missing_ok=True)
    if progress:
        seconds = time.monotonic() - started
        summary = ", ".join(f"{s} {v['documents']} documents / {v['bytes'] / 1e6:,.1f} MB"
                            for s, v in splits.items())
        print(f"pycode: {len(entries)} packages ({summary}) in {seconds:.1f} s -> {out}",
              file=sys.stderr, flush=True)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The builder's command-line options (shared with ``longreach corpus build-pycode``)."""
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or a corpus built here before")
    parser.add_argument("--paths", nargs="+", default=None, metavar="DIR",
                        help="site-packages folders to read (default: those on sys.path)")
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                        help="share of packages held out, chosen by a hash of the name "
                        f"(default {DEFAULT_HELDOUT_FRACTION})")
    parser.add_argument("--heldout-min-large", type=int, default=DEFAULT_HELDOUT_MIN_LARGE,
                        help="at least this many packages of >= --large-bytes of code are "
                        f"held out (default {DEFAULT_HELDOUT_MIN_LARGE})")
    parser.add_argument("--large-bytes", type=int, default=DEFAULT_LARGE_BYTES,
                        help=f"what counts as a large package (default {DEFAULT_LARGE_BYTES})")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip (and record) .py files larger than this, usually generated "
                        f"(default {DEFAULT_MAX_FILE_BYTES})")
    parser.add_argument("--licences", choices=sorted(LICENCE_FILTERS), default="all",
                        help="all (default); osi: recognised permissive or copyleft licences; "
                        "permissive: MIT/BSD/Apache/PSF/ISC-like only")
    parser.add_argument("--no-gzip", dest="compress", action="store_false",
                        help="write plain .jsonl instead of .jsonl.gz (gzip level 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run_from_args(args: argparse.Namespace) -> dict:
    return build_pycode_corpus(
        args.out, paths=args.paths, heldout_fraction=args.heldout_fraction,
        max_file_bytes=args.max_file_bytes, licences=args.licences,
        heldout_min_large=args.heldout_min_large, large_bytes=args.large_bytes,
        compress=args.compress, progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longreach.data.pycode",
        description="Build a long-document corpus of the installed Python packages' source "
        "(one document per package) with a held-out split by package; for local training.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
