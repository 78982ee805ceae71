"""$ZOKERN_CPP_LIBRARY / $ZOKERN_CUDA_LIBRARY: an extension loads a library built elsewhere (for CUDA:
scripts/build_cuda_extension.py) when its manifest names the same sources and torch, and says why not
otherwise. Checked with the CPU extension, in subprocesses (a library registers its ops once per process)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from zokern.backends._extension import CPU_EXTENSION

PROBE = r"""
import torch, zokern
from zokern.backends import availability
ok, why = availability("cpp", "cpu")
print(ok, why)
if ok:
    p = torch.zeros(1000)
    zokern.perturb_([p], 7, 1.0, stream_ids=[3], backend="cpp")
    assert torch.equal(p, zokern.draw(7, 3, 1000)), "the prebuilt library's stream differs"
"""


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    ok, why = CPU_EXTENSION.ensure()
    if not ok:
        pytest.skip(f"the CPU extension is not available: {why}")
    library = tmp_path_factory.mktemp("prebuilt") / "zokern_cpp.so"
    shutil.copy(CPU_EXTENSION.build_directory() / "zokern_cpp.so", library)
    return library


def _probe(library) -> "tuple[bool, str]":
    env = dict(os.environ, ZOKERN_CPP_LIBRARY=str(library))
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ok, _, why = run.stdout.strip().splitlines()[-1].partition(" ")
    return ok == "True", why


def test_loads_a_library_whose_manifest_matches(prebuilt):
    CPU_EXTENSION.write_manifest(prebuilt, torch.__version__)
    ok, why = _probe(prebuilt)
    assert ok and "prebuilt" in why, why


def test_refuses_other_sources(prebuilt):
    manifest = CPU_EXTENSION.write_manifest(prebuilt, torch.__version__)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sources_sha256": "0" * 64}))
    ok, why = _probe(prebuilt)
    assert not ok and "built from other sources" in why, why


def test_refuses_another_torch(prebuilt):
    CPU_EXTENSION.write_manifest(prebuilt, "2.0.0")
    ok, why = _probe(prebuilt)
    assert not ok and "built for torch 2.0.0" in why, why


def test_refuses_a_library_without_manifest(tmp_path, prebuilt):
    library = tmp_path / "zokern_cpp.so"
    shutil.copy(prebuilt, library)
    ok, why = _probe(library)
    assert not ok and "cannot read the manifest" in why, why
