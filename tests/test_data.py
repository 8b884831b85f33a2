"""Issue 4 features that stand on their own: thread limits, seeds, worker state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shoal
from shoal.backends.processes import THREAD_VARIABLES, ProcessBackend

from helpers import run_script, square, wait_until


def worker_env(_):
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}


def test_workers_get_thread_limits_by_default():
    be = ProcessBackend(workers=2)
    try:
        (env,) = shoal.map(worker_env, [0], backend=be)
    finally:
        be.shutdown()
    expected = str(max(1, shoal.cpu_count() // 2))
    for name in THREAD_VARIABLES:
        if name not in os.environ:
            assert env[name] == expected, (name, env)


def test_threads_per_worker_option_and_user_setting_wins():
    code = (
        "import shoal, test_data\n"
        "ex = shoal.Executor(workers=1, threads_per_worker=3)\n"
        "print(ex.submit(test_data.worker_env, 0).result())\n"
        "ex.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update({"PYTHONPATH": os.pathsep.join(sys.path), "MKL_NUM_THREADS": "7"})
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    got = eval(out.stdout)
    assert got["OMP_NUM_THREADS"] == "3" and got["OPENBLAS_NUM_THREADS"] == "3"
    assert got["MKL_NUM_THREADS"] == "7", "the user's explicit setting wins"


def test_bad_threads_per_worker():
    with pytest.raises(ValueError):
        ProcessBackend(threads_per_worker=0)
    with pytest.raises(TypeError):
        ProcessBackend(threads_per_worker="2")
    assert shoal.map(square, [2]) == [4]


def draws(x):
    import random

    out = [random.random(), random.getrandbits(64)]
    try:
        import numpy as np
    except ImportError:
        return out
    return [*out, float(np.random.random()), int(np.random.randint(0, 2**31))]


@pytest.mark.parametrize(
    "how",
    [
        {"workers": 1},
        {"workers": 2, "chunksize": 1},
        {"workers": 2, "chunksize": 7},
        {"workers": 2},
        {"backend": "threads", "workers": 2},
        {"backend": "serial"},
    ],
    ids=["1-worker", "chunk-1", "chunk-7", "adaptive", "threads", "serial"],
)
def test_seeded_results_do_not_depend_on_scheduling(how):
    reference = shoal.map(draws, range(60), seed=1234, backend="serial")
    assert shoal.map(draws, range(60), seed=1234, **how) == reference
    assert sorted(shoal.as_completed(draws, range(60), seed=1234, with_index=True, **how)) == list(
        enumerate(reference)
    )


def test_seeded_range_inputs_match_lists():
    assert shoal.map(draws, range(40), seed=3) == shoal.map(draws, list(range(40)), seed=3)


def test_seeded_streams_are_independent_and_seed_dependent():
    a = shoal.map(draws, range(50), seed=1)
    b = shoal.map(draws, range(50), seed=2)
    assert len({tuple(x) for x in a}) == 50, "every item has its own stream"
    assert a != b


def flaky_draw(x, marker_dir):
    import random

    value = random.random()
    marker = os.path.join(marker_dir, f"d-{x}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(4)
    return value


def test_a_retried_item_draws_the_same_numbers(tmp_path):
    reference = shoal.map(draws, range(5), seed=9, backend="serial")
    got = shoal.map(flaky_draw, range(5), args=(str(tmp_path),), seed=9, retries=1, chunksize=5)
    assert got == [r[0] for r in reference]


def test_executor_seed_follows_submission_order():
    with shoal.Executor(workers=2, seed=5) as ex:
        got = [f.result() for f in [ex.submit(draws, i) for i in range(10)]]
    assert got == shoal.map(draws, range(10), seed=5, backend="serial")


def test_bad_seed():
    with pytest.raises(ValueError):
        shoal.map(square, [1], seed=-1)
    with pytest.raises(TypeError):
        shoal.map(square, [1], seed="abc")


def init_worker(tag):
    state = shoal.worker_state()
    state["tag"] = tag
    state["inits"] = state.get("inits", 0) + 1
    state["pid"] = os.getpid()


def read_state(x):
    state = shoal.worker_state()
    return (state["tag"], state["inits"], state["pid"], shoal.shared()["scale"] * x)


@pytest.mark.parametrize("backend", ["processes", "threads", "serial"])
def test_initializer_runs_once_per_worker_and_tasks_see_its_state(backend):
    got = shoal.map(
        read_state,
        range(40),
        workers=2,
        chunksize=1,
        initializer=init_worker,
        initargs=("ready",),
        shared={"scale": 3},
        backend=backend,
    )
    assert [g[3] for g in got] == [3 * x for x in range(40)]
    assert all(g[0] == "ready" and g[1] == 1 for g in got), "initializer ran once per worker"


def init_then_crash(x):
    if x == 3:
        marker = os.path.join(shoal.shared(), "crashed")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
    state = shoal.worker_state()
    return (state["tag"], state["inits"], state["pid"])


def test_a_replacement_worker_runs_the_initializer_again(tmp_path):
    got = shoal.map(
        init_then_crash,
        range(8),
        workers=1,
        chunksize=1,
        retries=1,
        initializer=init_worker,
        initargs=("again",),
        shared=str(tmp_path),
    )
    pids = {g[2] for g in got}
    assert len(pids) == 2, "the crash replaced the worker"
    assert all(g[:2] == ("again", 1) for g in got), "each worker initialized exactly once"


def bad_init():
    raise OSError("no GPU here")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_an_initializer_that_raises_names_itself_and_does_not_hang(backend):
    with pytest.raises(shoal.InitializerError, match=r"bad_init\(\) raised OSError: no GPU here"):
        shoal.map(square, range(10), initializer=bad_init, backend=backend)
    got = shoal.map(square, range(3), initializer=bad_init, on_error="return", backend=backend)
    assert all(isinstance(g, shoal.InitializerError) for g in got)
    assert shoal.map(square, range(3), backend=backend) == [0, 1, 4], "pool still usable"


def test_shared_object_is_sent_once_per_call_not_per_item():
    counter = {"n": 0}

    class Big:
        def __reduce__(self):
            counter["n"] += 1
            return (dict, ({"scale": 2},))

    got = shoal.map(read_state, range(200), initializer=init_worker, initargs=("x",), shared=Big())
    assert [g[3] for g in got] == [2 * x for x in range(200)]
    assert counter["n"] == 1


def test_initializer_and_shared_work_from_main():
    code = (
        "import shoal\n"
        "def init(offset):\n"
        "    shoal.worker_state()['offset'] = offset\n"
        "def task(x):\n"
        "    return x + shoal.worker_state()['offset'] + shoal.shared()\n"
        "if __name__ == '__main__':\n"
        "    print(shoal.map(task, range(4), initializer=init, initargs=(100,), shared=10))\n"
        "    with shoal.Executor(workers=2, initializer=init, initargs=(1,), shared=0) as ex:\n"
        "        print([ex.submit(task, i).result() for i in range(3)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[110, 111, 112, 113]", "[1, 2, 3]"]


def test_accessors_outside_a_task_are_a_clear_error():
    with pytest.raises(RuntimeError, match="only available inside a task"):
        shoal.shared()
    with pytest.raises(TypeError, match="initargs given without an initializer"):
        shoal.map(square, [1], initargs=(1,))
    with pytest.raises(TypeError, match="initializer must be callable"):
        shoal.map(square, [1], initializer=5)


def test_machine_limits_hold_back_new_items_and_release_them():
    assert shoal.map(square, range(20), max_load=1.0, max_memory=0.999) == [
        x * x for x in range(20)
    ]
    import threading

    # 1 byte of memory in use is always exceeded: nothing may start.
    stream = shoal.as_completed(square, range(5), max_memory=1)
    got, errors = [], []

    def consume():
        try:
            got.extend(stream)
        except shoal.ShoalError as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(1.0)
    assert got == [] and thread.is_alive(), "items must wait while the machine is over the limit"
    stream.close()  # from another thread: the waiting consumer gets a clear error
    thread.join(10)
    assert not thread.is_alive() and "closed" in str(errors[0])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_load": 0}, ValueError),
        ({"max_load": 1.5}, ValueError),
        ({"max_load": "high"}, TypeError),
        ({"max_memory": "lots"}, ValueError),
        ({"max_memory": -1}, ValueError),
    ],
)
def test_bad_machine_limits(kwargs, error):
    with pytest.raises(error):
        shoal.map(square, [1], **kwargs)


def test_in_process_backends_refuse_machine_limits():
    with pytest.raises(ValueError, match="max_load"):
        shoal.map(square, [1], max_load=0.5, backend="threads")


np = pytest.importorskip("numpy")


def array_sum(a, i=0):
    return int(a.sum()) + i


def mutate_first(a):
    a[0] = -7
    return int(a[0])


def shm_files():
    return sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else []


def test_large_arrays_go_through_shared_memory_once_per_call():
    import functools

    from shoal import _shm

    arr = np.arange(2_000_000, dtype=np.int64)  # 16 MB: over the threshold
    made = []
    real = _shm.SegmentCache.ref

    def counting(self, view):
        before = len(self._segments)
        out = real(self, view)
        made.append(len(self._segments) - before)
        return out

    _shm.SegmentCache.ref = counting
    try:
        before = shm_files()
        got = shoal.map(functools.partial(array_sum, arr), range(20), workers=2)
        assert got == [int(arr.sum()) + i for i in range(20)]
        got = shoal.map(array_sum, [arr] * 10, workers=2, chunksize=1)
        assert got == [int(arr.sum())] * 10
    finally:
        _shm.SegmentCache.ref = real
    assert sum(made) == 2, "one segment per call, however many tasks use the array"
    assert shm_files() == before, "memfd segments leave no file in /dev/shm"


def segments_mapped_by(pid):
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return maps.read().count("memfd:shoal")
    except OSError:
        return 0


def test_workers_unmap_a_calls_arrays_when_the_call_ends(monkeypatch):
    import functools

    # A worker keeps its mapping of data kept by the driver for later calls (as long as the
    # driver keeps the data: SHOAL_SEGMENT_CACHE_IDLE seconds unused), then unmaps it.
    monkeypatch.setenv("SHOAL_SEGMENT_CACHE_IDLE", "0.5")
    be = ProcessBackend(workers=2)
    try:
        pool = be.pool()
        arr = np.arange(2_000_000, dtype=np.int64)
        fn = functools.partial(array_sum, arr)
        assert shoal.map(fn, range(8), backend=be, chunksize=1) == [
            int(arr.sum()) + i for i in range(8)
        ]
        pids = pool.pids()
        assert pids
        assert wait_until(lambda: all(segments_mapped_by(p) == 0 for p in pids), timeout=5), (
            "an idle worker must not keep a finished call's 16 MB segment mapped"
        )
    finally:
        be.shutdown()


def test_a_task_mutating_its_array_leaves_the_callers_unchanged():
    big = np.ones(1_000_000)
    small = np.ones(10)
    assert shoal.map(mutate_first, [big, small], chunksize=1) == [-7, -7]
    assert big[0] == 1.0 and small[0] == 1.0


def test_non_contiguous_and_object_arrays_fall_back_to_plain_pickling():
    strided = np.arange(4_000_000, dtype=np.int64)[::2]
    objects = np.array([{"a": i} for i in range(1000)], dtype=object)
    assert shoal.map(array_sum, [strided]) == [int(strided.sum())]
    got = shoal.map(len, [objects])
    assert got == [1000]


def test_when_shared_memory_cannot_be_had_buffers_go_in_band():
    # A file-size limit makes every segment write fail (EFBIG): shoal must fall back, not fail.
    code = (
        "import resource, signal, numpy as np, shoal, test_data\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "arr = np.arange(1_000_000, dtype=np.int64)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))\n"
        "print(shoal.map(test_data.array_sum, [arr, arr], workers=1) == [int(arr.sum())] * 2)\n"
        "got = shoal.map(test_data.big_result, [1, 2], workers=1)\n"
        "want = [test_data.big_result(i) for i in (1, 2)]\n"
        "print(all(np.array_equal(g, w) for g, w in zip(got, want)))\n"
    )
    out = run_script(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def big_result(i):
    return np.full(300_000, i, dtype=np.float64) * np.arange(300_000)  # 2.4 MB


def many_big_results(n):
    return [np.full(150_000, k, dtype=np.int64) for k in range(n)]  # 1.2 MB each


def shared_mappings():
    """Address ranges of this process's mappings of shoal's shared-memory segments."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:shoal" in line:
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_large_results_arrive_through_shared_memory_without_holding_descriptors():
    import gc

    gc.collect()
    mapped_before, fds_before = len(shared_mappings()), open_fds()
    got = shoal.map(big_result, range(40), workers=2)
    for i, arr in enumerate(got):
        assert np.array_equal(arr, big_result(i))
    ranges = shared_mappings()
    address = got[5].__array_interface__["data"][0]
    assert any(lo <= address < hi for lo, hi in ranges), "result not in a shared segment"
    assert open_fds() <= fds_before + 2, "each received segment must not keep a descriptor"
    # Results are ordinary writable arrays; writes stay private to this process.
    got[5][0] = -1.0
    assert got[5][0] == -1.0
    del got, arr
    gc.collect()
    assert len(shared_mappings()) == mapped_before, "segments freed with their arrays"


