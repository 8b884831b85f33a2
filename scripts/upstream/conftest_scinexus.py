"""pytest plugin: run scinexus' own tests with ShoalParallel() as the default backend.

scinexus' tests reset the default after each test; this sets it again before each one. Tests
that name another backend themselves still test that backend.
"""

import importlib

import pytest
import scinexus.parallel

import shoal.compat.scinexus


@pytest.fixture(autouse=True)
def _shoal_backend():
    if not issubclass(shoal.compat.scinexus.ShoalParallel, scinexus.parallel.Parallel):
        importlib.reload(shoal.compat.scinexus)  # a test reloaded scinexus.parallel
    scinexus.parallel.set_parallel_backend(shoal.compat.scinexus.ShoalParallel())
    yield
