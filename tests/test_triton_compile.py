"""The compiled (non-interpreter) Triton path, without a GPU: every kernel specialisation the launchers make
is compiled for sm_90 by scripts/compile_triton.py in a subprocess without TRITON_INTERPRET. It must compile,
call no approximate transcendental (lg2/sin/cos.approx), contract none of our float arithmetic into FMA
(libdevice's own FMAs are the .ftz ones), and move aligned data in vectors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton.py"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("triton") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, capture_output=True,
                         text=True, timeout=900)
    if run.returncode == 3:
        pytest.skip("this triton build has no NVIDIA backend")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())["kernels"]


def _launched_kernels() -> set[str]:
    """Every @triton.jit kernel of zokern.kernels that a launcher launches (named *_kernel)."""
    import importlib
    import pkgutil

    from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under TRITON_INTERPRET
    from triton.runtime.jit import JITFunction

    from zokern import kernels

    jitted = (JITFunction, InterpretedFunction)

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"zokern.kernels.{info.name}")
        names |= {name for name, obj in vars(module).items() if isinstance(obj, jitted) and name.endswith("_kernel")}
    return names


def test_every_kernel_is_compiled(compiled):
    assert {row["kernel"] for row in compiled} == _launched_kernels()


def test_accurate_math_and_no_contraction(compiled):
    for row in compiled:
        assert not row["approx_math"], row
        # The low-rank tiles' float32 dots are FMA chains (kernels/subzero.py: "ieee" dots), one rounding per
        # product-and-sum, within the bound tests/ops check; the rest of that kernel adds and stores only.
        assert not row["fma_rn_f32"] or row["kernel"] == "subzero_kernel", row


@pytest.mark.parametrize("kernel", ["mezo_kernel", "sparse_kernel", "hizoo_kernel"])
def test_aligned_element_kernels_use_vector_accesses(compiled, kernel):
    # One thread-row is one Philox call, 4 elements: 16 bytes of float32, 8 of bfloat16/float16 (D float32
    # with 16-bit weights keeps the weights' 8).
    rows = [r for r in compiled if r["kernel"] == kernel and r["constexprs"]["ALIGNED_PTRS"]]
    assert rows
    for r in rows:
        width = 16 if r["constexprs"]["DTYPE"] == 0 else 8
        assert r["load_bytes"] >= width and r["store_bytes"] >= width, r


def test_lowrank_tiles_vectorise_and_spill_little(compiled):
    # n divisible by 16 (every LLM matrix; Triton specialises on it at launch): W moves in 16-byte vectors.
    # The FMA dots keep U·C's and V's tiles in registers: at most a few words spill (triton 3.9.0, sm_90: none
    # in most specialisations, 24 bytes at most with n divisible by 16, 320 with other n at R_PAD 64).
    rows = [r for r in compiled if r["kernel"] == "subzero_kernel"]
    assert {r["constexprs"]["R_PAD"] for r in rows} == {16, 32, 64}
    for r in rows:
        if "n" in r["divisible_by_16"]:
            assert r["stack_bytes"] <= 64 and r["store_bytes"] == 16, r
        elif r["constexprs"]["R_PAD"] <= 32:
            assert r["stack_bytes"] <= 128, r
