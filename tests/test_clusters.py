"""Faults on the cluster backends (Dask, Ray), against the real engines started by the tests.

The contract suite (test_contract.py) checks that results, errors and options are the same as
on every backend; this file kills workers, times items out, and interrupts calls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shoal

from helpers import (
    crash_late,
    crash_on,
    note_pid_then_sleep,
    sleep_on,
    slow_first_time,
    square,
    wait_until,
)

pytestmark = pytest.mark.engine

ENGINES = ["dask", "ray"]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.getfixturevalue(f"{request.param}_backend")


def _wait_for_full_cluster(backend, slots=2):
    ok = wait_until(lambda: backend.cluster_slots() >= slots, 60)
    assert ok, f"cluster did not recover: {backend.cluster_slots()} of {slots} worker threads"


@pytest.mark.timeout(120)
def test_a_sigkilled_worker_loses_nothing_with_retries(engine, tmp_path):
    marks = tmp_path / "pids"
    marks.mkdir()
    killed = []
    stop = threading.Event()

    def killer():
        # Kill the first worker seen running an item, once the map is well under way.
        while not stop.is_set() and not killed:
            pids = [int(p) for p in os.listdir(marks)]
            if len(os.listdir(marks)) and len(pids) >= 1 and time.monotonic() > begin + 0.5:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    begin = time.monotonic()
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        xs = list(range(300))
        got = shoal.map(
            note_pid_then_sleep, xs, kwargs={"marker_dir": str(marks)}, retries=2, backend=engine
        )
    finally:
        stop.set()
        thread.join()
    assert killed, "the test must really have killed a worker"
    assert got == xs, "every result present and correct"
    _wait_for_full_cluster(engine)


def test_a_crashing_item_fails_alone_and_the_cluster_stays_usable(engine):
    got = shoal.map(crash_on, range(60), kwargs={"bad": 7}, on_error="return", backend=engine)
    assert isinstance(got[7], shoal.WorkerCrashedError)
    assert "item 7" in str(got[7])
    assert [g for i, g in enumerate(got) if i != 7] == [x for x in range(60) if x != 7]
    _wait_for_full_cluster(engine)
    assert shoal.map(square, range(10), backend=engine) == [x * x for x in range(10)]


@pytest.mark.timeout(90)
def test_timeout_kills_the_item_and_retries_recover(engine, tmp_path):
    started = time.monotonic()
    got = shoal.map(
        sleep_on,
        range(4),
        kwargs={"bad": (2,), "seconds": 30},
        timeout=2,
        on_error="return",
        backend=engine,
    )
    assert isinstance(got[2], shoal.TaskTimeoutError) and got[2].timeout == 2
    assert [got[i] for i in (0, 1, 3)] == [0, 1, 3]
    assert time.monotonic() - started < 30, "the sleeping item was stopped, not waited for"
    # A second run of the slow item is quick: retries= recovers it.
    got = shoal.map(
        slow_first_time,
        range(4),
        kwargs={"marker_dir": str(tmp_path)},
        timeout=2,
        retries=1,
        backend=engine,
    )
    assert got == [0, 1, 2, 3]
    _wait_for_full_cluster(engine)


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("dask", {"max_tasks_per_worker": 2}),
        ("dask", {"max_worker_memory": "1GB"}),
        ("dask", {"max_load": 0.5}),
        ("dask", {"max_memory": "1GB"}),
        ("ray", {"max_worker_memory": "1GB"}),
        ("ray", {"max_load": 0.5}),
        ("ray", {"max_memory": "1GB"}),
    ],
)
def test_options_an_engine_cannot_honour_are_refused_before_any_work(request, name, option):
    backend = request.getfixturevalue(f"{name}_backend")
    calls = []

    def record(x):
        calls.append(x)
        return x

    (key,) = option
    with pytest.raises(ValueError, match=rf"{name} backend cannot honour {key}="):
        shoal.map(record, range(3), backend=backend, **option)
    if key in ("timeout", "max_tasks_per_worker", "max_worker_memory"):
        with pytest.raises(ValueError, match=key), shoal.Executor(backend=backend, **option) as ex:
            ex.submit(record, 1)
    assert calls == []


def test_ray_max_tasks_per_worker_replaces_workers(ray_backend):
    from helpers import pid_of

    pids = shoal.map(pid_of, range(12), max_tasks_per_worker=2, backend=ray_backend)
    counts = {p: pids.count(p) for p in set(pids)}
    assert max(counts.values()) <= 2, counts


_CTRL_C_SCRIPT = """
import sys, time
import shoal
from helpers import log_then_sleep, square

backend = shoal.get_backend({name!r}, address={address!r})
stream = shoal.imap(log_then_sleep, range(400), kwargs={{"path": {path!r}}}, chunksize=1,
                    backend=backend)
next(stream)
print("running", flush=True)
try:
    for _ in stream:
        pass
