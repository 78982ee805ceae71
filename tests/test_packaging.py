"""A built wheel holds every Python package of the source tree, the Triton kernels as zokern.kernels (never a
top-level `kernels`), the C++/CUDA sources and the CPU extension compiled at build time; installed on its own,
outside the checkout, it runs the C++ backend from that library, compiling nothing. `import zokern` brings the
optimizers and nothing heavy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a clean copy: setuptools' build/ folder in the checkout would carry files of earlier builds.
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".build", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".benchmarks", "*.so",
                                                                "zokern_*.json", ".gpu", ".whl"))
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
    expected |= {"zokern/zokern_cpp.so", "zokern/zokern_cpp.json"}  # built by setup.py, with its build stamp
    assert expected - names == set()
    assert not any(n.startswith("kernels/") for n in names)


_INSTALLED_PROBE = """
import json, sys, warnings, torch, zokern
from zokern import backends, library
from zokern.backends import _extension

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok, why = backends.availability("cpp", "cpu")
params = [torch.linspace(-1, 1, 37), torch.linspace(-2, 2, 9).bfloat16()]
want = [p.clone() for p in params]
calls = []
cpp_perturb = library.IMPLEMENTATIONS[("perturb_", "cpu", "cpp")]
library.IMPLEMENTATIONS[("perturb_", "cpu", "cpp")] = lambda *args: calls.append(args) or cpp_perturb(*args)
zokern.perturb_(params, 7, 0.5, stream_ids=[0, 1], backend="cpp")
zokern.perturb_(want, 7, 0.5, stream_ids=[0, 1], backend="reference")
json.dump({"zokern": zokern.__file__, "sources": str(_extension.source_dir()), "available": ok, "why": why,
           "warnings": [str(w.message) for w in caught],
           "loaded": sorted({line.split()[-1] for line in open("/proc/self/maps") if "zokern_cpp" in line}),
           "auto": backends.resolve(None, "cpu"), "cpp_launches": len(calls),
           "close": all(torch.allclose(p.float(), w.float(), rtol=1e-2, atol=1e-2) for p, w in zip(params, want)),
           "moved": not torch.equal(params[0], torch.linspace(-1, 1, 37))}, sys.stdout)
"""


def test_installed_wheel_runs_the_cpp_backend_it_was_built_with(wheel, tmp_path):
    """The wheel alone (not the checkout, which an editable install would find) must give the C++ backend, from the
    library compiled when the wheel was built: no compiler is there to fall back on, and nothing is compiled."""
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    build = tmp_path / "build"
    env.update(PYTHONPATH=str(target), ZOKERN_BUILD_DIR=str(build), CXX="no-such-compiler-zokern")
    run = subprocess.run([sys.executable, "-c", _INSTALLED_PROBE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert Path(found["zokern"]).is_relative_to(target), found["zokern"]
    assert Path(found["sources"]) == (target / "zokern" / "_csrc").resolve(), found["sources"]
    library = (target / "zokern" / "zokern_cpp.so").resolve()
    assert found["available"] and found["why"] == f"zokern_cpp built at install: {library}", found["why"]
    assert found["loaded"] == [str(library)] and found["warnings"] == [] and not build.exists()
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
    for name in ("conftest.py", "cuda_errors.py"):  # the configuration and the hooks it takes
        shutil.copy(ROOT / "tests" / name, tmp_path / name)
    # A plugin (loaded before the conftest checks) that makes the cpp backend unavailable, with its reason.
    (tmp_path / "cpp_unavailable.py").write_text(
        "from zokern.backends import _extension\n"
        "_extension.CPU_EXTENSION._result = (False, 'zokern_cpp.so does not load (a test-made failure)')\n")
    env = {**os.environ, "ZOKERN_REQUIRE_BACKENDS": "reference,cpp", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "cpp_unavailable",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "backend cpp is not available on cpu: zokern_cpp.so does not load" in run.stdout + run.stderr, (
        run.stdout[-2000:])


_SETUP_PROBE = """
import json, os, runpy, sys
import setuptools, torch, torch.utils.cpp_extension as cpp_extension

os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
if sys.argv[1] == "cuda":  # a CUDA torch and a CUDA toolkit, as setup.py sees them
    torch.version.cuda, cpp_extension.CUDA_HOME = "13.0", "/usr/local/cuda"
setuptools.setup = lambda **kw: json.dump({
    "extensions": {e.name: {"sources": e.sources, "args": e.extra_compile_args, "link": e.extra_link_args}
                   for e in kw["ext_modules"]},
    "arch": os.environ.get("TORCH_CUDA_ARCH_LIST")}, sys.stdout)
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py")
"""


def _setup_extensions(torch_kind: str) -> dict:
    run = subprocess.run([sys.executable, "-c", _SETUP_PROBE, torch_kind], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_setup_builds_the_cpu_extension_only_with_a_cpu_torch():
    from zokern.backends import _build

    found = _setup_extensions("cpu")
    assert found == {"extensions": {"zokern.zokern_cpp": {
        "sources": ["csrc/cpu/zo_cpu.cpp"], "args": {"cxx": list(_build.CXX_FLAGS), "nvcc": list(_build.NVCC_FLAGS)},
        "link": list(_build.LDFLAGS)}}, "arch": None}


def test_setup_builds_the_cuda_extension_for_hopper_with_a_cuda_torch_and_toolkit():
    from zokern.backends import _build

    found = _setup_extensions("cuda")
    assert set(found["extensions"]) == {"zokern.zokern_cpp", "zokern.zokern_cuda"}
    cuda = found["extensions"]["zokern.zokern_cuda"]
    assert cuda["sources"] == ["csrc/cuda/zo_cuda.cu"] and cuda["args"]["nvcc"] == list(_build.NVCC_FLAGS)
    assert found["arch"] == "9.0"  # no GPU needed to build


def test_building_without_torch_says_to_install_it_first():
    probe = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py')"
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "install torch first" in run.stderr and "--no-build-isolation" in run.stderr, run.stderr[-2000:]
