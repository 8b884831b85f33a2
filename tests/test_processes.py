"""The processes backend: real worker processes, their lifetime, pickling and signals."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shoal
from shoal import _driver
from shoal.backends.processes import ProcessBackend, in_flight_window

from helpers import (
    UnbuildableError,
    alive,
    crash_on,
    fail_on,
    pid_of,
    raise_unbuildable,
    return_lambda,
    return_unpicklable,
    run_script,
    slow_pid,
    square,
    wait_until,
)


def test_default_pool_is_reused_across_calls():
    first = set(shoal.map(slow_pid, range(8), workers=2, chunksize=1))
    second = set(shoal.map(slow_pid, range(8), workers=2, chunksize=1))
    assert first and first == second
    assert os.getpid() not in first


def test_work_spreads_over_workers():
    pids = set(shoal.map(slow_pid, range(20), workers=2))
    assert len(pids) == 2


def test_idle_workers_exit_and_come_back():
    be = ProcessBackend(workers=1, idle_timeout=0.3)
    try:
        pool = be.pool()
        assert shoal.map(square, [3], backend=be) == [9]
        (pid,) = pool.pids()
        assert wait_until(lambda: not pool.pids()), "idle worker should exit"
        assert wait_until(lambda: not alive(pid))
        assert shoal.map(square, [4], backend=be) == [16]
    finally:
        be.shutdown()


def test_shutdown_leaves_no_process():
    be = ProcessBackend(workers=2)
    pool = be.pool()
    shoal.map(slow_pid, range(4), backend=be, chunksize=1)
    pids = pool.pids()
    assert len(pids) == 2
    be.shutdown()
    assert all(wait_until(lambda p=p: not alive(p)) for p in pids)


def test_nothing_left_running_at_interpreter_exit():
    out = run_script(
        """
        import shoal, helpers
        print(sorted(set(shoal.map(helpers.slow_pid, range(6), workers=2, chunksize=1))))
        """
    )
    assert out.returncode == 0, out.stderr
    pids = eval(out.stdout.strip())
    assert len(pids) == 2
    assert all(wait_until(lambda p=p: not alive(p), 5) for p in pids)


def test_functions_defined_in_main_work():
    out = run_script(
        """
        import shoal

        def cube(x):
            return x ** 3

        class Point:
            def __init__(self, x):
                self.x = x

        if __name__ == "__main__":
            print(shoal.map(cube, range(4)))
            print([p.x for p in shoal.map(Point, range(3))])
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[0, 1, 8, 27]", "[0, 1, 2]"]


def test_killing_the_driver_kills_its_workers():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
            import sys, time, shoal, helpers
            pool = shoal.get_backend().pool(2)
            shoal.map(helpers.slow_pid, range(4), workers=2, chunksize=1)
            print(*pool.pids(), flush=True)
            time.sleep(60)
            """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait(10)
    assert all(wait_until(lambda p=p: not alive(p), 5) for p in pids), "workers outlived driver"


def test_ctrl_c_interrupts_promptly_and_stops_workers():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
            import shoal, helpers, sys
            pool = shoal.get_backend().pool(2)
            pool.prestart()
            import time
            while len(pool.pids()) < 2:
                time.sleep(0.01)
            print(*pool.pids(), flush=True)
            try:
                shoal.map(helpers.sleep_then, [30] * 4, kwargs={"seconds": 30}, workers=2)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(3)
            """
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 3, proc.stderr.read()
    assert time.monotonic() - sent < 2.0
    assert "interrupted" in proc.stdout.read()
    assert all(wait_until(lambda p=p: not alive(p), 5) for p in pids)


