"""What happens to work nobody waits for any more, and what the Executor keeps alive."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import time
import weakref

import pytest

import shoal

from helpers import Holder, add, make_payload, mark_after, sleep_then, square, wait_until


def _done(marker_dir):
    return sorted(int(name[5:]) for name in os.listdir(marker_dir) if name.startswith("done-"))


@pytest.mark.parametrize("api", ["imap", "as_completed"])
def test_an_exception_in_the_consumers_loop_stops_running_tasks(tmp_path, api):
    # Item 0 is quick; items 1 and 2 run for a while. The consumer's own loop body raises on
    # the first result: the running items must be stopped, not left to finish.
    seconds = [0.0, 1.5, 1.5]
    backend = shoal.get_backend("processes", workers=3)
    try:
        stream = getattr(shoal, api)(
            mark_after,
            range(3),
            [str(tmp_path)] * 3,
            seconds,
            chunksize=1,
            backend=backend,
        )
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                raise KeyboardInterrupt  # the user's own code, not shoal's wait
        del stream
        time.sleep(2.5)  # long enough for items 1 and 2 to have finished, had they run on
        assert _done(tmp_path) == [0]
        # The pool is still usable.
        assert shoal.map(abs, [-1, -2], backend=backend) == [1, 2]
    finally:
        backend.shutdown()


def test_closing_a_stream_stops_its_running_tasks(tmp_path):
    stream = shoal.imap(mark_after, [0, 1], [str(tmp_path)] * 2, [0.0, 1.5], chunksize=1)
    assert next(stream) == 0
    stream.close()
    time.sleep(2.0)
    assert _done(tmp_path) == [0]


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_cancel_is_false_once_running_and_a_cancelled_task_never_runs(tmp_path, backend):
    with shoal.Executor(1, backend=backend) as ex:
        running = ex.submit(mark_after, 0, str(tmp_path), 1.0)
        assert wait_until(lambda: (tmp_path / "start-0").exists(), 30)
        queued = [ex.submit(mark_after, i, str(tmp_path)) for i in (1, 2, 3)]
        assert running.cancel() is False
        assert not running.cancelled()
        assert queued[1].cancel() is True
        assert queued[1].cancelled() and queued[1].done()
        with pytest.raises(cf.CancelledError):
            queued[1].result()
        assert running.result(timeout=30) == 0
        assert [f.result(timeout=30) for f in (queued[0], queued[2])] == [1, 3]
    assert _done(tmp_path) == [0, 1, 3]


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_shutdown_cancel_futures_cancels_only_pending_ones(tmp_path, backend):
    ex = shoal.Executor(1, backend=backend)
    running = ex.submit(mark_after, 0, str(tmp_path), 1.0)
    assert wait_until(lambda: (tmp_path / "start-0").exists(), 30)
    pending = [ex.submit(mark_after, i, str(tmp_path)) for i in (1, 2)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0 and not running.cancelled()
    assert all(f.cancelled() for f in pending)
    assert _done(tmp_path) == [0]


@pytest.mark.parametrize("backend", ["processes", "threads", "serial"])
def test_executor_does_not_keep_a_finished_tasks_callable(backend):
    with shoal.Executor(1, backend=backend) as ex:
        holder = Holder(b"x" * 1000)
        watch = weakref.ref(holder)
        assert ex.submit(holder.size).result() == 1000
        del holder
        gc.collect()
        assert wait_until(lambda: watch() is None, 5), "the executor keeps the object alive"
        # The same function again still works (and a new object of the same kind too).
        assert ex.submit(Holder(b"yy").size).result() == 2


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_executor_map_does_not_keep_results_already_yielded(backend):
    with shoal.Executor(1, backend=backend) as ex:
        results = ex.map(make_payload, range(50), chunksize=50)  # one batch of 50 results
        first = next(results)
        watch = weakref.ref(first)
        del first
        gc.collect()
        assert watch() is None, "the iterator keeps a result it has already handed over"
        assert [p.x for p in results] == list(range(1, 50))


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_executor_drops_results_of_settled_futures(backend):
    with shoal.Executor(1, backend=backend) as ex:
        future = ex.submit(make_payload, 1)
        watch = weakref.ref(future.result())
        del future
        assert wait_until(lambda: gc.collect() >= 0 and watch() is None, 5), (
            "the executor still holds a settled future's result"
        )


@pytest.mark.parametrize("backend", ["threads", "serial"])
def test_a_new_function_never_takes_the_id_of_one_still_queued(backend):
    # square is registered first, sleep_then second; once square is released, add is
    # registered. Spec ids were len(specs) + 1, so add took sleep_then's id and the queued
    # sleep_then tasks ran add instead.
    with shoal.Executor(1, backend=backend) as ex:
        first = ex.submit(square, 2)
        queued = [ex.submit(sleep_then, i, 0.2) for i in range(3)]
        assert first.result(timeout=30) == 4
        time.sleep(0.1)  # square is released meanwhile (if not, the test proves nothing)
        other = ex.submit(add, 1, 2)
        assert [f.result(timeout=30) for f in queued] == [0, 1, 2]
        assert other.result(timeout=30) == 3


def test_an_idle_serial_executor_does_not_spin():
    import resource

    with shoal.Executor(backend="serial") as ex:
        assert ex.submit(abs, -1).result() == 1
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        busy = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert busy < 0.5, f"the idle executor's pump used {busy:.2f} s of CPU in 1 s"
        assert ex.submit(abs, -2).result(timeout=5) == 2