except KeyboardInterrupt:
    print("interrupted", flush=True)
print(shoal.map(square, range(5), backend=backend), flush=True)
"""


def _address(name, backend):
    if name == "dask":
        return backend.scheduler_address
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ENGINES)
def test_ctrl_c_cancels_the_call_quickly_and_the_next_call_works(request, name, tmp_path):
    backend = request.getfixturevalue(f"{name}_backend")
    log = tmp_path / "started"
    code = _CTRL_C_SCRIPT.format(name=name, address=_address(name, backend), path=str(log))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "running", line if line else proc.stderr.read()
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        took = time.monotonic() - sent
        assert line.strip() == "interrupted", proc.stderr.read()
        assert took < 2.0, f"Ctrl-C took {took:.2f} s to return"
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "[0, 1, 4, 9, 16]"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # What was running may finish (0.2 s); nothing queued starts afterwards.
    time.sleep(1.0)
    ran = len(log.read_text().split())
    time.sleep(1.0)
    assert len(log.read_text().split()) == ran, "items of the interrupted call kept starting"
    assert ran < 100, f"{ran} of 400 items ran: the call was not cancelled"
    assert shoal.map(square, range(5), backend=backend) == [0, 1, 4, 9, 16]


def test_import_shoal_does_not_import_the_engines_and_a_missing_one_names_its_extra():
    code = """
import sys
sys.modules["distributed"] = None  # as if not installed
sys.modules["ray"] = None
import shoal
assert shoal.map(abs, [-1], backend="threads") == [1]
assert {"dask", "ray"} <= set(shoal.available_backends())
for name in ("dask", "ray"):
    try:
        shoal.get_backend(name)
    except ModuleNotFoundError as exc:
        assert f"shoal[{name}]" in str(exc), exc
    else:
        raise AssertionError(name)
code = "import shoal; shoal.map(abs, [-1], backend='threads'); shoal.get_backend('processes')"
import subprocess
subprocess.run([sys.executable, "-c", code + "; import sys; "
    "assert 'distributed' not in sys.modules and 'ray' not in sys.modules"], check=True)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_dask_backend_options_are_checked():
    pytest.importorskip("distributed")
    with pytest.raises(TypeError, match="address= or client="):
        shoal.get_backend("dask", address="tcp://127.0.0.1:1", client=object())
    with pytest.raises(ValueError, match="threads_per_worker"):
        shoal.get_backend("dask", address="tcp://127.0.0.1:1", threads_per_worker=2)
    with pytest.raises(ValueError, match="target_chunk_s"):
        shoal.get_backend("dask", target_chunk_s=0)


@pytest.mark.timeout(120)
def test_dask_memory_limit_restarts_a_hog_and_fails_only_its_item():
    pytest.importorskip("distributed")
    from engines import engine_backend

    from helpers import hog_on

    fixture = engine_backend("dask", workers=1, memory_limit="300MB")
    backend = next(fixture)
    try:
        got = shoal.map(
            hog_on,
            range(4),
            kwargs={"bad": (1,), "megabytes": 400, "hold": 10.0},
            on_error="return",
            backend=backend,
        )
        assert isinstance(got[1], shoal.WorkerCrashedError), got
        assert [got[i] for i in (0, 2, 3)] == [0, 2, 3]
        _wait_for_full_cluster(backend, 1)
        assert shoal.map(square, range(4), backend=backend) == [0, 1, 4, 9]
    finally:
        with contextlib.suppress(StopIteration):
            next(fixture)  # stops the cluster and checks that nothing is left


def test_dask_a_chunk_queued_behind_one_that_kills_the_worker_is_not_blamed():
    # One worker thread, one item per chunk: each chunk runs with the next one queued behind
    # it on the same worker, so the crash of item 2 takes item 3's task down too. Item 3 must
    # run again (alone) and succeed; only item 2 is blamed.
    pytest.importorskip("distributed")
    from engines import engine_backend

    fixture = engine_backend("dask", workers=1)
    backend = next(fixture)
    try:
        got = shoal.map(
            crash_late, range(6), kwargs={"bad": 2}, chunksize=1, on_error="return", backend=backend
        )
        assert isinstance(got[2], shoal.WorkerCrashedError), got
        assert [got[i] for i in (0, 1, 3, 4, 5)] == [0, 1, 3, 4, 5], got
        _wait_for_full_cluster(backend, 1)
    finally:
        with contextlib.suppress(StopIteration):
            next(fixture)  # stops the cluster and checks that nothing is left


def test_executor_futures_from_many_threads_while_results_arrive(engine):
    with shoal.Executor(backend=engine) as ex:

        def submit_many(base):
            return [ex.submit(square, base + i) for i in range(100)]

        with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as threads:
            batches = list(threads.map(submit_many, range(0, 400, 100)))
        got = [f.result(timeout=60) for batch in batches for f in batch]
    assert got == [x * x for x in range(400)]
