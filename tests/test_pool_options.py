"""Per-pool options (``threads_per_worker``) are accepted wherever ``workers`` is."""

from __future__ import annotations

import pytest

import shoal
from shoal.backends.processes import THREAD_VARIABLES

from helpers import thread_env


@pytest.fixture
def no_thread_variables(monkeypatch):
    # A variable set by the user wins over threads_per_worker; make sure none is set here.
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_threads_per_worker_per_call(no_thread_variables):
    assert shoal.map(thread_env, range(2), workers=2, threads_per_worker=3) == [("3", "3")] * 2
    assert shoal.map(thread_env, range(2), workers=2, threads_per_worker=1) == [("1", "1")] * 2
    stream = shoal.imap(thread_env, range(2), workers=2, threads_per_worker=5)
    assert list(stream) == [("5", "5")] * 2
    assert set(shoal.as_completed(thread_env, range(2), workers=2, threads_per_worker=4)) == {
        ("4", "4")
    }


def test_each_setting_gets_its_own_pool(no_thread_variables):
    backend = shoal.get_backend("processes", workers=1)
    try:
        a = backend.pool(1, threads_per_worker=2)
        b = backend.pool(1, threads_per_worker=3)
        assert a is not b
        assert backend.pool(1, threads_per_worker=2) is a
        assert backend.pool(1) is not a
        assert shoal.map(thread_env, [0], backend=backend, threads_per_worker=2) == [("2", "2")]
    finally:
        backend.shutdown()


def test_threads_per_worker_on_executor_and_get_backend(no_thread_variables):
    with shoal.Executor(1, threads_per_worker=6) as ex:
        assert ex.submit(thread_env).result() == ("6", "6")
        assert list(ex.map(thread_env, [0])) == [("6", "6")]
    backend = shoal.get_backend("processes", threads_per_worker=7)
    try:
        assert shoal.map(thread_env, [0], backend=backend, workers=1) == [("7", "7")]
        # The call's own setting wins over the backend's.
        assert shoal.map(thread_env, [0], backend=backend, workers=1, threads_per_worker=2) == [
            ("2", "2")
        ]
    finally:
        backend.shutdown()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_bad_threads_per_worker(value, error):
    with pytest.raises(error, match="threads_per_worker"):
        shoal.map(thread_env, [0], threads_per_worker=value)
    with pytest.raises(error, match="threads_per_worker"):
        shoal.Executor(1, threads_per_worker=value)


@pytest.mark.parametrize("backend", ["threads", "serial"])
def test_backends_without_processes_refuse_threads_per_worker(backend):
    with pytest.raises(ValueError, match=f"the {backend} backend cannot honour threads_per_worker"):
        shoal.map(thread_env, [0], backend=backend, threads_per_worker=2)
    with pytest.raises(ValueError, match="threads_per_worker"):
        shoal.Executor(1, backend=backend, threads_per_worker=2)
