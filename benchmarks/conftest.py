"""Benchmark fixtures. The helpers and the results schema are in bench_utils.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from bench_utils import DEVICE, last_level_cache_bytes, median_seconds  # noqa: E402


@pytest.fixture(scope="session")
def copy_bandwidth(request) -> float:
    """Bytes/s of a streaming device-to-device copy, counting bytes read plus bytes written: source and
    destination are each at least twice the last-level cache (and 256 MiB), so neither is cache-resident.
    Not measured in a smoke run (--benchmark-disable), which records nothing."""
    if request.config.getoption("benchmark_disable"):
        return float("nan")
    n = max(1 << 28 if DEVICE == "cuda" else 1 << 26, 2 * last_level_cache_bytes() // 4)
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=9)
    return 2 * n * 4 / seconds
