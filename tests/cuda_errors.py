"""A pytest plugin for GPU test runs under pytest-xdist (scripts/gpu_check.sh): a worker whose CUDA context broke
(an illegal memory access, say) ends once that test is reported, so that xdist reports the crash against the test and
starts a fresh worker, instead of every later test of that worker failing with the same error. tests/conftest.py
takes its hooks."""
import os

import pytest

# CUDA errors that leave the process's context unusable: every later CUDA call of that process fails with them.
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "device-side assert", "illegal instruction")
_context_broken = False  # whether a test of this process hit one


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    global _context_broken
    report = yield
    if call.excinfo is not None and any(text in str(call.excinfo.value) for text in STICKY_CUDA_ERRORS):
        _context_broken = True
    return report


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """Ends an xdist worker whose CUDA context broke, once that test is reported (its teardown)."""
    if _context_broken and report.when == "teardown" and os.environ.get("PYTEST_XDIST_WORKER"):
        os._exit(3)