def test_small_results_stay_in_band():
    got = shoal.map(np.arange, [10, 1000], workers=1)
    assert [len(g) for g in got] == [10, 1000]
    address = got[1].__array_interface__["data"][0]
    assert not any(lo <= address < hi for lo, hi in shared_mappings())


def test_a_result_with_more_buffers_than_one_frame_may_pass_is_still_whole():
    (got,) = shoal.map(many_big_results, [70], workers=1)
    assert [int(a[0]) for a in got] == list(range(70))
    assert all(len(a) == 150_000 for a in got)


def test_results_survive_their_worker_exiting_right_after_sending():
    # One task per worker: each worker exits as soon as its result is sent.
    got = shoal.map(big_result, range(6), workers=2, max_tasks_per_worker=1)
    for i, arr in enumerate(got):
        assert np.array_equal(arr, big_result(i))


def test_results_through_shared_memory_in_imap_and_executor():
    assert [int(a[1]) for a in shoal.imap(big_result, range(5), workers=2)] == [
        int(big_result(i)[1]) for i in range(5)
    ]
    with shoal.Executor(workers=2) as ex:
        futures = [ex.submit(big_result, i) for i in range(5)]
        assert [float(f.result()[2]) for f in futures] == [2.0 * i for i in range(5)]


def test_no_shared_memory_left_after_crash_and_kill(tmp_path):
    before = shm_files()
    arr = np.arange(1_000_000, dtype=np.int64)
    got = shoal.map(
        segfault_or_sum, [(arr, i) for i in range(6)], on_error="return", workers=2, chunksize=1
    )
    assert isinstance(got[3], shoal.WorkerCrashedError)
    assert [g for i, g in enumerate(got) if i != 3] == [int(arr.sum())] * 5
    assert shm_files() == before


