"""The C++ extension built at install (setup.py: zokern/zokern_cpp.so and its build stamp) is what the cpp backend
loads; compiling at first use is only the fallback, used with its reason where that library is missing, does not
load, or was built against another torch or from other sources, and it gives the same bits. Checked with the CPU
extension; loading the real library happens in subprocesses (a library registers its ops once per process). A
first-use compile that fails is reported, not raised, and the instruction set chosen at run time changes no bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from zokern import backends
from zokern.backends import _build, _extension

PROBE = r"""
import json, sys, warnings
from pathlib import Path
import torch, zokern
from zokern.backends import _extension, availability

if len(sys.argv) > 1:  # a folder without the library built at install: the fallback compiles it
    _extension.CPU_EXTENSION.library = Path(sys.argv[1]) / "zokern_cpp.so"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok, why = availability("cpp", "cpu")
params = [torch.linspace(-3, 3, 1001), torch.linspace(-3, 3, 515).bfloat16(), torch.linspace(-3, 3, 77).half()]
zokern.perturb_(params, 7, 0.5, stream_ids=[0, 1, 2], backend="cpp")
zokern.fused_step_(params, 7, stream_ids=[0, 1, 2], restore=0.5, lr=0.1, grad=0.3, weight_decay=0.01, next_seed=8,
                   next_scale=0.5, backend="cpp")
bits = [p.view(torch.int16 if p.element_size() == 2 else torch.int32).tolist() for p in params]
loaded = [line.split()[-1] for line in open("/proc/self/maps") if "zokern_cpp" in line]
json.dump({"ok": ok, "why": why, "warnings": [str(w.message) for w in caught], "bits": bits,
           "loaded": sorted(set(loaded))}, sys.stdout)
"""


def _probe(*args) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def installed() -> dict:
    return _probe()


def test_the_library_built_at_install_is_what_runs(installed):
    """The install (scripts/setup_env.sh's editable one here) built zokern/zokern_cpp.so: it loads, nothing compiles."""
    library = _extension.CPU_EXTENSION.library
    assert installed["ok"] and installed["why"] == f"zokern_cpp built at install: {library}", (
        f"{installed['why']} (reinstall zokern: pip install --no-build-isolation --no-deps -e .)")
    assert installed["warnings"] == [] and installed["loaded"] == [str(library)]


def test_the_fallback_compiles_the_same_bits(installed, tmp_path):
    fallback = _probe(str(tmp_path))
    assert fallback["ok"], fallback["why"]
    reason = "zokern was installed without its compiled CPU extension"
    assert fallback["why"].startswith("zokern_cpp compiled at first use") and reason in fallback["why"]
    assert fallback["warnings"] == [f"{reason}: compiling zokern_cpp now (a minute or two)"]
    assert fallback["loaded"] and str(tmp_path) not in fallback["loaded"][0]
    assert fallback["bits"] == installed["bits"]


# Why a library is not used: checked on copies in tmp_path, without a compiler ($CXX names none), so the fallback
# stops at once and says both why it was needed and why it could not run.

@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-zokern")


def _unavailable_because(library_dir) -> str:
    ok, why = _extension._Extension(_build.CPU, library_dir=library_dir).ensure()
    assert not ok
    assert why.endswith("; cannot compile it now: no C++ compiler"), why
    return why


def _library(tmp_path, content: bytes = b"not a shared library", **stamp):
    library = tmp_path / "zokern_cpp.so"
    library.write_bytes(content)
    _build.CPU.write_stamp(library, _extension.source_dir(), torch.__version__)
    if stamp:
        path = _build.stamp_path(library)
        path.write_text(json.dumps({**json.loads(path.read_text()), **stamp}))
    return library


def test_a_missing_library_is_compiled_at_first_use(tmp_path, no_compiler):
    assert _unavailable_because(tmp_path).startswith("zokern was installed without its compiled CPU extension")


def test_a_library_built_against_another_torch_is_not_loaded(tmp_path, no_compiler):
    library = _library(tmp_path, torch="2.0.0")
    assert f"{library} was built against torch 2.0.0, this is torch {torch.__version__}" in _unavailable_because(
        tmp_path)


def test_a_library_built_from_other_sources_is_not_loaded(tmp_path, no_compiler):
    library = _library(tmp_path, sources_sha256="0" * 64)
    assert f"{library} was built from other sources than {_extension.source_dir()}" in _unavailable_because(tmp_path)


def test_a_library_without_its_build_stamp_is_not_loaded(tmp_path, no_compiler):
    library = _library(tmp_path)
    _build.stamp_path(library).unlink()
    assert f"the build stamp of {library} is unreadable" in _unavailable_because(tmp_path)


def test_a_library_that_does_not_load_is_compiled_at_first_use(tmp_path, no_compiler):
    library = _library(tmp_path)
    assert _unavailable_because(tmp_path).startswith(f"{library} does not load (")


def test_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("int f( {\n")
    monkeypatch.setattr(_extension, "source_dir", lambda: tmp_path)
    monkeypatch.setenv("ZOKERN_BUILD_DIR", str(tmp_path / "build"))
    broken = _build.ExtensionSource("zokern_broken_test", ("broken.cpp",), cuda=False)
    with pytest.warns(RuntimeWarning, match="installed without its compiled CPU extension: compiling"):
        ok, why = _extension._Extension(broken, library_dir=tmp_path).ensure()
    assert not ok and "error" in why, why


def test_zokern_info_says_why_the_extension_is_compiled_at_first_use(tmp_path, no_compiler, monkeypatch, capsys):
    from zokern import cli

    monkeypatch.setattr(_extension.CPU_EXTENSION, "library", tmp_path / "zokern_cpp.so")
    monkeypatch.setattr(_extension.CPU_EXTENSION, "_result", None)
    assert cli.info_command(None) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:2] == ["cpu", "cpp"]]
    assert line.split()[2] == "no" and line.endswith(
        "zokern was installed without its compiled CPU extension; cannot compile it now: no C++ compiler"), line


