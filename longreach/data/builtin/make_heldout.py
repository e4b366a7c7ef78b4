"""Rebuild ``python_reference.jsonl.gz``, the held-out haystack, from Python's own reference text.

Run by maintainers (``python make_heldout.py``); the runtime only reads the shipped file. The
source is the ``topics`` dict of the standard library module ``pydoc_data.topics``: the
Python language reference as plain English text, the pages ``help()`` shows. One document
per topic, in sorted topic order: its title line, then one paragraph per line. Headings'
underlines, code examples and grammar rules are dropped, so what is left is prose; runs of
whitespace collapse to one space. The output depends only on the Python version that runs
this script (SOURCE.md names the one the shipped file came from) and is byte-for-byte
reproducible.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

from longreach.runtime import write_atomic

OUT = Path(__file__).with_name("python_reference.jsonl.gz")

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'#+`])\1{2,}\s*$")
_PROSE = re.compile(r"^[A-Z\"(].*[.:!?]$")


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one topic, each on one line."""
    lines = [line for line in text.splitlines() if not _UNDERLINE.match(line)]
    blocks, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    kept = []
    for block in blocks:
        joined = re.sub(r"\s+", " ", " ".join(block)).strip()
        if ">>>" in joined or "::=" in joined or "..." == joined:
            continue  # interactive examples and grammar rules
        letters = sum(c.isalpha() for c in joined)
        words = joined.split()
        # prose: whole sentences (a capital first, a full stop last), mostly letters; code
        # examples fail one or the other
        if len(words) >= 6 and _PROSE.match(joined) and letters >= 0.6 * len(joined):
            kept.append(joined)
    return kept


def documents() -> list[dict]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = topics[name]
        title = re.sub(r"\s+", " ", text.strip().splitlines()[0]).strip()
        body = paragraphs(text)
        if body:
            docs.append({"topic": name, "text": "\n".join([title, *body])})
    return docs


def main() -> None:
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives byte-identical output.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        for doc in documents():
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    write_atomic(OUT, buffer.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
