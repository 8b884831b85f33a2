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