_SIMD_PROBE = """
import sys, torch, zokern
g = torch.Generator().manual_seed(0)
p = [torch.randn(1031, generator=g), torch.randn(77, generator=g).bfloat16(), torch.randn(45, generator=g).half()]
zokern.perturb_(p, 5, 0.5, stream_ids=[1, 2, 3], backend="cpp")
zokern.fused_step_(p, 6, stream_ids=[1, 2, 3], restore=0.1, lr=0.2, grad=0.3, next_seed=7, next_scale=0.01,
                   backend="cpp")
masks = zokern.new_masks(p)
zokern.masked_perturb_(p, masks, zokern.magnitude_thresholds(p, 0.5), 8, 0.1, stream_ids=[1, 2, 3],
                       compute_mask=True, backend="cpp")
hessians = [torch.rand(q.shape, generator=g) + 0.5 for q in p]
zokern.hessian_step_(p, hessians, 9, stream_ids=[1, 2, 3], restore=0.1, lr=0.2, grad=0.3, hess_scale=2.0,
                     alpha=0.1, backend="cpp")
anchors = [(q.float() + 0.25).to(q.dtype) for q in p]
norms = zokern.distance_norms(p, anchors, backend="cpp")
zokern.anchored_rescale_(p, anchors, torch.tensor([0.9, 1.1, 0.7]), backend="cpp")
ws = [torch.randn(37, 300, generator=g).bfloat16(), torch.randn(20, 9, generator=g).half(), torch.randn(5, 7, generator=g)]
ranks = [5, 3, 2]
us = [torch.randn(w.shape[0], r, generator=g).to(w.dtype) for w, r in zip(ws, ranks)]
vs = [torch.randn(w.shape[1], r, generator=g).to(w.dtype) for w, r in zip(ws, ranks)]
zokern.lowrank_apply_(ws, us, vs, [torch.randn(r, r, generator=g) for r in ranks], backend="cpp")
# A bfloat16 W past a rank block, rows past a multiple of 16, stochastically rounded (AMX or dot products where the
# CPU has them).
w = torch.randn(50, 130, generator=g).bfloat16()
zokern.lowrank_apply_([w], [torch.randn(50, 70, generator=g).bfloat16()], [torch.randn(130, 70, generator=g).bfloat16()],
                      [torch.randn(70, 70, generator=g) / 70], rounding="stochastic", seed=5, stream_ids=[4],
                      backend="cpp")
torch.save(p + masks + hessians + [norms] + ws + [w], sys.argv[1])
"""


CPP_OK, CPP_WHY = backends.availability("cpp", "cpu")


@pytest.mark.skipif(not CPP_OK, reason=f"cpp backend unavailable: {CPP_WHY}")
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512", "avx512bf16"])
def test_narrower_simd_paths_give_the_same_bits(tmp_path, level):
    """The ISA chosen at run time (baseline, AVX2, AVX-512, AVX512-BF16 dot products, AMX) changes speed, never
    results (avx512: the register tiles for a bfloat16 W's low rank, without AMX or dot products; avx512bf16: the
    dot products where the CPU has them, without AMX)."""
    results = {}
    for name, cap in (("default", None), (level, level)):
        env = {k: v for k, v in os.environ.items() if k != "ZOKERN_CPU_SIMD"}
        if cap:
            env["ZOKERN_CPU_SIMD"] = cap
        out = tmp_path / f"{name}.pt"
        run = subprocess.run([sys.executable, "-c", _SIMD_PROBE, str(out)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        # A CPU whose AMX or dot products disagree with the AVX-512 tiles says so, and keeps the tiles: a path gone
        # wrong.
        assert "otherwise than Intel's SDM" not in run.stderr
        results[name] = torch.load(out, weights_only=True)
    for a, b in zip(results["default"], results[level]):
        assert torch.equal(a, b)
