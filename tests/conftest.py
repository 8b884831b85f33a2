from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# SHOAL_TEST_BACKENDS=mpi runs the contract suite on the mpi backend (tests/test_mpi.py does,
# under mpiexec in launch mode).
BACKENDS = os.environ.get("SHOAL_TEST_BACKENDS", "processes,threads,serial").split(",")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend runs the same contract tests."""
    return request.param


@pytest.fixture(autouse=True)
def _no_leaked_default(monkeypatch):
    yield


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left_behind():
    """After the whole run (crashes, kills and Ctrl-C tests included), /dev/shm holds nothing
    that was not there before: shoal's segments are memfds, freed with their last holder."""
    before = _dev_shm()
    yield
    if "SHOAL_TEST_BACKENDS" in os.environ:
        return  # a run nested in tests/test_mpi.py: the outer run checks /dev/shm
    left = _dev_shm() - before
    assert not left, f"files left in /dev/shm by the test run: {sorted(left)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SHOAL_REQUIRE_ENGINES=1 (CI), an engine test that skips fails instead: a missing
    MPI must not pass unnoticed."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("SHOAL_REQUIRE_ENGINES") == "1"
        and report.skipped
        and item.get_closest_marker("engine") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"engine test skipped with SHOAL_REQUIRE_ENGINES=1: {report.longrepr}"
