"""A built wheel holds every Python package of the source tree, the Triton kernels as zokern.kernels (never a
top-level `kernels`) and the C++/CUDA sources the extensions compile from."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package_kernel_and_source(tmp_path):
    # From a clean copy: setuptools' build/ folder in the checkout would carry files of earlier builds.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".build", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".benchmarks"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("zokern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"zokern/{p.relative_to(ROOT / 'zokern').as_posix()}" for p in (ROOT / "zokern").rglob("*.py")}
    expected |= {f"zokern/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"zokern/_csrc/{p.relative_to(ROOT / 'csrc').as_posix()}" for p in (ROOT / "csrc").rglob("*")
                 if p.suffix in {".h", ".cpp", ".inc", ".cu", ".cuh"}}
    assert expected - names == set()
    assert not any(n.startswith("kernels/") for n in names)
