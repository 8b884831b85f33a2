from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

BACKENDS = ["processes", "threads", "serial"]


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
    left = _dev_shm() - before
    assert not left, f"files left in /dev/shm by the test run: {sorted(left)}"
