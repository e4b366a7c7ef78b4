"""Synthetic tasks mixed into training batches, their registry, and the prompt builder that
the training tasks and the evaluation tasks (``longreach.eval.tasks``) share.

A task is a callable ``task(rng, seq_len, tokenizer, **options) -> (input_ids, labels)``
returning two int64 arrays of length ``seq_len``; ``labels`` is -100 wherever the position
is not scored (HF convention: the model shifts labels internally). Tasks register by name:

    @register_synthetic_task("my_task")
    def my_task(rng, seq_len, tokenizer, *, some_option=3): ...

and are picked in a loader with ``synthetic={"task": "my_task", "fraction": 0.1, **options}``.
The built-in tasks (``copy``, ``passkey``) are registered when ``longreach.data`` is imported;
a task defined elsewhere is registered when the module defining it is imported.

Prompts are ``prefix + filler-with-inserts + suffix`` of an exact token length
(:func:`build_prompt`), the filler cut from a :class:`Haystack` (the built-in corpus, the
held-out haystack, a text file, or RULER's noise sentences).
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from longreach.data.corpus import iter_documents, split_lines
from longreach.data.prompts import (  # noqa: F401  (the classic prompt, re-exported)
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    draw_passkey,
    int_range,
    random_digits,
)

IGNORE_INDEX = -100

SyntheticTask = Callable[..., tuple[np.ndarray, np.ndarray]]
_TASKS: dict[str, SyntheticTask] = {}


def register_synthetic_task(name: str) -> Callable[[SyntheticTask], SyntheticTask]:
    """Decorator registering a task under ``name`` (re-registering the same function is fine)."""

    def register(task: SyntheticTask) -> SyntheticTask:
        existing = _TASKS.get(name)
        # Same module and name: the module was imported again (e.g. reloaded), not a clash.
        if existing is not None and _origin(existing) != _origin(task):
            raise ValueError(
                f"synthetic task {name!r} is already registered by {'.'.join(_origin(existing))}"
            )
        _TASKS[name] = task
        return task

    return register


def _origin(task: SyntheticTask) -> tuple[str, str]:
    return (getattr(task, "__module__", "?"), getattr(task, "__qualname__", repr(task)))


def get_synthetic_task(name: str) -> SyntheticTask:
    if name not in _TASKS:
        raise ValueError(
            f"unknown synthetic task {name!r}; registered: {sorted(_TASKS)} (a task is "
            "registered when the module defining it is imported)"
        )
    return _TASKS[name]


def registered_synthetic_tasks() -> list[str]:
    return sorted(_TASKS)


Layout = tuple[list[int], list[int]]  # the special ids a tokenizer adds before / after a text


def _per_tokenizer(find: Callable[[Any], Layout | None]) -> Callable[[Any], Layout | None]:
    """Cache ``find(tokenizer)`` per tokenizer object (the entry keeps it alive, so its id is
    not reused); any exception means None: an exotic tokenizer takes the plain path."""
    cache: dict[int, tuple[object, Layout | None]] = {}

    @functools.wraps(find)
    def cached(tokenizer) -> Layout | None:
        hit = cache.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        try:
            layout = find(tokenizer)
        except Exception:  # noqa: BLE001
            layout = None
        if len(cache) > 8:
            cache.clear()
        cache[id(tokenizer)] = (tokenizer, layout)
        return layout

    return cached


def _around(full: list[int], plain: list[int]) -> Layout | None:
    """(before, after): what ``full`` holds around the first occurrence of ``plain``."""
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return None


@_per_tokenizer
def _byte_layout(tokenizer) -> Layout | None:
    """For a byte-level tokenizer (id == UTF-8 byte value, as ``longreach``'s ``byte``
    tokenizer): the special ids it adds before and after a text; None for any other."""
    probe = "a\u00e9\n \u4e2d!"
    plain = list(probe.encode("utf-8"))
    if tokenizer.encode(probe, add_special_tokens=False) != plain:
        return None
    return _around(tokenizer.encode(probe), plain)


# Texts longer than this are encoded in pieces, in parallel, by a tokenizer that allows it.
PARALLEL_ENCODE_CHARS = 1 << 18
_PIECE_CHARS = 1 << 16
_SAFE_CUT = re.compile(r"(?<=\S)\n")  # a line end right after a non-space character


@_per_tokenizer
def _splittable_layout(tokenizer) -> Layout | None:
    """For a fast tokenizer whose encoding of a text is the concatenation of its encodings of
    pieces cut before a line end that follows a non-space character (no normalizer, a
    byte-level GPT-2-regex pre-tokenizer: the regex splits there anyway and BPE merges never
    cross a pre-token): the special ids it adds before and after a text. None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" \
            or not pre.get("use_regex", True):
        return None
    return _around(backend.encode("x", add_special_tokens=True).ids,
                   backend.encode("x", add_special_tokens=False).ids)


