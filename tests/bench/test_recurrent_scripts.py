"""benchmarks/recurrent/replicate_gpu.sh refuses a malformed RUNS before anything runs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "recurrent" / "replicate_gpu.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("runs,message", [
    ("a:x:seed=1", "is not NAME:MINUTES:OVERRIDES"),
    (":4:seed=1", "is not NAME:MINUTES:OVERRIDES"),
    ("a:4:seed=1:no-such-condition", "no condition 'no-such-condition'"),
])
def test_a_malformed_run_is_refused_before_anything_runs(tmp_path, runs, message):
    root = tmp_path / "root"
    done = subprocess.run(["bash", str(SCRIPT), str(root)], capture_output=True, text=True,
                          env={**os.environ, "RUNS": f"ok:4:seed=1 {runs}"}, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (root / "shared").exists()  # nothing was built