def test_worker_crash_fails_only_its_item():
    got = shoal.map(crash_on, range(8), workers=2, chunksize=1, on_error="return")
    assert isinstance(got[3], shoal.WorkerCrashedError)
    assert got[3].index == 3 and "exit code 7" in got[3].exit
    assert [g for i, g in enumerate(got) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    with pytest.raises(shoal.WorkerCrashedError, match="item 3"):
        shoal.map(crash_on, range(8), workers=2, chunksize=1)


def test_unpicklable_function_is_named_before_work_starts():
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(shoal.PicklingError, match="uses_lock") as info:
        shoal.map(uses_lock, range(3))
    assert isinstance(info.value, shoal.ShoalError)
    with pytest.raises(shoal.PicklingError):
        shoal.imap(uses_lock, range(3))
    # Threads do not pickle: the same function works there.
    assert shoal.map(uses_lock, range(3), backend="threads") == [0, 1, 2]


def test_unpicklable_argument_is_named():
    args = [1, 2, threading.Lock(), 4]
    with pytest.raises(shoal.PicklingError, match="item 2"):
        shoal.map(square, args, chunksize=2)
    with pytest.raises(shoal.PicklingError, match="fixed keyword argument 'b'"):
        shoal.map(square, [1], kwargs={"b": threading.Lock()})


def test_unpicklable_result_is_an_error_of_its_item():
    got = shoal.map(return_unpicklable, range(4), on_error="return")
    assert got[0] == 0 and got[1] == 1 and got[3] == 3
    assert isinstance(got[2], shoal.PicklingError)
    assert "item 2" in got[2].__notes__[0]
    # Results that only cloudpickle can carry still come back.
    assert [f() for f in shoal.map(return_lambda, range(3))] == [0, 1, 2]


def test_exception_that_cannot_be_rebuilt_becomes_remote_error():
    with pytest.raises(shoal.RemoteError) as info:
        shoal.map(raise_unbuildable, [1])
    assert info.value.type_name.endswith("UnbuildableError")
    assert "1-y" in str(info.value)
    assert issubclass(UnbuildableError, Exception)


def test_fixed_arguments_are_pickled_once_per_call():
    counter = {"n": 0}

    class Counted:
        def __reduce__(self):
            counter["n"] += 1
            return (dict, ())

    shoal.map(square, range(200), kwargs={}, args=(), chunksize=5)
    shoal.map(lambda x, c: x, range(200), args=(Counted(),), chunksize=5, workers=2)
    assert counter["n"] == 1


def test_input_is_read_lazily_and_bounded_for_a_slow_consumer():
    pulled = itertools.count()
    seen = []

    def source():
        for i in itertools.count():
            seen.append(next(pulled))
            yield i

    stream = shoal.imap(square, source(), workers=2, chunksize=10)
    for _ in range(50):
        next(stream)
        time.sleep(0.002)
    stream.close()
    # 50 consumed; at most in_flight_window(2) chunks of 10 held ahead (in flight, or finished
    # and not yet consumed), plus the chunk being consumed; if a chunk is slow (a loaded
    # machine), later ones may also wait parked behind it, up to PARKED_WINDOWS windows.
    assert len(seen) <= 50 + _driver.PARKED_WINDOWS * in_flight_window(2) * 10 + 10


def slow_first(x):
    if x == 0:
        time.sleep(1.0)
    return x


def test_a_slow_head_does_not_let_parked_results_grow():
    """In order, later results wait for an early slow one; they must not pile up unbounded."""
    seen = []

    def source():
        for i in itertools.count():
            seen.append(i)
            yield i

    stream = shoal.imap(slow_first, source(), workers=2, chunksize=10)
    assert next(stream) == 0
    stream.close()
    # Later chunks run on while the head is slow, up to PARKED_WINDOWS windows of chunks of 10
    # (in_flight_window(2) chunks each); then the workers wait.
    window = in_flight_window(2)
    bound = _driver.PARKED_WINDOWS * window * 10 + 10
    assert window * 10 < len(seen) <= bound, len(seen)


def test_error_stops_new_tasks():
    marker_dir = os.environ.get("TMPDIR", "/tmp")
    path = os.path.join(marker_dir, f"shoal-started-{os.getpid()}")
    if os.path.exists(path):
        os.remove(path)

    def mark_and_fail(x, path=path):
        with open(path, "a") as f:
            f.write(f"{x}\n")
        if x == 2:
            raise ValueError("stop")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError):
        shoal.map(mark_and_fail, range(200), workers=2, chunksize=1)
    time.sleep(0.3)
    with open(path) as f:
        started = len(f.read().split())
    os.remove(path)
    assert started < 20, f"{started} tasks started; the call should stop at the failure"


