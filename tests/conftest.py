from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from engines import REQUIRED, engine_backend

#: Cluster engines run the contract suite too, each on a cluster the tests start themselves.
ENGINES = ["dask", "ray"]
BACKENDS = ["processes", "threads", "serial", *ENGINES]


@pytest.fixture(
    params=[pytest.param(b, marks=pytest.mark.engine) if b in ENGINES else b for b in BACKENDS]
)
def backend(request):
    """Every backend runs the same contract tests."""
    if request.param in ENGINES:
        return request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture(scope="session")
def dask_backend():
    """A Dask backend on a LocalCluster of 2 worker processes on 127.0.0.1."""
    yield from engine_backend("dask", workers=2)


@pytest.fixture(scope="session")
def ray_backend():
    """A Ray backend on a local Ray with 2 CPUs on 127.0.0.1."""
    yield from engine_backend("ray", workers=2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SHOAL_REQUIRE_ENGINES=1 (CI), a skipped engine test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and item.get_closest_marker("engine") is not None:
        report.outcome = "failed"
        report.longrepr = f"engine test skipped with SHOAL_REQUIRE_ENGINES=1: {report.longrepr}"


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
    left = _dev_shm() - before
    assert not left, f"files left in /dev/shm by the test run: {sorted(left)}"