def segfault_or_sum(pair):
    a, i = pair
    if i == 3:
        import ctypes

        ctypes.string_at(0)
    return int(a.sum())


def count_new_segments(monkeypatch):
    """Counts segments the per-call caches create (copies into shared memory)."""
    from shoal import _native

    made = []
    real = _native.Segment

    class Counting:
        def __new__(cls, data):
            made.append(1)
            return real(data)

    monkeypatch.setattr(_native, "Segment", Counting)
    return made


def test_shared_arrays_are_passed_without_any_copy(monkeypatch):
    import functools

    base = np.arange(3_000_000, dtype=np.int64)
    arr = shoal.share(base)
    assert isinstance(arr, np.ndarray) and arr.dtype == base.dtype and arr.shape == base.shape
    assert np.array_equal(arr, base)
    address = arr.__array_interface__["data"][0]
    assert any(lo <= address < hi for lo, hi in shared_mappings())
    made = count_new_segments(monkeypatch)
    want = [int(base.sum()) + i for i in range(6)]
    assert shoal.map(functools.partial(array_sum, arr), range(6), workers=2) == want
    assert shoal.map(array_sum, [arr] * 3, workers=2, chunksize=1) == [int(base.sum())] * 3
    # A slice of a shared array is found inside its segment (at an offset), still no copy.
    part = arr[1234:2_000_000]
    assert shoal.map(array_sum, [part], workers=1) == [int(part.sum())]
    assert made == [], "a shared array must never be copied again"


