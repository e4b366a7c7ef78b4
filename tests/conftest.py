import os

import torch

# Triton kernels run on CPU tensors in Triton's interpreter; the variable must be set before
# any kernel module is imported (i.e. before longreach.ops.*.triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# GPU runs on a time budget: LONGREACH_TEST_AUTOTUNE=first makes Triton's autotuned kernels
# (fla-core's) take their first valid config instead of timing every one on the first call
@pytest.fixture(autouse=True, scope="session")
def _autotune():
    if torch.cuda.is_available() and os.environ.get("LONGREACH_TEST_AUTOTUNE") == "first":
        from longreach.ops.backend import autotune_override

        with autotune_override("first"):
            yield
    else:
        yield


# keep CPU test runs predictable on small machines
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    # the `gpu` tier (pyproject's markers) is selected by `-m gpu` and skipped without CUDA
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="gpu test: needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # token caches go to a per-session temp folder, never the user's home
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
