"""Benchmark fixtures. The helpers and the results schema are in bench_utils.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from bench_utils import DEVICE, median_seconds  # noqa: E402


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 28) if DEVICE == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_seconds(lambda: dst.copy_(src))
    return 2 * n * 4 / seconds