def test_shared_array_writes(monkeypatch):
    arr = shoal.share(np.ones(1_000_000))
    # A task's writes stay in its worker.
    assert shoal.map(mutate_first, [arr], workers=1) == [-7]
    assert arr[0] == 1.0
    # The caller's writes before a call are what the call sees.
    arr[:] = 3.0
    assert shoal.map(array_sum, [arr], workers=1) == [3_000_000]


def test_shared_memory_is_freed_with_the_last_array():
    import gc

    gc.collect()
    before = len(shared_mappings())
    arr = shoal.share(np.arange(2_000_000))
    view = arr[10:]
    del arr
    gc.collect()
    assert len(shared_mappings()) == before + 1, "a view keeps the memory alive"
    assert shoal.map(array_sum, [view], workers=1) == [int(view.sum())]
    del view
    gc.collect()
    assert len(shared_mappings()) == before
    from shoal import _shm

    assert not _shm._SHARED, "the registry forgets freed segments"


def test_shared_zeros_and_other_buffers():
    z = shoal.shared_zeros((500, 1000), dtype=np.float32)
    assert z.shape == (500, 1000) and z.dtype == np.float32 and not z.any()
    z[:] = 2
    assert shoal.map(np.sum, [z], workers=1) == [1_000_000.0]
    b = shoal.share(b"x" * 2_000_000)
    assert isinstance(b, memoryview) and bytes(b[:3]) == b"xxx"
    assert shoal.map(len, [b], workers=1) == [2_000_000]
    f = shoal.share(np.asfortranarray(np.arange(12.0).reshape(3, 4)))
    assert np.array_equal(f, np.arange(12.0).reshape(3, 4))
    assert shoal.share(np.empty((0, 3))).shape == (0, 3)
    assert shoal.shared_zeros(0).shape == (0,)


