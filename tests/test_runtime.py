"""longreach.runtime: device and dtype names, versions, atomic writes of files and folders."""

import os
import stat

import pytest
import torch

from longreach.runtime import (
    atomic_dir,
    atomic_path,
    resolve_device,
    resolve_dtype,
    versions,
    write_atomic,
)


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", "cpu")


def test_versions_name_the_packages():
    info = versions(["safetensors", "no-such-package"])
    assert {"longreach", "python", "torch", "transformers", "safetensors"} <= set(info)
    assert info["no-such-package"] == "not installed"


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "summary.json", "{}\n")
    finally:
        os.umask(old)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~umask, as for any new file


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_atomic(tmp_path / "a.txt", b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_folders_replace_whole_and_respect_the_umask(tmp_path, fsync):
    target = tmp_path / "tok"
    old = os.umask(0o027)
    try:
        with atomic_dir(target, fsync=fsync) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".tok.") and not target.exists()
            (tmp / "a.json").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # 0777 & ~umask, not mkdtemp's 0700
    with atomic_dir(target, fsync=fsync) as tmp:  # replaces the folder, not merged into it
        (tmp / "b.json").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporaries left


def test_a_failed_folder_leaves_the_old_one_and_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target, prefix=".tmp-ckpt-") as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, prefix=".tmp-ckpt-") as tmp:
            assert tmp.name.startswith(".tmp-ckpt-")
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