def test_executor_is_a_concurrent_futures_executor():
    with shoal.Executor(workers=2) as ex:
        assert isinstance(ex, cf.Executor)
        futures = [ex.submit(square, i) for i in range(100)]
        done, _ = cf.wait(futures, timeout=30)
        assert len(done) == 100
        assert sorted(f.result() for f in cf.as_completed(futures)) == sorted(
            i * i for i in range(100)
        )
        crash = ex.submit(crash_on, 3)
        with pytest.raises(shoal.WorkerCrashedError):
            crash.result(timeout=30)
        # The executor is not broken by a dead worker.
        assert ex.submit(square, 5).result(timeout=30) == 25
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(square, 1)


def test_executor_shutdown_cancel_futures():
    ex = shoal.Executor(workers=1)
    running = ex.submit(pid_of, 0)
    running.result(timeout=30)
    futures = [ex.submit(time.sleep, 0.2) for _ in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)


def test_executor_map_timeout():
    with shoal.Executor(workers=1) as ex:
        it = ex.map(time.sleep, [5], timeout=0.2)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            list(it)
        assert time.monotonic() - start < 3


def test_all_public_exceptions_derive_from_shoal_error():
    for name in shoal.__all__:
        obj = getattr(shoal, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, shoal.ShoalError), name


def test_error_in_worker_keeps_traceback_text():
    with pytest.raises(ValueError) as info:
        shoal.map(fail_on, [3])
    text = str(info.value.__cause__)
    assert "Traceback" in text and "raise ValueError" in text


def test_futures_work_with_waiters_callbacks_and_cancel():
    """The executor's futures are lazy inside; every concurrent.futures path must still work."""
    with shoal.Executor(workers=2) as ex:
        called = []
        slow = ex.submit(time.sleep, 0.3)
        slow.add_done_callback(lambda f: called.append("before"))
        assert not slow.done()
        done, pending = cf.wait([slow], timeout=0.01)
        assert not done and pending == {slow}
        assert list(cf.as_completed([slow], timeout=30)) == [slow]
        assert slow.result() is None and slow.exception() is None
        slow.add_done_callback(lambda f: called.append("after"))
        assert called == ["before", "after"]
        # A waiter blocked in result() before the value arrives is woken.
        blocked = ex.submit(sleep_then_value, 0.2, 42)
        assert blocked.result(timeout=30) == 42
        # Cancelling a future whose result has not arrived wins; the late result is dropped.
        queued = [ex.submit(time.sleep, 0.2) for _ in range(6)]
        assert queued[-1].cancel()
        assert queued[-1].cancelled()
        with pytest.raises(cf.CancelledError):
            queued[-1].result()
        cf.wait(queued[:-1], timeout=30)
        assert all(f.done() and not f.cancelled() for f in queued[:-1])
        failing = ex.submit(fail_on, 3)
        assert isinstance(failing.exception(timeout=30), ValueError)
        with pytest.raises(ValueError):
            failing.result()


def sleep_then_value(seconds, value):
    time.sleep(seconds)
    return value


def _child_maps(queue):
    queue.put((os.getpid(), sorted(set(shoal.map(pid_of, range(4), workers=2, chunksize=1)))))


def test_a_forked_child_gets_its_own_pool_and_spares_the_parents():
    import multiprocessing

    pool = shoal.get_backend().pool(2)
    shoal.map(slow_pid, range(4), workers=2, chunksize=1)
    parent_workers = pool.pids()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_maps, args=(queue,))
    child.start()
    child_pid, child_workers = queue.get(timeout=60)
    assert child_pid == child.pid
    child.join(30)
    assert child.exitcode == 0
    assert child_workers and not set(child_workers) & set(parent_workers)
    # The child's exit did not touch the parent's workers.
    assert pool.pids() == parent_workers
    assert all(alive(p) for p in parent_workers)
    assert shoal.map(square, [3], workers=2) == [9]