def test_share_refuses_what_cannot_be_shared():
    with pytest.raises(TypeError, match="dtype=object"):
        shoal.share(np.array([{}, []], dtype=object))
    with pytest.raises(TypeError, match="numpy array or a bytes-like"):
        shoal.share([1, 2, 3])
    with pytest.raises(TypeError, match="dtype=object"):
        shoal.shared_zeros(3, dtype=object)


def array_at(a, i):
    return float(a[i])


@pytest.fixture
def kept(monkeypatch):
    """The driver's kept segments, emptied before and after the test."""
    from shoal import _shm

    store = _shm.kept()
    store.clear()
    yield store
    store.clear()


def test_a_later_call_with_the_same_array_copies_nothing(kept):
    import functools

    arr = np.arange(3_000_000, dtype=np.float64)  # 24 MB
    fn = functools.partial(array_at, arr)
    assert shoal.map(fn, [0, 5], workers=2) == [0.0, 5.0]
    made, hits = kept.made, kept.hits
    assert len(kept) == 1 and kept.nbytes == arr.nbytes
    for _ in range(3):
        assert shoal.map(fn, [1, 7], workers=2) == [1.0, 7.0]
        assert shoal.map(array_at, [arr, arr], [2, 3], workers=2) == [2.0, 3.0]
    assert kept.made == made, "the same bytes were copied into a new segment again"
    assert kept.hits == hits + 6


