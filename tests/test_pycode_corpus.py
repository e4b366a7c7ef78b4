"""The installed-packages source corpus (longreach.data.pycode), built from fake
site-packages trees: one document per package, split by package, licences, skip rules."""

import gzip
import json
from email.message import Message
from pathlib import Path

import pytest

from longreach.data import pycode
from longreach.data.corpus import iter_documents
from longreach.data.pycode import (
    assign_splits,
    build_pycode_corpus,
    heldout_hash,
    read_licence,
    spdx_class,
)

CAP = 1000  # max_file_bytes in these tests


def make_dist(site, name, version, files, *, metadata=(), extra_record=()):
    """A dist-info folder with METADATA and RECORD, and ``files`` (path -> str or bytes)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *metadata]
    (info / "METADATA").write_text("\n".join(lines) + "\n\n")
    record = []
    for rel, content in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        record.append(f"{rel},sha256=x,{len(content)}")
    record += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,", *extra_record]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site-packages"
    make_dist(site, "Alpha", "1.0", {
        "alpha/__init__.py": "from .core import f\n",
        "alpha/sub/mod.py": "X = 1",  # no final newline
        "alpha/core.py": "\ufeffdef f():\r\n    return 1\r\n",  # BOM and CRLF
        "alpha/data.txt": "not python\n",
    }, metadata=["License-Expression: MIT"], extra_record=["../../bin/alpha-tool.py,,"])
    make_dist(site, "beta_pkg", "2.0", {
        "beta.py": "import os\n",
        "beta_latin1.py": "# caf\xe9\n".encode("latin-1"),  # not UTF-8
    }, metadata=["License: GPL-3.0-or-later",
                 "Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)"])
    make_dist(site, "gamma", "0.3", {
        "gamma/__init__.py": "",
        "gamma/generated.py": "x = 0\n" * 400,  # 2,400 bytes > CAP
        "gamma/ok.py": "y = 2\n",
    }, metadata=["Classifier: License :: OSI Approved :: BSD License"],
        extra_record=["gamma/gone.py,,"])  # listed but missing
    make_dist(site, "Delta.Thing", "4", {"delta/x.py": "z = 3\n"}, metadata=["License: UNKNOWN"])
    make_dist(site, "epsilon", "5", {"epsilon/data.json": "{}"})  # no .py files
    return site


def build(site, out, **kw):
    kw.setdefault("max_file_bytes", CAP)
    kw.setdefault("progress", False)
    return build_pycode_corpus(out, paths=[site], **kw)


def read_split(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_name(manifest):
    return {p["name"]: p for p in manifest["packages"]}


def test_one_document_per_package_in_path_order_with_headers(site, tmp_path):
    out = tmp_path / "corpus"
    manifest = build(site, out)
    docs = {d["package"]: d for s in manifest["splits"].values() for d in read_split(out / s["file"])}
    assert sorted(docs) == ["Alpha", "Delta.Thing", "beta_pkg", "gamma"]
    assert docs["Alpha"]["text"] == (
        "# file: alpha/__init__.py\nfrom .core import f\n\n"
        "# file: alpha/core.py\ndef f():\n    return 1\n\n"
        "# file: alpha/sub/mod.py\nX = 1\n"
    )
    assert docs["gamma"]["text"] == "# file: gamma/__init__.py\n\n# file: gamma/ok.py\ny = 2\n"
    assert docs["Alpha"]["version"] == "1.0" and docs["Alpha"]["licence"] == "MIT"
    entry = by_name(manifest)["Alpha"]
    assert entry["files"] == 3 and entry["bytes"] == len(docs["Alpha"]["text"].encode())
    assert "epsilon" not in docs
    assert any(e["name"] == "epsilon" and "no .py files" in e["reason"]
               for e in manifest["excluded"])
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_the_skip_rules_are_recorded(site, tmp_path):
    manifest = build(site, tmp_path / "corpus")
    pkgs = by_name(manifest)
    assert pkgs["Alpha"]["skipped"] == [
        {"path": "../../bin/alpha-tool.py", "reason": "outside site-packages"}]
    assert pkgs["beta_pkg"]["skipped"] == [
        {"path": "beta_latin1.py", "reason": "not UTF-8", "bytes": 7}]
    assert pkgs["beta_pkg"]["files"] == 1
    assert pkgs["gamma"]["skipped"] == [
        {"path": "gamma/generated.py", "reason": "over max_file_bytes", "bytes": 2400},
        {"path": "gamma/gone.py", "reason": "missing"},
    ]
    bigger = build(site, tmp_path / "corpus2", max_file_bytes=10_000)
    assert by_name(bigger)["gamma"]["files"] == 3


def test_the_split_is_by_package_disjoint_and_deterministic(site, tmp_path):
    a = build(site, tmp_path / "a")
    b = build(site, tmp_path / "b")
    for name in ("train.jsonl.gz", "heldout.jsonl.gz", "manifest.json"):  # byte for byte
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    train = {d["package"] for d in read_split(tmp_path / "a" / "train.jsonl.gz")}
    held = {d["package"] for d in read_split(tmp_path / "a" / "heldout.jsonl.gz")}
    assert train and held and not train & held
    assert train | held == set(by_name(a))
    assert {p["name"] for p in a["packages"] if p["split"] == "heldout"} == held
    # with 5% of 4 packages none falls under the hash: the smallest hash is held out
    assert held == {min(by_name(a), key=heldout_hash)}
    # documents are sorted by normalized name in each split
    order = [d["package"] for d in read_split(tmp_path / "a" / "train.jsonl.gz")]
    assert order == sorted(order, key=pycode.normalize_name)
    none = build(site, tmp_path / "c", heldout_fraction=0.0)
    assert set(none["splits"]) == {"train"} and not (tmp_path / "c" / "heldout.jsonl.gz").exists()


def fake_packages(n, large=()):
    """``n`` packages pkg-0 .. pkg-{n-1} of one file each: 2 MiB for those in ``large``."""
    pkgs = []
    for i in range(n):
        name = f"pkg-{i}"
        pkg = pycode._Package(name, "1", Path("/site"), read_licence(Message()))
        pkg.files = [(f"{name}.py", Path(f"/site/{name}.py"), 2 << 20 if name in large else 10)]
        pkgs.append(pkg)
    return pkgs


def test_the_heldout_share_follows_the_hash_and_keeps_large_packages():
    pkgs = fake_packages(2000)
    assign_splits(pkgs, heldout_fraction=0.05, heldout_min_large=3, large_bytes=1 << 20)
    held = [p for p in pkgs if p.split == "heldout"]
    assert 0.04 < len(held) / len(pkgs) < 0.06
    assert all((p.split == "heldout") == (heldout_hash(p.name) < 0.05) for p in pkgs)

    large = [f"pkg-{i}" for i in range(10)]
    pkgs = fake_packages(40, large=large)
    assign_splits(pkgs, heldout_fraction=0.05, heldout_min_large=3, large_bytes=1 << 20)
    held_large = [p.name for p in pkgs if p.split == "heldout" and p.name in large]
    assert len(held_large) >= 3
    # the ones moved there are the large packages with the smallest hashes
    assert set(sorted(large, key=heldout_hash)[:3]) <= set(held_large)
    assert any(p.split == "train" for p in pkgs)


@pytest.mark.parametrize("expression, cls", [
    ("MIT", "permissive"),
    ("Apache-2.0 WITH LLVM-exception", "permissive"),
    ("MIT OR GPL-3.0-only", "permissive"),
    ("MIT AND GPL-3.0-only", "copyleft"),
    ("(MIT OR Apache-2.0) AND BSD-3-Clause", "permissive"),
    ("LGPL-2.1+", "copyleft"),
    ("LicenseRef-Proprietary", "unknown"),
    ("Apache 2.0 License", None),  # not SPDX
    ("MIT AND", None),
])
def test_spdx_expressions(expression, cls):
    assert spdx_class(expression) == cls


def meta(**fields):
    msg = Message()
    for key, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            msg[key.replace("_", "-")] = value
    return msg


def test_licences_read_from_metadata():
    lic = read_licence(meta(License_Expression="BSD-3-Clause AND MIT"))
    assert (lic.name, lic.cls) == ("BSD-3-Clause AND MIT", "permissive")
    lic = read_licence(meta(License="Apache 2.0",
                            Classifier="License :: OSI Approved :: Apache Software License"))
    assert (lic.name, lic.cls) == ("Apache 2.0", "permissive")
    assert lic.classifiers == ("OSI Approved :: Apache Software License",)
    lic = read_licence(meta(License="UNKNOWN",
                            Classifier="License :: OSI Approved :: ISC License (ISCL)"))
    assert (lic.name, lic.cls) == ("ISC License (ISCL)", "permissive")
    # several classifiers: the most restrictive one counts
    lic = read_licence(meta(Classifier=["License :: OSI Approved :: MIT License",
                                        "License :: OSI Approved :: GNU General Public License (GPL)"]))
    assert lic.cls == "copyleft"
    lic = read_licence(meta(License="The MIT License (MIT)\n\nPermission is hereby granted..."))
    assert (lic.name, lic.cls, lic.field) == ("The MIT License (MIT)", "permissive",
                                              "The MIT License (MIT)")
    lic = read_licence(meta(License="Dual License"))
    assert (lic.name, lic.cls) == ("Dual License", "unknown")
    assert read_licence(meta()).name == "UNKNOWN"


def test_the_manifest_records_licences_and_the_filter_keeps_them(site, tmp_path):
    pkgs = by_name(build(site, tmp_path / "all"))
    assert {n: (p["licence"], p["licence_class"]) for n, p in pkgs.items()} == {
        "Alpha": ("MIT", "permissive"),
        "beta_pkg": ("GPL-3.0-or-later", "copyleft"),
        "gamma": ("BSD License", "permissive"),
        "Delta.Thing": ("UNKNOWN", "unknown"),
    }
    assert pkgs["gamma"]["licence_classifiers"] == ["OSI Approved :: BSD License"]
    permissive = build(site, tmp_path / "permissive", licences="permissive")
    assert set(by_name(permissive)) == {"Alpha", "gamma"}
    reasons = {e["name"]: e["reason"] for e in permissive["excluded"]}
    assert "copyleft" in reasons["beta_pkg"] and "unknown" in reasons["Delta.Thing"]
    assert set(by_name(build(site, tmp_path / "osi", licences="osi"))) == {
        "Alpha", "beta_pkg", "gamma"}
    with pytest.raises(ValueError, match="licences must be one of"):
        build(site, tmp_path / "bad", licences="mit")


def test_the_corpus_readers_read_the_output(site, tmp_path):
    out = tmp_path / "corpus"
    build(site, out)
    docs = list(iter_documents(out / "train.jsonl.gz")) + list(iter_documents(out / "heldout.jsonl.gz"))
    assert len(docs) == 4 and all(d.startswith("# file: ") for d in docs)
    plain = tmp_path / "plain"
    build(site, plain, compress=False)
    assert sorted(p.name for p in plain.iterdir()) == ["heldout.jsonl", "manifest.json", "train.jsonl"]
    assert sorted(iter_documents([plain / "train.jsonl", plain / "heldout.jsonl"])) == sorted(docs)


def test_the_output_folder_rules(site, tmp_path):
    deep = tmp_path / "a" / "b" / "corpus"  # missing parents are created
    build(site, deep)
    assert (deep / "manifest.json").is_file()
    build(site, deep, compress=False)  # a folder it made is rebuilt; the old files go
    assert sorted(p.name for p in deep.iterdir()) == ["heldout.jsonl", "manifest.json", "train.jsonl"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "manifest.json").write_text('{"tool": "something else"}')
    with pytest.raises(ValueError, match="not made by longreach.data.pycode.*nothing was changed"):
        build(site, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json", "notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build(site, a_file)


def test_clear_errors_for_the_paths(tmp_path):
    empty = tmp_path / "empty-site"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no installed Python distributions.*{empty}"):
        build(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="does not exist"):
        build(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="heldout_fraction"):
        build(empty, tmp_path / "out", heldout_fraction=1.0)


def test_an_earlier_root_shadows_a_later_one(site, tmp_path):
    other = tmp_path / "other" / "site-packages"
    make_dist(other, "alpha", "9.9", {"alpha_old/__init__.py": "OLD = 1\n"})
    manifest = build_pycode_corpus(tmp_path / "out", paths=[site, other], progress=False)
    assert by_name(manifest)["Alpha"]["version"] == "1.0"
    assert [e["reason"] for e in manifest["excluded"] if e["name"] == "alpha"] == [
        f"shadowed by Alpha 1.0 in {site}"]


def test_the_module_command(site, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert pycode.main(["--out", str(out), "--paths", str(site), "--quiet",
                        "--licences", "permissive"]) == 0
    assert set(by_name(json.loads((out / "manifest.json").read_text()))) == {"Alpha", "gamma"}
    assert pycode.main(["--out", str(tmp_path / "x"), "--paths", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_longreach_corpus_command(site, tmp_path, capsys):
    from longreach import cli

    out = tmp_path / "corpus"
    assert cli.main(["corpus", "build-pycode", "--out", str(out), "--paths", str(site),
                     "--max-file-bytes", str(CAP), "--no-gzip", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "built a corpus of 4 packages" in printed and "train.jsonl" in printed
    assert by_name(json.loads((out / "manifest.json").read_text()))["gamma"]["files"] == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("x")
    assert cli.main(["corpus", "build-pycode", "--out", str(tmp_path / "foreign"),
                     "--paths", str(site)]) == 2
    assert "longreach corpus: error: --out" in capsys.readouterr().err
