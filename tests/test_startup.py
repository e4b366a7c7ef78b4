"""The ``longreach`` command starts fast: importing the package and building the CLI's parser
load no heavy package (torch alone takes seconds on a small CPU), and yet ``import longreach``
still registers the model types with transformers' Auto classes, whatever is imported next.

Each check runs in a fresh interpreter: this one has torch and the models loaded already.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "triton", "lm_eval", "datasets", "matplotlib", "pyarrow")


def run(*args: str) -> str:
    """stdout of ``python ARGS`` in a fresh interpreter that imports this checkout."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def python(code: str) -> str:
    return run("-c", code)


def loaded(code: str) -> list[str]:
    """The HEAVY packages in sys.modules after running ``code``."""
    out = python(f"{code}\nimport json, sys\n"
                 f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    return json.loads(out.strip().splitlines()[-1])


def test_import_longreach_loads_nothing_heavy():
    assert loaded("import longreach") == []


def test_building_the_cli_parser_loads_nothing_heavy():
    assert loaded("import longreach.cli\nlongreach.cli.build_parser()") == []


def test_help_loads_nothing_heavy():
    code = ("import contextlib, io, longreach.cli\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        longreach.cli.main(['--help'])\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code == 0\n"
            "assert all(c in out.getvalue() for c in ('train', 'eval', 'bench', 'info', 'lm-eval'))")
    assert loaded(code) == []


def test_top_level_help_names_every_command(capsys):
    import argparse

    import longreach.cli

    parser = longreach.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = list(sub.choices)
    assert {"train", "finetune", "sweep", "generate", "eval", "lm-eval", "demo"} <= set(commands)
    parser.print_help()
    listed = capsys.readouterr().out.split("positional arguments")[1]
    missing_help = [c for c in commands if f"    {c} " not in listed and f"    {c}\n" not in listed]
    assert missing_help == []  # each command has a line with its summary
    intro = parser.description.split("(")[0]  # "The ``longreach`` command: train, ..."
    assert [c for c in commands if c not in intro] == []


def test_info_loads_no_optional_package():
    code = ("import contextlib, io, sys, longreach.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert longreach.cli.main(['info', '--json']) == 0\n"
            "assert 'longreach.models' not in sys.modules  # the models' seconds of imports")
    # torch (devices) and transformers' cache classes (the mixers) are what info reports on
    assert set(loaded(code)) <= {"torch", "transformers"}


def test_the_exported_names_still_import():
    import longreach
    import longreach.models

    for name in longreach.__all__:
        assert getattr(longreach, name) is getattr(longreach.models, name, longreach.__version__)
    assert set(longreach.__all__) <= set(dir(longreach))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        longreach.nothing  # noqa: B018
    # longreach.data re-exports its modules' names the same way
    import longreach.data
    from longreach.data import loader, tokenizer

    assert longreach.data.load_tokenizer is tokenizer.load_tokenizer
    assert longreach.data.BatchLoader is loader.BatchLoader
    assert all(callable(getattr(longreach.data, name)) for name in longreach.data.__all__)


@pytest.mark.slow
def test_a_saved_model_loads_through_the_auto_class_after_import_longreach(tmp_path):
    from longreach import LongReachConfig, LongReachForCausalLM

    config = LongReachConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, mixers=["swa", "full"])
    LongReachForCausalLM(config).save_pretrained(tmp_path / "model")
    # what docs/gca.md shows: nothing of longreach but the package, then transformers
    out = python("import longreach\n"
                 "from transformers import AutoModelForCausalLM\n"
                 f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})\n"
                 "print(type(model).__name__)")
    assert out.split()[-1] == "LongReachForCausalLM"


# what comes first in a fresh interpreter; then the Auto classes must know both model types
FIRST_IMPORTS = (
    "import transformers; import longreach",  # registered when the Auto classes are imported
    "from transformers import AutoConfig; import longreach",  # registered by import longreach
    "import longreach.layers",  # a lower layer (longreach.cache) imports transformers midway
    "import longreach.data.tokenizer",  # imports transformers' Auto classes midway
    "import longreach; from transformers import PreTrainedModel",  # the Auto package midway
)
AUTO_CHECK = """
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
for model_type in ("longreach", "longreach-gca"):
    config = AutoConfig.for_model(model_type)
    print(type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__,
          AutoModel._model_mapping[type(config)].__name__)
# the modules imported while the registration waited keep their own loaders
import longreach.cache, longreach.layers
assert type(longreach.cache.__loader__).__name__ == "SourceFileLoader"
assert longreach.layers.__spec__.loader is longreach.layers.__loader__
"""


@pytest.mark.slow
def test_the_auto_classes_know_the_model_types_whatever_comes_first():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {first: subprocess.Popen([sys.executable, "-c", first + "\n" + AUTO_CHECK], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
             for first in FIRST_IMPORTS}  # side by side: each is seconds of imports
    for first, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{first}:\n{err[-4000:]}"
        assert out.splitlines()[-2:] == ["LongReachConfig LongReachForCausalLM LongReachModel",
                                         "GCAConfig GCAForCausalLM GCAModel"], first


@pytest.mark.slow
def test_python_dash_m_runs_through_the_watched_import():
    # runpy reads the code of longreach.train.__main__ through the loader the finder hands it
    assert "usage: python -m longreach.train" in run("-m", "longreach.train", "--help")
