"""shoal._threads.Reused: the daemon threads that executors' pumps and MPI relays' reply
threads run on, kept for the next job."""

from __future__ import annotations

import threading
import time

import shoal
from shoal import _executor, _threads

from helpers import square, wait_until


def _run_and_wait(pool: _threads.Reused, job) -> None:
    done = threading.Event()

    def wrapped() -> None:
        try:
            job()
        finally:
            done.set()

    pool.run(wrapped)
    assert done.wait(10), "the job never ran"


def test_a_job_after_another_runs_on_the_same_thread():
    pool = _threads.Reused("shoal-test-reuse")
    names: list[str] = []
    for _ in range(3):
        _run_and_wait(pool, lambda: names.append(threading.current_thread().name))
        # Counted idle again only once the job has returned: wait for that.
        assert wait_until(lambda: pool._idle == 1, 5)
    assert names == ["shoal-test-reuse-1"] * 3


def test_jobs_at_once_get_threads_of_their_own_and_only_keep_threads_stay():
    pool = _threads.Reused("shoal-test-keep", keep=2)
    gate = threading.Event()
    started = threading.Semaphore(0)
    names: set[str] = set()

    def job() -> None:
        names.add(threading.current_thread().name)
        started.release()
        gate.wait(10)

    for _ in range(4):
        pool.run(job)
    for _ in range(4):
        assert started.acquire(timeout=10), "a job waited for another to end"
    assert len(names) == 4
    gate.set()
    # Two threads stay idle; the other two end.
    assert wait_until(lambda: pool._idle == 2, 5)
    assert wait_until(
        lambda: sum(t.name.startswith("shoal-test-keep") for t in threading.enumerate()) == 2, 5
    )


def test_a_job_that_raises_is_reported_and_the_thread_goes_on(monkeypatch):
    pool = _threads.Reused("shoal-test-raise")
    seen: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def boom() -> None:
        raise ValueError("boom")

    pool.run(boom)
    assert wait_until(lambda: len(seen) == 1, 5)
    assert isinstance(seen[0], ValueError)
    names: list[str] = []
    _run_and_wait(pool, lambda: names.append(threading.current_thread().name))
    assert names == ["shoal-test-raise-1"]


def test_executors_one_after_another_pump_on_one_thread():
    pumps: list[str] = []
    real = _executor.Executor._run_pump

    def spy(self: _executor.Executor) -> None:
        pumps.append(threading.current_thread().name)
        real(self)

    started_before = _executor._PUMPS._count
    _executor.Executor._run_pump = spy  # type: ignore[method-assign]
    try:
        for i in range(3):
            with shoal.Executor(1) as ex:
                assert ex.submit(square, i).result(timeout=30) == i * i
            time.sleep(0.05)  # the pump's thread is idle again
    finally:
        _executor.Executor._run_pump = real  # type: ignore[method-assign]
    assert len(pumps) == 3
    assert all(name.startswith("shoal-executor-") for name in pumps), pumps
    # At most one thread was started for the three (none if one was idle already).
    assert _executor._PUMPS._count - started_before <= 1, pumps