# 16 MB is hashed whole; 40 MB in 16 MiB parts on several threads (an element in the last part).
@pytest.mark.parametrize(("size", "at"), [(2_000_000, 5), (5_000_000, 4_999_997)])
def test_a_changed_array_is_never_served_stale(kept, size, at):
    import functools

    arr = np.zeros(size)
    fn = functools.partial(array_at, arr)
    assert shoal.map(fn, [at], workers=1) == [0.0]
    arr[at] = 42.0  # one element changes between calls
    assert shoal.map(fn, [at], workers=1) == [42.0]
    arr[at] = 0.0  # and back: the first segment serves it again
    made = kept.made
    assert shoal.map(fn, [at], workers=1) == [0.0]
    assert kept.made == made


def write_then_read(a, i):
    """Returns what item ``i`` found, then overwrites it (a task may write into its args)."""
    import os

    found = float(a[i])
    a[i] = -1.0
    return found, os.getpid(), a.__array_interface__["data"][0]


_HELD = []


def hold_and_write(a, i):
    import os

    found = float(a[i])
    a[i] = -1.0
    _HELD.append(a)  # an array kept past its call: its mapping must not be reused under it
    return found, os.getpid(), a.__array_interface__["data"][0], float(_HELD[0][i])


def test_a_worker_reuses_its_mapping_of_data_sent_again_without_earlier_writes(kept):
    import functools

    arr = np.arange(2_000_000, dtype=np.float64)  # 16 MB
    fn = functools.partial(write_then_read, arr)
    seen = [shoal.map(fn, [3, 4], workers=1, chunksize=1) for _ in range(3)]
    # Each call sees the data as sent, not what an earlier call's task wrote in its copy.
    assert [[value for value, _, _ in call] for call in seen] == [[3.0, 4.0]] * 3
    pids = {pid for call in seen for _, pid, _ in call}
    addresses = {address for call in seen for _, _, address in call}
    assert len(pids) == 1
    assert len(addresses) == 1, "the worker mapped the same data afresh for every call"
    assert arr[3] == 3.0 and arr[4] == 4.0  # and the caller's array never changed


def test_a_mapping_still_used_by_an_earlier_calls_array_is_not_reused(kept):
    import functools

    arr = np.arange(2_000_000, dtype=np.float64)
    fn = functools.partial(hold_and_write, arr)
    first = shoal.map(fn, [7], workers=1)[0]
    second = shoal.map(fn, [7], workers=1)[0]
    assert first[0] == second[0] == 7.0
    assert first[1] == second[1]  # the same worker
    assert second[2] != first[2], "an array kept by a task shared its pages with a new call"
    assert second[3] == -1.0  # the kept array still holds what its task wrote


def test_kept_segments_are_bounded_and_released_when_idle(kept, monkeypatch):
    monkeypatch.setattr(kept, "budget", 20 * 2**20)
    monkeypatch.setattr(kept, "idle", 0.3)
    a, b = np.ones(2_000_000), np.full(2_000_000, 2.0)  # 16 MB each
    assert shoal.map(array_sum, [a], workers=1) == [2_000_000]
    assert kept.nbytes == a.nbytes
    assert shoal.map(array_sum, [b], workers=1) == [4_000_000]
    assert kept.nbytes <= kept.budget, "the idle segment of a made room for b's"
    big = np.ones(3_000_000)  # 24 MB: over the budget, this call owns its copy
    assert shoal.map(array_sum, [big], workers=1) == [3_000_000]
    assert kept.nbytes <= kept.budget
    assert wait_until(lambda: len(kept) == 0, timeout=10), "idle segments must be released"
