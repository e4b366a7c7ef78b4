"""The package's layering, read from the source: no module imports a layer above its own.

Layers, bottom to top (a module may import its own layer and the ones below it):

    runtime -> data (and checkpoints, shipped model folders) -> ops -> cache -> layers
    -> models -> integrations -> train | eval -> bench -> demo -> cli -> __main__

`train` and `eval` stand side by side: neither imports the other (what both need lives below
them). Nothing imports `cli` but `longreach/__main__.py` (`python -m longreach`). The top-level package `longreach` imports `models` (to register
the model with the HF Auto classes, once transformers' are imported), so it sits on the models layer: a lower layer that imports
it (for `__version__`, say) pulls in the models and is flagged; `longreach.runtime` carries
what the lower layers need. Every import counts, module-level or inside a function, absolute or
relative, and `importlib.import_module("longreach...")` with a literal name.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "longreach"

RANKS = {
    "runtime": 0,
    "data": 1,
    "checkpoints": 1,
    "ops": 2,
    "cache": 3,
    "layers": 4,
    "models": 5,
    "": 5,  # longreach/__init__.py: imports the models
    "integrations": 6,
    "train": 7,
    "eval": 7,
    "bench": 8,
    "demo": 9,
    "cli": 10,
    "__main__": 11,  # python -m longreach: runs the cli
}
SIDE_BY_SIDE = {frozenset({"train", "eval"})}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """'longreach.ops.gca.triton' -> 'ops'; 'longreach' -> ''."""
    parts = module.split(".")
    if parts[0] != "longreach":
        raise ValueError(f"not a longreach module: {module!r}")
    if len(parts) == 1:
        return ""
    if parts[1] not in RANKS:
        raise ValueError(f"{module!r} is in no layer; known layers: {sorted(RANKS)}")
    return parts[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every longreach module the file imports, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from longreach import train` imports the subpackage, `from longreach import
            # __version__` the top-level package
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                is_module = (ROOT / sub.replace(".", "/")).is_dir() or (
                    ROOT / (sub.replace(".", "/") + ".py")
                ).is_file()
                found.append((node.lineno, sub if is_module else source))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    found.sort(key=lambda hit: hit[0])  # ast.walk is breadth-first: back to source order
    return [(line, m) for line, m in found if m == "longreach" or m.startswith("longreach.")]


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(module_name(path))
        for line, target in imported_modules(path):
            other = layer(target)
            if other == own:
                continue
            if RANKS[other] > RANKS[own] or frozenset({own, other}) in SIDE_BY_SIDE:
                bad.append(f"{path.relative_to(ROOT)}:{line} {target}")
    return list(dict.fromkeys(bad))  # `from x import a, b` names x once


def test_imports_follow_the_layers():
    bad = violations()
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_every_module_is_in_a_layer():
    # a new top-level module or subpackage must be given its place in RANKS
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path))


def test_the_import_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    fake = tmp_path / "longreach"
    (fake / "ops" / "gca").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "ops" / "backend.py").write_text("")
    (fake / "ops" / "gca" / "__init__.py").write_text(
        "from . import reference\n"
        "from ..backend import pick\n"
        "import longreach.runtime\n"
        "def lazy():\n"
        "    from longreach.train import train\n"
        "    from longreach import __version__, train as t\n"
        "    importlib.import_module('longreach.eval.runner')\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    got = imported_modules(fake / "ops" / "gca" / "__init__.py")
    assert got == [
        (1, "longreach.ops.gca"),
        (2, "longreach.ops.backend"),
        (3, "longreach.runtime"),
        (5, "longreach.train"),
        (6, "longreach"),
        (6, "longreach.train"),
        (7, "longreach.eval.runner"),
    ]


def test_import_longreach_loads_no_optional_heavy_packages():
    """`import longreach` (the HF Auto registration) stays light: lm-eval, datasets and
    matplotlib load only where an eval, a dataset source or a plot needs them."""
    heavy = ("lm_eval", "datasets", "matplotlib")
    code = f"import sys, longreach; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