def safe_pieces(text: str, piece_chars: int = _PIECE_CHARS) -> list[str]:
    """``text`` cut before line ends that follow a non-space character, in pieces of about
    ``piece_chars`` (longer where no such line end is near); joined, they are ``text``."""
    pieces, at = [], 0
    while len(text) - at > piece_chars:
        cut = _SAFE_CUT.search(text, at + piece_chars)
        if cut is None:
            break
        pieces.append(text[at : cut.start()])
        at = cut.start()
    pieces.append(text[at:])
    return pieces


def encode(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=...)``, computed directly from the UTF-8
    bytes for a byte-level tokenizer, and for a long text (a million-token prompt) in pieces
    on all cores where the tokenizer allows it (``_splittable_layout``): the same ids either
    way, without the tokenizer's per-call overhead or its one-thread encode of a long text
    (building prompts tokenizes filler many times)."""
    layout = _byte_layout(tokenizer)
    if layout is None:
        if len(text) > PARALLEL_ENCODE_CHARS:
            split = _splittable_layout(tokenizer)
            if split is not None:
                encodings = tokenizer.backend_tokenizer.encode_batch(
                    safe_pieces(text), add_special_tokens=False)
                ids = [i for e in encodings for i in e.ids]
                return [*split[0], *ids, *split[1]] if add_special_tokens else ids
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = list(text.encode("utf-8"))
    return [*layout[0], *ids, *layout[1]] if add_special_tokens else ids


def _encode(tokenizer, text: str) -> list[int]:
    return encode(tokenizer, text, add_special_tokens=False)


@register_synthetic_task("copy")
def copy_task(
    rng: np.random.Generator,
    seq_len: int,
    tokenizer,
    *,
    min_length: int = 8,
    max_length: int = 64,
    separator: str = "\nRepeat: ",
    alphabet: str = string.ascii_letters + string.digits,
) -> tuple[np.ndarray, np.ndarray]:
    """``<string><separator><string><eos><pad>...``, scored only on the repeated string.

    The string has ``min_length..max_length`` characters drawn from ``alphabet``. It is
    encoded once and the same ids are repeated, so the target is an exact copy of ids; if
    the sample does not fit ``seq_len`` the string's ids are cut to fit.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"copy task needs 1 <= min_length <= max_length, got {min_length}, {max_length}"
        )
    length = int(rng.integers(min_length, max_length + 1))
    chars = np.array(list(alphabet))
    text = "".join(chars[rng.integers(0, len(chars), size=length)])
    body = _encode(tokenizer, text)
    sep = _encode(tokenizer, separator)
    room = (seq_len - len(sep) - 1) // 2  # two copies, the separator and eos must fit
    if room < 1:
        raise ValueError(
            f"seq_len={seq_len} is too short for the copy task (separator takes {len(sep)} tokens)"
        )
    body = body[:room]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = np.full(seq_len, pad, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    sample = body + sep + body + [eos]
    input_ids[: len(sample)] = sample
    start = len(body) + len(sep)
    labels[start : start + len(body)] = body
    return input_ids, labels


# ---------------------------------------------------------------- filler and prompts

NOISE = "noise"
NOISE_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
# Ends of sentences (or lines) where a needle may go without splitting a sentence.
_BOUNDARY = re.compile(r"(?<=[.!?;:])\s+|\n+")
DOCUMENT_SEPARATOR = "\n\n"
# The held-out haystack: prose of another domain than the built-in corpus (the Python
# language reference; builtin/SOURCE.md), for evaluation only: training tasks refuse it.
HELDOUT_HAYSTACKS = ("heldout", "python-reference")
HELDOUT_PATH = Path(__file__).with_name("builtin") / "python_reference.jsonl.gz"


def _is_plain_text(source: str) -> bool:
    """A haystack read as one text file of paragraphs (the other files are corpora)."""
    path = Path(source).expanduser()
    if path.is_dir() or any(c in source for c in "*?["):
        return False
    name = path.name.lower()
    return not name.endswith((".jsonl", ".jsonl.gz", ".parquet", ".txt.gz"))


class Haystack:
    """Documents of a haystack source, tokenized lazily with one tokenizer.

    Sources: ``"builtin"`` (the built-in corpus, one document per chapter), ``"heldout"``
    (alias ``"python-reference"``: the held-out haystack, one document per topic of the
    Python language reference), ``"noise"`` (RULER's repeated sentences), a UTF-8 text
    file (one document per paragraph), or a corpus that ``iter_documents`` reads (a
    ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file, a folder, a glob): its documents as they
    are, each cut at line ends into pieces of about ``PIECE_CHARS`` (16K) characters, so a
    many-megabyte document (a whole package's source) is tokenized only where filler is
    drawn from it. ``documents`` holds the pieces; ``ends[i]`` says whether a corpus document
    ends with piece ``i`` (filler reads on through a document's pieces and puts the document
    separator only where a document ends).
    """

    PIECE_CHARS = 1 << 14
    CACHED_PIECES = 4096  # tokenized pieces kept (int32 arrays), least recently used dropped

    def __init__(self, source: str | Path, tokenizer):
        self.source = str(source)
        self.tokenizer = tokenizer
        self.ends: list[bool] | None = None
        if self.source == NOISE:
            self.documents = [" ".join([NOISE_TEXT] * 20)]
        elif self.source == "builtin":
            self.documents = list(iter_documents("builtin"))
        elif self.source in HELDOUT_HAYSTACKS:
            self.documents = list(iter_documents(HELDOUT_PATH))
        elif _is_plain_text(self.source):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ValueError(f"haystack file {self.source!r} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"haystack file {self.source!r} is not UTF-8 text") from err
            # paragraphs become documents, so filler can start at many places
            self.documents = [p.strip() for p in text.split("\n\n") if p.strip()]
            if not self.documents:
                raise ValueError(f"haystack file {self.source!r} is empty")
        else:  # a corpus: iter_documents names a bad source in its ValueError
            self.documents, self.ends = [], []
            for document in iter_documents(self.source):
                pieces = split_lines(document, self.PIECE_CHARS)
                self.documents.extend(pieces)
                self.ends.extend([False] * (len(pieces) - 1) + [True])
        if self.ends is None:
            self.ends = [True] * len(self.documents)
        self._ids: OrderedDict[int, np.ndarray] = OrderedDict()
        self._separator = encode(tokenizer, DOCUMENT_SEPARATOR, add_special_tokens=False)

    def document_ids(self, index: int) -> np.ndarray:
        """Token ids of piece ``index``, followed by the separator where a document ends."""
        ids = self._ids.get(index)
        if ids is not None:
            self._ids.move_to_end(index)
            return ids
        ids = encode(self.tokenizer, self.documents[index], add_special_tokens=False)
        if self.ends[index]:
            ids = ids + self._separator
        ids = np.asarray(ids, dtype=np.int32)
        self._ids[index] = ids
        if len(self._ids) > self.CACHED_PIECES:
            self._ids.popitem(last=False)
        return ids

    def filler(self, start: int, n_tokens: int) -> str:
        """Text of about ``n_tokens`` tokens, from document ``start`` on (wrapping around)."""
        if n_tokens <= 0:
            return ""
        parts: list[np.ndarray] = []
        have = 0
        index = start % len(self.documents)
        while have < n_tokens:
            parts.append(self.document_ids(index))
            have += len(parts[-1])
            index = (index + 1) % len(self.documents)
        ids = np.concatenate(parts)[:n_tokens].tolist()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust decoder directly: much faster on long spans
            text = backend.decode(ids, skip_special_tokens=True)
        else:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        # a cut through a multi-byte character decodes to U+FFFD: drop it
        return text.replace("\ufffd", "").strip()

    def random_start(self, rng: np.random.Generator) -> int:
        return int(rng.integers(len(self.documents)))


_HAYSTACKS: dict[tuple[str, int], tuple[object, Haystack]] = {}


def get_haystack(source: str | Path, tokenizer) -> Haystack:
    """A cached Haystack per (source, tokenizer object): tokenizing a corpus is not free."""
    key = (str(source), id(tokenizer))
    cached = _HAYSTACKS.get(key)
    if cached is None or cached[0] is not tokenizer:
        # keep the tokenizer alive with the entry so its id cannot be reused
        cached = (tokenizer, Haystack(source, tokenizer))
        if len(_HAYSTACKS) > 8:
            _HAYSTACKS.clear()
        _HAYSTACKS[key] = cached
    return cached[1]


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence (or line) starts: 0, ..., len(text)."""
    offsets = [0] + [m.end() for m in _BOUNDARY.finditer(text)] + [len(text)]
    return sorted(set(offsets))


def nearest_boundary(text: str, fraction: float) -> int:
    """The sentence boundary of ``text`` closest to ``fraction`` of its length."""
    target = fraction * len(text)
    return min(sentence_boundaries(text), key=lambda b: (abs(b - target), b))


LENGTH_TOLERANCE = 0.01  # prompts are within 1% of the requested token length
_MAX_FIT_ROUNDS = 12


def count_tokens(tokenizer, text: str) -> int:
    """Prompt length as the runner feeds it (special tokens such as BOS included)."""
    return len(encode(tokenizer, text))


def build_prompt(
    rng: np.random.Generator,
    tokenizer,
    haystack: Haystack,
    length: int,
    prefix: str,
    inserts: list[tuple[float, str]],
    suffix: str,
    shortfall: int = 0,
    excess: int = 0,
) -> tuple[str, dict[str, Any]]:
    """``prefix + filler-with-inserts + suffix`` of ``length`` tokens (within 1%).

    ``shortfall`` more tokens short of ``length`` are accepted too, and ``excess`` more
    tokens over it (training rows, which are padded and whose length is drawn below the room
    they have: one more filler word can add two or three tokens, so a short length cannot
    always be hit to 1%).

    ``inserts`` are ``(fraction, text)``: each text goes at the sentence boundary of the
    filler closest to ``fraction`` of it. Returns the prompt and metadata (the first insert's
    requested and actual depth, the token count).
    """
    scaffold_text = prefix + " ".join(text for _, text in inserts) + suffix
    scaffold = count_tokens(tokenizer, scaffold_text)
    if scaffold >= length * (1 - LENGTH_TOLERANCE):
        raise ValueError(
            f"length {length} is too short: the prompt scaffolding (instruction, needles, "
            f"question) alone takes {scaffold} tokens"
        )
    start = haystack.random_start(rng)
    budget = length - scaffold
    over = LENGTH_TOLERANCE * length + excess
    under = LENGTH_TOLERANCE * length + shortfall

    def rank(n: int) -> tuple[bool, int]:  # acceptable first, then the closest
        return (not -under <= n - length <= over, abs(n - length))

    best: tuple[int, str, float] | None = None
    tried: set[int] = set()
    for _ in range(_MAX_FIT_ROUNDS):
        if budget in tried:  # a cycle (one more filler token can add two): nothing new to see
            break
        tried.add(budget)
        filler = haystack.filler(start, budget)
        prompt, actual = _assemble(prefix, filler, inserts, suffix)
        n = count_tokens(tokenizer, prompt)
        if best is None or rank(n) < rank(best[0]):
            best = (n, prompt, actual)
        if n == length:
            break
        budget += length - n
        if budget < 0:
            break
    n, prompt, actual = best
    if rank(n)[0]:
        raise ValueError(
            f"could not fit the prompt to {length} tokens (closest: {n}); the length is too "
            "short for this task"
        )
    meta = {"length": length, "prompt_tokens": n, "depth": inserts[0][0] if inserts else None,
            "needle_depth_actual": actual}
    return prompt, meta


def _assemble(prefix: str, filler: str, inserts: list[tuple[float, str]], suffix: str):
    """Place the inserts into the filler; return the text and the first insert's depth."""
    cuts = [(nearest_boundary(filler, fraction), i, text) for i, (fraction, text) in enumerate(inserts)]
    pieces, last, first_depth = [], 0, None
    for cut, i, text in sorted(cuts):
        pieces.append(filler[last:cut].rstrip())
        pieces.append(text)
        last = cut
        if i == 0:
            first_depth = cut / len(filler) if filler else 0.0
    pieces.append(filler[last:].lstrip())
    body = " ".join(p for p in pieces if p)
    return prefix + body + suffix, first_depth


# ---------------------------------------------------------------- passkey
# Mohtashami & Jaggi 2023: a key hidden in long filler text. The prompts come from
# longreach.data.prompts (splits of phrasings); the eval task of the same name
# (longreach.eval.tasks.passkey) builds its prompts from the same pieces.


def _draw(rng: np.random.Generator, lo: int, hi: int) -> int:
    return lo if lo == hi else int(rng.integers(lo, hi + 1))  # a fixed count draws nothing


def _smallest_room(tokenizer, spec) -> int:
    """The fewest tokens a passkey prompt of ``spec`` can take in ``build_prompt``."""
    scaffold = count_tokens(tokenizer, spec.prefix + " ".join(t for _, t in spec.inserts)
                            + spec.suffix)
    target = int(scaffold / (1 - LENGTH_TOLERANCE))
    while scaffold >= target * (1 - LENGTH_TOLERANCE):
        target += 1
    room = int(target * 1.01)
    while int(room / 1.01) < target:
        room += 1
    return room


@functools.lru_cache(maxsize=16)
def _is_heldout_haystack(haystack: str) -> bool:
    if haystack in HELDOUT_HAYSTACKS:
        return True
    try:
        return Path(haystack).expanduser().resolve() == HELDOUT_PATH.resolve()
    except (OSError, TypeError, ValueError):
        return False


def check_training_haystack(haystack) -> None:
    """Refuse the held-out haystack (by name or by path): it is kept for evaluation."""
    if _is_heldout_haystack(str(haystack)):
        raise ValueError(
            f"haystack {str(haystack)!r} is the held-out haystack, kept for evaluation only; "
            "train on 'builtin', 'noise' or a text file"
        )


@register_synthetic_task("passkey")
def passkey_training_task(
    rng: np.random.Generator,
    seq_len: int,
    tokenizer,
    *,
    split: str = "template",
    needles=1,
    queries=1,
    key_kinds=("digits",),
    digits=None,
    haystack: str = "builtin",
    instruction: bool = True,
    depth: float | None = None,
    min_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A passkey prompt followed by its answers, labels only on the answers.

    ``split`` is ``"template"`` (the classic prompt, the default) or ``"train"`` (the
    training phrasings of ``longreach.data.prompts``); ``"heldout"`` is refused, as is the
    held-out haystack. ``needles`` and ``queries`` (``queries <= needles``) are ints or
    ``[lo, hi]`` ranges drawn per sample; ``key_kinds`` lists the key kinds (``digits``,
    ``word``, ``hex``) and ``digits`` the digit-key length (an int or ``[lo, hi]``; default 5
    for ``template``, 4-7 for ``train``).

    The sequence is ``prompt + " " + key1 [+ ". " + question2 + " " + key2 ...] + eos``:
    each answer's key tokens are labelled, and the end of sequence after the last one; the
    text between answers (the next question) is not. The needle asked first sits at
    ``depth`` (uniform in [0, 1] unless given), the others anywhere. The prompt fills the room
    left after the answers, or, with ``min_fraction < 1``, a length drawn uniformly from
    [min_fraction, 1] of that room (but not below what the scaffold needs), so the answer
    does not always sit at the same position (a model trained on one position learns that
    position); the slack is padded and unscored.
    """
    if split == "heldout":
        raise ValueError(
            "held-out prompts are for evaluation only: the passkey training task takes "
            "split='template' or 'train'"
        )
    check_training_haystack(haystack)
    if not 0.0 < float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    needles_lo, needles_hi = int_range(needles, "needles")
    queries_lo, queries_hi = int_range(queries, "queries")
    if queries_lo > needles_lo:
        raise ValueError(f"queries={queries!r} can exceed needles={needles!r}: each question "
                         "asks about a different needle")
    n_needles = _draw(rng, needles_lo, needles_hi)
    n_queries = _draw(rng, queries_lo, min(queries_hi, n_needles))
    spec = draw_passkey(rng, split, needles=n_needles, queries=n_queries, key_kinds=key_kinds,
                        digits=digits, instruction=instruction, depth=depth)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # (ids, scored) pieces after the prompt, each encoded on its own as the eval prompt is
    tail: list[tuple[list[int], bool]] = []
    for i, key in enumerate(spec.answers):
        if i:
            tail.append((_encode(tokenizer, spec.follow_up(i)), False))
        tail.append((_encode(tokenizer, " " + key), True))
    tail.append(([eos], True))
    room = full_room = seq_len - sum(len(ids) for ids, _ in tail)
    if min_fraction < 1.0:
        drawn = int(room * (min_fraction + (1.0 - min_fraction) * float(rng.random())))
        # not shorter than the instruction, needles and question need (many needles, a short
        # seq_len): such a prompt could not be built at all
        room = max(drawn, min(room, _smallest_room(tokenizer, spec)))
    target = int(room / 1.01)  # the prompt may come out up to 1% long
    prompt, _ = build_prompt(
        rng, tokenizer, get_haystack(haystack, tokenizer), target,
        prefix=spec.prefix, inserts=spec.inserts, suffix=spec.suffix,
        shortfall=max(8, target // 10),  # a training row may be a little short: it is padded
        # and longer than the drawn length while it fits (near the scaffold's size the fit
        # can jump past a short target: one draw in a few thousand on a BPE of code)
        excess=max(0, full_room - int(target * (1 + LENGTH_TOLERANCE))),
    )
    prompt_ids = encode(tokenizer, prompt)
    if len(prompt_ids) > full_room:
        raise ValueError(f"seq_len={seq_len} is too short for the passkey task")
    input_ids = np.full(seq_len, pad, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[: len(prompt_ids)] = prompt_ids
    at = len(prompt_ids)
    for ids, scored in tail:
        input_ids[at : at + len(ids)] = ids
        if scored:
            labels[at : at + len(ids)] = ids
        at += len(ids)
    return input_ids, labels