@pytest.mark.timeout(120)
def test_exit_while_threads_wait_in_the_engine_is_prompt_and_clean():
    """The interpreter exits while a daemon thread waits in shoal.map and an Executor has a
    running task: it must neither wait for those 30 s tasks, nor abort (rc -6), nor leave
    workers behind."""
    code = textwrap.dedent(
        """
        import threading, time, shoal, helpers
        threading.Thread(
            target=lambda: shoal.map(helpers.sleep_then, [1, 2], kwargs={"seconds": 30}),
            daemon=True,
        ).start()
        ex = shoal.Executor(workers=1)
        ex.submit(helpers.sleep_then, 3, seconds=30)
        time.sleep(0.5)
        kids = []
        import os
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            kids += open(f"/proc/{os.getpid()}/task/{task}/children").read().split()
        print(*kids, flush=True)
        """
    )
    for _ in range(2):
        start = time.monotonic()
        out = run_script(code, timeout=60)
        assert out.returncode == 0, (out.returncode, out.stderr[-500:])
        assert "FATAL" not in out.stderr
        assert time.monotonic() - start < 4, "exit must not wait for running tasks"
        pids = [int(p) for p in out.stdout.split()]
        assert pids and all(wait_until(lambda p=p: not alive(p), 5) for p in pids)


def test_the_driver_raises_its_soft_descriptor_limit():
    # Results' large buffers arrive as descriptors; a soft limit of 256 would be too tight.
    code = (
        "import resource, shoal\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "shoal.map(abs, [-1])\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], min(hard, 16384))\n"
    )
    out = run_script(code)
    assert out.returncode == 0, out.stderr
    now, want = out.stdout.split()
    assert now == want


def test_cost_key_names_the_code_through_partials_methods_and_callables():
    import functools
    import math

    from shoal.backends._cost_hints import cost_key

    class Model:
        def step(self, x):
            return x

        def __call__(self, x):
            return x

    def make():
        return lambda x: x

    assert cost_key(square) is square.__code__
    assert cost_key(functools.partial(functools.partial(square))) is square.__code__
    assert cost_key(make()) is cost_key(make()), "a lambda made anew is the same code"
    assert cost_key(Model().step) is Model.step.__code__
    assert cost_key(Model()) is Model.__call__.__code__
    assert cost_key(math.sqrt) is math.sqrt
    assert cost_key(object()) is None


def test_a_later_call_of_the_same_function_starts_from_its_measured_cost():
    from shoal._spec import CallSpec
    from shoal.backends._cost_hints import cost_key

    pool = shoal.get_backend("processes").pool(2)
    shoal.map(square, range(20_000), workers=2)
    hint = pool._cost_hints.get(cost_key(square))
    assert hint is not None and hint > 0
    # The next call's first chunk is sized from that cost: no single-item probe.
    session = pool.open_session(ordered=False)
    try:
        first = session.chunk_size(session.register(CallSpec(square)), 20_000)
    finally:
        session.close()
    assert first > 1
    # Another function has no hint: it probes with one item.
    session = pool.open_session(ordered=False)
    try:
        assert session.chunk_size(session.register(CallSpec(slow_pid)), 20_000) == 1
    finally:
        session.close()


def test_the_default_backend_and_backend_processes_share_one_pool():
    # Both used to start their own workers: twice the processes for the same setting.
    assert shoal.get_backend(None).pool(2) is shoal.get_backend("processes").pool(2)
    a = set(shoal.map(slow_pid, range(4), workers=2, chunksize=1))
    b = set(shoal.map(slow_pid, range(4), workers=2, chunksize=1, backend="processes"))
    assert a == b
