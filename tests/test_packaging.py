"""A wheel install (not editable) used from another folder finds the shipped recipes and
checkpoints: they are package data, not files of the source checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
def test_wheel_install_finds_recipes_and_checkpoints(tmp_path):
    # build from a clean copy, so no build/ folder of the checkout leaks into the wheel
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "longreach", src / "longreach",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the installed build backend builds it when it can (nothing downloaded); otherwise pip
    # fetches the backend the project names, as any install from source does
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "dist"), "-q"]
    offline = subprocess.run([*build, "--no-build-isolation"], cwd=src, capture_output=True, text=True,
                             timeout=600)
    if offline.returncode != 0:  # no setuptools, or one too old to build wheels by itself
        run(build, cwd=src)
    wheel = next((tmp_path / "dist").glob("longreach-*.whl"))

    venv = tmp_path / "venv"  # torch and the other dependencies come from the system
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index",
         "-q", str(wheel)], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import longreach, pathlib\n"
        "from longreach.checkpoints import checkpoint_path\n"
        "from longreach.train import find_recipe, load_config\n"
        "for name in ('tiny-swa', 'cca-finetune', 'gca-tiny', 'swa-tiny'):\n"
        "    load_config(find_recipe(name), [])\n"
        "assert checkpoint_path('gca-tiny').joinpath('model.safetensors').is_file()\n"
        "print(pathlib.Path(longreach.__file__).parent)\n"
        "print(find_recipe('tiny-swa'))\n"
    )
    out = run([str(python), "-c", code], cwd=elsewhere, env=env).stdout.split()
    package, recipe = Path(out[0]), Path(out[1])
    assert venv in package.parents  # the wheel's copy, not the checkout's
    assert recipe == package / "configs" / "tiny-swa.yaml"
