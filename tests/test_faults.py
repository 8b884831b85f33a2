"""shoal does not break: fault injection with real worker processes.

Every test has a time limit (pytest-timeout), so a hang is a failure, not a stuck CI.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shoal
from shoal.backends.processes import ProcessBackend

from helpers import (
    alive,
    always_crash,
    busy,
    fail_first_time,
    hog_on,
    leak,
    logged_run,
    pid_of,
    run_script,
    segfault_on,
    sleep_on,
    square,
    wait_until,
)


@pytest.fixture
def pool_backend():
    be = ProcessBackend(workers=2)
    yield be
    be.shutdown(kill=True)


@pytest.mark.timeout(180)
def test_random_sigkills_during_a_large_map_lose_nothing(pool_backend):
    pool = pool_backend.pool()
    stop = threading.Event()
    kills = []

    def age(pid):
        # Seconds since the process started (/proc: start time in clock ticks since boot).
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started

    def killer():
        rng = random.Random(7)
        while not stop.is_set() and len(kills) < 12:
            time.sleep(rng.uniform(0.05, 0.25))
            # Kill workers that are serving, not ones still starting: three workers in a row
            # killed before their hello is the engine's sign of a broken interpreter (it then
            # fails the call with WorkerStartError), which a loaded machine made likely here.
            pids = []
            for pid in pool.pids():
                with contextlib.suppress(OSError):
                    if age(pid) > 0.5:
                        pids.append(pid)
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        xs = list(range(30_000))
        # Long enough (a few seconds) for several kills: a replacement worker is a victim only
        # once it is 0.5 s old, and a quicker map ended after two kills on an idle machine.
        got = shoal.map(busy, xs, kwargs={"n": 10_000}, retries=5, backend=pool_backend)
    finally:
        stop.set()
        thread.join()
    assert got == xs, "every result present and correct"
    assert len(kills) >= 3, "the test must really have killed workers"


def test_segfaulting_items_fail_alone_even_inside_chunks(pool_backend):
    xs = list(range(400))
    bad = (3, 150, 151, 399)
    got = shoal.map(segfault_on, xs, kwargs={"bad": bad}, on_error="return", backend=pool_backend)
    for i, g in enumerate(got):
        if i in bad:
            assert isinstance(g, shoal.WorkerCrashedError), (i, g)
            assert "SIGSEGV" in g.exit and g.index == i
            assert g.pid is not None
        else:
            assert g == 2 * i, (i, g)


def test_a_segfault_inside_a_range_chunk_is_isolated(pool_backend):
    got = shoal.map(
        segfault_on, range(300), kwargs={"bad": (123,)}, on_error="return", backend=pool_backend
    )
    assert isinstance(got[123], shoal.WorkerCrashedError) and got[123].index == 123
    assert [g for i, g in enumerate(got) if i != 123] == [2 * i for i in range(300) if i != 123]


def test_a_segfault_raises_naming_the_item(pool_backend):
    with pytest.raises(shoal.WorkerCrashedError, match=r"item 7.*SIGSEGV") as info:
        shoal.map(segfault_on, range(20), kwargs={"bad": (7,)}, backend=pool_backend)
    assert "segfault_on(7" in str(info.value)
    assert shoal.map(square, [4], backend=pool_backend) == [16], "pool still usable"


@pytest.mark.timeout(60)
def test_items_past_the_timeout_fail_and_the_rest_goes_on(pool_backend):
    start = time.monotonic()
    got = shoal.map(
        sleep_on,
        range(8),
        kwargs={"bad": (2, 5)},
        timeout=0.5,
        on_error="return",
        backend=pool_backend,
    )
    assert time.monotonic() - start < 20, "sleepers (30 s) must have been killed"
    for i, g in enumerate(got):
        if i in (2, 5):
            assert isinstance(g, shoal.TaskTimeoutError) and isinstance(g, TimeoutError)
            assert g.index == i and g.timeout == 0.5
        else:
            assert g == i
    with pytest.raises(shoal.TaskTimeoutError, match="item 2"):
        shoal.map(sleep_on, range(4), timeout=0.5, backend=pool_backend)


@pytest.mark.timeout(60)
def test_timeout_with_retries_lists_attempts(pool_backend):
    with pytest.raises(shoal.TaskTimeoutError) as info:
        shoal.map(sleep_on, [2], timeout=0.3, retries=2, backend=pool_backend)
    exc = info.value
    assert len(exc.attempts) == 2
    assert any("failed after 3 attempts" in n for n in exc.__notes__)


def test_retries_recover_crashes_and_chosen_exceptions(pool_backend, tmp_path):
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    got = shoal.map(
        fail_first_time, range(6), args=(str(crash_dir),), retries=1, backend=pool_backend
    )
    assert got == list(range(6))
    value_dir = tmp_path / "value"
    value_dir.mkdir()
    got = shoal.map(
        fail_first_time,
        range(6),
        args=(str(value_dir), "value"),
        retries=1,
        retry_on=ValueError,
        backend=pool_backend,
    )
    assert got == list(range(6))
    # Without retry_on, a ValueError is final at once.
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(ValueError, match="transient"):
        shoal.map(fail_first_time, [1], args=(str(again), "value"), retries=3, backend=pool_backend)


def test_final_crash_error_lists_the_attempts(pool_backend):
    got = shoal.map(always_crash, [0, 1], retries=2, on_error="return", backend=pool_backend)
    for g in got:
        assert isinstance(g, shoal.WorkerCrashedError)
        assert len(g.attempts) == 2 and all("died" in a for a in g.attempts)


@pytest.mark.timeout(90)
def test_memory_hog_is_killed_and_named(pool_backend):
    got = shoal.map(
        hog_on,
        range(4),
        kwargs={"bad": (1,), "megabytes": 400},
        max_worker_memory="200MB",
        on_error="return",
        backend=pool_backend,
    )
    assert isinstance(got[1], shoal.WorkerMemoryError) and isinstance(got[1], MemoryError)
    assert got[1].limit == 200 * 10**6 and got[1].rss > got[1].limit
    assert [got[0], got[2], got[3]] == [0, 2, 3]


@pytest.mark.timeout(90)
def test_leaky_workers_are_replaced_and_nothing_is_lost(pool_backend):
    # A worker leaks 60 MB per item. It crosses 150 MB either at the end of an item (it is then
    # replaced) or during one (it is killed, and the item, retried, runs on a fresh worker).
    pids = shoal.map(
        leak,
        range(8),
        kwargs={"megabytes": 60},
        max_worker_memory="150MB",
        chunksize=1,
        retries=3,
        backend=pool_backend,
    )
    assert all(isinstance(p, int) for p in pids)
    assert len(set(pids)) >= 3, pids


def test_max_tasks_per_worker_recycles(pool_backend):
    pids = shoal.map(pid_of, range(12), max_tasks_per_worker=3, workers=1, backend="processes")
    counts = {p: pids.count(p) for p in set(pids)}
    assert len(counts) >= 4 and max(counts.values()) <= 3, counts


def test_progress_callable_and_callback():
    infos = []
    seen = []
    got = shoal.map(square, range(500), progress=infos.append, callback=seen.append)
    assert got == [x * x for x in range(500)]
    assert sorted(seen) == sorted(got)
    assert infos[-1].done == 500 and infos[-1].total == 500 and infos[-1].failed == 0
    assert all(a.done <= b.done for a, b in itertools.pairwise(infos))
    infos.clear()
    shoal.map(
        segfault_on, range(20), kwargs={"bad": (4,)}, on_error="return", progress=infos.append
    )
    assert infos[-1].done == 19 and infos[-1].failed == 1


def test_progress_bar_on_stderr():
    code = "import shoal, helpers; shoal.map(helpers.square, range(300), progress=True)"
    out = run_script(code)
    assert out.returncode == 0, out.stderr
    last = out.stderr.strip().split("\r")[-1]
    assert "100%" in last and "300/300" in last and "it/s" in last, out.stderr[-300:]


def test_executor_futures_fail_alone_and_the_executor_survives():
    with shoal.Executor(workers=2, timeout=0.5) as ex:
        ok = [ex.submit(square, i) for i in range(10)]
        crash = ex.submit(segfault_on, 3)
        slow = ex.submit(sleep_on, 2)
        more = [ex.submit(square, i) for i in range(10)]
        with pytest.raises(shoal.WorkerCrashedError, match="SIGSEGV"):
            crash.result(timeout=30)
        with pytest.raises(shoal.TaskTimeoutError):
            slow.result(timeout=30)
        assert [f.result(timeout=30) for f in ok + more] == [i * i for i in range(10)] * 2
        assert ex.submit(square, 9).result(timeout=30) == 81


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"retries": -1}, ValueError),
        ({"retries": 1.5}, TypeError),
        ({"retry_on": [ValueError]}, TypeError),
        ({"retry_on": 5}, TypeError),
        ({"max_tasks_per_worker": 0}, ValueError),
        ({"max_worker_memory": "2XB"}, ValueError),
        ({"max_worker_memory": -5}, ValueError),
        ({"max_worker_memory": "lots"}, ValueError),
        ({"progress": "yes"}, TypeError),
        ({"callback": 5}, TypeError),
    ],
)
def test_bad_recovery_options_fail_before_work(kwargs, error):
    with pytest.raises(error):
        shoal.map(square, range(3), **kwargs)


def test_in_process_backends_refuse_what_they_cannot_honour():
    for name in ("threads", "serial"):
        with pytest.raises(ValueError, match="timeout"):
            shoal.map(square, [1], timeout=1, backend=name)
        with pytest.raises(ValueError, match="max_worker_memory"):
            shoal.map(square, [1], max_worker_memory="1GB", backend=name)
        with pytest.raises(ValueError, match="max_tasks_per_worker"):
            shoal.Executor(backend=name, max_tasks_per_worker=2)
        # Retries of chosen exceptions work everywhere.
        calls = []

        def flaky(x):
            calls.append(x)
            if calls.count(x) == 1:
                raise KeyError(x)
            return x

        assert shoal.map(flaky, [1, 2], retries=1, retry_on=KeyError, backend=name) == [1, 2]


def test_memory_size_strings():
    from shoal._options import parse_memory

    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 10**9)
    assert parse_memory(1024) == 1024
    assert parse_memory(None) is None


def test_a_result_too_large_for_the_channel_names_its_item():
    code = textwrap.dedent(
        """
        import shoal, helpers
        got = shoal.map(helpers.big_result, range(3), kwargs={"megabytes": 3}, on_error="return")
        print(type(got[1]).__name__, "|", got[1], "|", got[1].__notes__[0])
        """
    )
    out = run_script(code, env={"SHOAL_MAX_MESSAGE_BYTES": str(2**20)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("PicklingError")
    assert "too large for the channel" in out.stdout and "item 1" in out.stdout


def test_tasks_printing_megabytes_do_not_disturb_the_channel():
    code = (
        "import shoal, helpers; print(shoal.map(helpers.chatty, range(6), kwargs={'megabytes': 2}))"
    )
    out = run_script(code)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.rstrip().endswith("[0, 1, 2, 3, 4, 5]")
    assert len(out.stdout) > 12 * 2**20


SLEEPERS = "helpers.sleep_on, range(4), kwargs={'bad': (0, 1, 2, 3)}"
CTRL_C_MODES = {
    "map": f"shoal.map({SLEEPERS}, workers=2)",
    "imap": f"list(shoal.imap({SLEEPERS}, workers=2))",
    "as_completed": f"list(shoal.as_completed({SLEEPERS}, workers=2))",
    "executor_map": f"ex = shoal.Executor(workers=2)\n    with ex: list(ex.map({SLEEPERS}))",
    "future_result": (
        "ex = shoal.Executor(workers=2)\n    with ex: ex.submit(helpers.sleep_on, 2).result()"
    ),
    # Segments in use (a 16 MB argument mapped by both workers) when Ctrl-C comes.
    "map_with_large_array": (
        "import numpy as np\n    shoal.map(helpers.hold_array, range(4), "
        "kwargs={'arr': np.ones(2_000_000)}, workers=2)"
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", sorted(CTRL_C_MODES))
def test_ctrl_c_stops_everything_within_a_second(mode):
    code = textwrap.dedent(
        """
        import os, sys, time, threading, shoal, helpers

        def report():
            time.sleep(1.0)
            # Workers are children of the pool's spawner thread: read every thread's list.
            kids = []
            for task in os.listdir(f"/proc/{os.getpid()}/task"):
                kids += open(f"/proc/{os.getpid()}/task/{task}/children").read().split()
            print("workers", *kids, flush=True)

        threading.Thread(target=report, daemon=True).start()
        try:
            BODY
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    ).replace("BODY", CTRL_C_MODES[mode])
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = proc.stdout.readline().split()
    assert line and line[0] == "workers", proc.stderr.read()
    pids = [int(p) for p in line[1:]]
    assert pids, "workers should be running"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code_ = proc.wait(10)
    took = time.monotonic() - sent
    stderr = proc.stderr.read()
    assert code_ == 3, stderr
    assert took < 1.5, f"took {took:.2f} s to stop"
    assert "interrupted" in proc.stdout.read()
    assert all(wait_until(lambda p=p: not alive(p), 5) for p in pids), "orphan workers"
    assert stderr.count("Traceback") == 0, "no traceback storm from workers"


def test_finished_items_of_a_crashed_chunk_do_not_run_again(tmp_path):
    # One chunk of 8 slow items; the worker dies on item 5. Items 0-4 had finished: their
    # results are kept and they do not run again; 6 and 7 run once; 5 is the culprit.
    out = shoal.map(
        logged_run,
        range(8),
        kwargs={"log_dir": str(tmp_path), "crash": 5},
        chunksize=8,
        workers=1,
        on_error="return",
    )
    assert out[:5] == [0, 1, 2, 3, 4] and out[6:] == [6, 7]
    assert isinstance(out[5], shoal.WorkerCrashedError)
    runs = {x: (tmp_path / f"run-{x}").read_text().count("ran") for x in range(8)}
    assert runs == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 1, 7: 1}
