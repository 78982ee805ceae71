"""tests/cuda_errors.py: an xdist worker whose CUDA context broke ends after reporting that test; elsewhere nothing
changes. Run on a pytest subprocess over two tests, the first failing with a sticky CUDA error's message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = '''
def test_breaks_the_context():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_after():
    pass
'''


def run(tmp_path, worker: "str | None"):
    (tmp_path / "test_two.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    if worker:
        env["PYTEST_XDIST_WORKER"] = worker
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "cuda_errors", "-p", "no:cacheprovider", "-v",
                           "test_two.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("worker", ["gw0", None], ids=["xdist-worker", "plain-run"])
def test_a_broken_cuda_context_ends_only_an_xdist_worker(tmp_path, worker):
    done = run(tmp_path, worker)
    assert "test_breaks_the_context FAILED" in done.stdout, done.stdout
    if worker:
        assert done.returncode == 3 and "test_after" not in done.stdout, done.stdout
    else:
        assert done.returncode == 1 and "test_after PASSED" in done.stdout, done.stdout
