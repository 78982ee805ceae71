"""A built wheel holds every Python package of the source tree, the Triton kernels as zokern.kernels (never a
top-level `kernels`) and the C++/CUDA sources the extensions compile from; installed on its own, outside the
checkout, it compiles and runs the C++ backend from those sources. `import zokern` brings the optimizers and
nothing heavy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from zokern import backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a clean copy: setuptools' build/ folder in the checkout would carry files of earlier builds.
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".build", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".benchmarks"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (built,) = tmp_path.glob("zokern-*.whl")
    return built


def test_wheel_holds_every_package_kernel_and_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"zokern/{p.relative_to(ROOT / 'zokern').as_posix()}" for p in (ROOT / "zokern").rglob("*.py")}
    expected |= {f"zokern/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"zokern/_csrc/{p.relative_to(ROOT / 'csrc').as_posix()}" for p in (ROOT / "csrc").rglob("*")
                 if p.suffix in {".h", ".cpp", ".inc", ".cu", ".cuh"}}
    assert expected - names == set()
    assert not any(n.startswith("kernels/") for n in names)


_INSTALLED_PROBE = """
import json, sys, torch, zokern
from zokern import backends, library
from zokern.backends import _extension

ok, why = backends.availability("cpp", "cpu")
params = [torch.linspace(-1, 1, 37), torch.linspace(-2, 2, 9).bfloat16()]
want = [p.clone() for p in params]
calls = []
cpp_perturb = library.IMPLEMENTATIONS[("perturb_", "cpu", "cpp")]
library.IMPLEMENTATIONS[("perturb_", "cpu", "cpp")] = lambda *args: calls.append(args) or cpp_perturb(*args)
zokern.perturb_(params, 7, 0.5, stream_ids=[0, 1], backend="cpp")
zokern.perturb_(want, 7, 0.5, stream_ids=[0, 1], backend="reference")
json.dump({"zokern": zokern.__file__, "sources": str(_extension.source_dir()), "available": ok, "why": why,
           "auto": backends.resolve(None, "cpu"), "cpp_launches": len(calls),
           "close": all(torch.allclose(p.float(), w.float(), rtol=1e-2, atol=1e-2) for p, w in zip(params, want)),
           "moved": not torch.equal(params[0], torch.linspace(-1, 1, 37))}, sys.stdout)
"""


@pytest.mark.skipif(not backends.availability("cpp", "cpu")[0],
                    reason=f"cpp backend unavailable here: {backends.availability('cpp', 'cpu')[1]}")
def test_installed_wheel_builds_and_runs_the_cpp_backend(wheel, tmp_path):
    """The wheel alone (not the checkout, which an editable install would find) must give the C++ backend."""
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in {"ZOKERN_BACKEND", "ZOKERN_CPP_LIBRARY"}}
    env.update(PYTHONPATH=str(target), ZOKERN_BUILD_DIR=str(tmp_path / "build"))
    run = subprocess.run([sys.executable, "-c", _INSTALLED_PROBE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert Path(found["zokern"]).is_relative_to(target), found["zokern"]
    assert Path(found["sources"]) == (target / "zokern" / "_csrc").resolve(), found["sources"]
    assert found["available"], found["why"]
    assert found["auto"] == "cpp" and found["cpp_launches"] == 1
    assert found["close"] and found["moved"]


def test_import_zokern_brings_the_optimizers_and_nothing_heavy():
    probe = ("import sys, zokern; assert zokern.optim.SubZero is zokern.optim.METHODS['subzero']; "
             "print(sorted(m for m in ('transformers', 'peft', 'triton') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"


def test_a_required_backend_that_is_missing_stops_the_test_run(tmp_path):
    """$ZOKERN_REQUIRE_BACKENDS (CI): a required backend that fails to load ends the run with its reason, instead
    of the tests that need it being skipped."""
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "ZOKERN_REQUIRE_BACKENDS": "reference,cpp",
           "ZOKERN_CPP_LIBRARY": str(tmp_path / "missing.so")}  # an unreadable manifest: cpp unavailable
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "cpp" in run.stdout + run.stderr and "missing.so" in run.stdout + run.stderr, run.stdout[-2000:]
