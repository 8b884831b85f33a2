"""shoal.compat.sciris.parallelize behaves as sciris.parallelize, on shoal.

These mirror sciris' own tests of ``parallelize`` (tests/test_parallel.py in its sdist; run them
by hand with scripts/upstream_compat_tests.sh) and add what shoal changes: a dead worker fails
its job alone.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest

import shoal

from compat_helpers import CustomError, die_on, raise_custom_on, record_call, stop_on_failure, where

np = pytest.importorskip("numpy")
sc_par = pytest.importorskip("shoal.compat.sciris")
parallelize = sc_par.parallelize


def test_import_shoal_does_not_import_the_tools():
    import subprocess
    import sys

    code = (
        "import sys, shoal, shoal.compat; shoal.map(abs, [1]); "
        "print(sorted(m for m in ('sciris', 'scinexus', 'joblib', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_iterarg_forms():
    assert parallelize(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    # A tuple is unpacked; None is still passed; an int n means n calls without an argument.
    assert parallelize(lambda x, y: x * y, iterarg=[(1, 2), (2, 3), (3, 4)]) == [2, 6, 12]
    assert parallelize(lambda x=5: x, iterarg=[None, 2]) == [None, 2]
    assert parallelize(lambda: 7, 3) == [7, 7, 7]
    assert parallelize(lambda x: x + 1, (i for i in range(3))) == [1, 2, 3]


def test_iterkwargs_args_and_kwargs():
    def f(x, y):
        return x * y

    expected = [2, 6, 12]
    assert parallelize(f, iterkwargs={"x": [1, 2, 3], "y": [2, 3, 4]}) == expected
    assert parallelize(f, iterkwargs=[{"x": 1, "y": 2}, {"x": 2, "y": 3}, {"x": 3, "y": 4}]) == [
        2,
        6,
        12,
    ]
    assert parallelize(f, iterarg=[1, 2, 3], iterkwargs={"y": [2, 3, 4]}) == expected
    assert parallelize(f, iterarg=[1, 2, 3], args=[2]) == [2, 4, 6]

    def g(i, x, y):
        return i + x * y

    assert parallelize(g, iterarg=[0, 1], kwargs={"x": 3, "y": 8}) == [24, 25]
    assert parallelize(g, iterarg=[0, 1], x=5, y=10) == [50, 51]  # extra kwargs go to func
    # Per-job keyword arguments override the common ones, as sciris merges them.
    assert parallelize(g, iterarg=[0], iterkwargs={"y": [1]}, x=2, y=100) == [2]


@pytest.mark.parametrize(
    "parallelizer",
    [None, "default", "robust", "fast", "concurrent.futures", "multiprocessing", "thread",
     "threadpool", "serial", "serial-copy", "thread-copy", "multiprocess-async"],
)  # fmt: skip
def test_every_parallelizer_name_gives_the_same_results(parallelizer):
    assert parallelize(lambda x: x**2, np.arange(4), parallelizer=parallelizer) == [0, 1, 4, 9]


def test_process_parallelizers_run_in_shoal_workers_and_thread_ones_here():
    for name in (None, "fast", "multiprocessing"):
        runs = parallelize(where, [1, 2, 3], parallelizer=name)
        assert all(pid != os.getpid() and shoal_worker for _, pid, shoal_worker in runs)
    for name in ("thread", "serial"):
        runs = parallelize(where, [1, 2, 3], parallelizer=name)
        assert {pid for _, pid, _ in runs} == {os.getpid()}
    assert {pid for _, pid, _ in parallelize(where, [1, 2, 3], serial=True)} == {os.getpid()}


def test_ncpus_sets_the_number_of_workers():
    runs = parallelize(where, list(range(12)), ncpus=1)
    assert len({pid for _, pid, _ in runs}) == 1


def test_custom_parallelizer_is_called_with_a_task_and_the_job_list():
    seen = []

    def my_map(task, items):
        seen.append(len(items))
        return [task(item) for item in items]

    assert parallelize(lambda x, y: [x] * y, iterkwargs={"x": [1, 2], "y": [2, 1]},
                       parallelizer=my_map) == [[1, 1], [2]]  # fmt: skip
    assert seen == [2]


def test_copy_parallelizers_copy_the_arguments():
    def mutate(x):
        x.append(1)
        return len(x)

    shared = [0]
    assert parallelize(mutate, [shared, shared], parallelizer="serial-copy") == [2, 2]
    assert shared == [0]
    assert parallelize(mutate, [shared, shared], parallelizer="serial") == [2, 3]


def test_numpy_is_reseeded_per_job_from_the_callers_generator():
    def rnd():
        return np.random.rand()

    results = parallelize(rnd, 10)
    assert len(set(results)) == 10
    np.random.seed(1)
    first = parallelize(rnd, 4, ncpus=2)
    np.random.seed(1)
    second = parallelize(rnd, 4, start_method="spawn")  # accepted, and changes nothing
    assert first == second
    assert parallelize(rnd, 4) != parallelize(rnd, 4)


def test_die_true_raises_the_first_failure_with_its_type():
    with pytest.raises(CustomError, match="bad input 2") as info:
        parallelize(raise_custom_on, iterarg=range(6))
    assert any("Task 2 failed" in note for note in info.value.__notes__)
    with pytest.raises(TypeError):
        parallelize(lambda x=0: x, iterarg=2, kwargs={"y": "bad kwarg"})

    def not_implemented(x):
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        parallelize(not_implemented, iterarg=[1, 2])


def test_die_false_puts_the_exception_in_place_and_warns():
    with pytest.warns(RuntimeWarning, match="Task 2 failed, but die=False"):
        results = parallelize(raise_custom_on, [0, 1, 2, 3], die=False)
    assert results[:2] == [0, 1] and results[3] == 3
    assert type(results[2]).__name__ == "CustomError"


def test_a_dead_worker_fails_its_job_alone():
    with pytest.warns(RuntimeWarning, match="Task 1 failed"):
        results = parallelize(die_on, [0, 1, 2, 3], die=False, ncpus=2)
    assert results[0] == 0 and results[2:] == [2, 3]
    assert isinstance(results[1], shoal.WorkerCrashedError)
    with pytest.raises(shoal.WorkerCrashedError):
        parallelize(die_on, [0, 1, 2], ncpus=2)


def test_callback_runs_in_the_worker(tmp_path):
    def f(x, log):
        return x

    assert parallelize(f, [5, 6, 7], callback=record_call, log=str(tmp_path)) == [5, 6, 7]
    pids = {int((tmp_path / name).read_text()) for name in os.listdir(tmp_path)}
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2"]
    assert os.getpid() not in pids


@pytest.mark.parametrize("parallelizer", ["serial", "thread", None])
def test_callback_can_stop_the_run(parallelizer):
    import time

    def fail_at_2(x):
        time.sleep(0.01)  # so that jobs are left to skip
        if x == 2:
            raise ValueError("Intentional failure")
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = parallelize(fail_at_2, iterarg=range(50), callback=stop_on_failure,
                              die=False, parallelizer=parallelizer, ncpus=2)  # fmt: skip
    skipped = [r for r in results if r is None]
    assert 0 < len(skipped) < 50
    assert isinstance(results[2], ValueError)


@pytest.mark.parametrize("parallelizer", ["serial", "thread", None])
def test_globaldict_is_shared_between_jobs_but_not_written_back(parallelizer):
    def write(x, globaldict=None):
        globaldict[x] = x
        return sorted(globaldict)

    start = {0: 0}
    results = parallelize(write, [1, 2, 3], globaldict=start, ncpus=1, parallelizer=parallelizer)
    assert results[-1] == [0, 1, 2, 3]
    assert start == {0: 0}


def test_capture_silences_the_jobs(capfd):
    def loud(x):
        print("noise", x)
        return x

    assert parallelize(loud, [1, 2], capture=True, serial=True) == [1, 2]
    assert "noise" not in capfd.readouterr().out


def test_load_limits_are_accepted():
    # maxmem holds back nothing below 99.9% of RAM in use; maxcpu=1 never holds back.
    assert parallelize(abs, [-1, -2], maxcpu=1.0, maxmem=0.999, interval=0.05) == [1, 2]
    assert parallelize(abs, [-1, -2], lbkwargs={"maxmem": 0.999}) == [1, 2]
    with pytest.warns(FutureWarning, match="maxcpu"):
        assert parallelize(abs, [-1], maxload=1.0) == [1]


def test_signature_matches_sciris():
    sciris = pytest.importorskip("sciris")
    ours = inspect.signature(parallelize).parameters
    theirs = inspect.signature(sciris.parallelize).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


# -- bad input (issue 12, section 6) ------------------------------------------------------


def test_unknown_parallelizer_name():
    with pytest.raises(sc_par.KeyNotFoundError, match='Parallelizer "nope" not found: must be'):
        parallelize(abs, [1], parallelizer="nope")
    with pytest.raises(KeyError):
        parallelize(abs, [1], parallelizer="invalid-parallelizer")
    sciris = pytest.importorskip("sciris")
    with pytest.raises(sciris.KeyNotFoundError):
        parallelize(abs, [1], parallelizer="nope")


def test_iterarg_and_iterkwargs_of_different_lengths():
    with pytest.raises(
        ValueError,
        match=r"All iterarg and iterkwargs iterables must be the same length, not 3 vs\. 2",
    ):
        parallelize(lambda x, y: x, iterarg=[1, 2, 3], iterkwargs={"y": [1, 2]})
    with pytest.raises(ValueError, match=r"iterarg and iterkwargs must be the same length, not 2"):
        parallelize(lambda x, y: x, iterarg=[1, 2], iterkwargs=[{"y": 1}])
    with pytest.raises(ValueError, match=r"must be the same length, not 2 vs\. 1"):
        parallelize(lambda x, y: x, iterkwargs={"x": [1, 2], "y": [1]})


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (dict(iterarg=[]), ValueError, "Nothing found to parallelize"),
        (dict(), ValueError, "Nothing found to parallelize"),
        (dict(iterarg=10, ncpus=-3), ValueError, "No CPUs to run on"),
        (dict(iterarg=10, parallelizer="serial-async"), ValueError, "async is only supported"),
        (dict(iterarg=10, start_method="nope"), ValueError, 'Start method "nope" not available'),
        (dict(iterarg=10, parallelizer="thread", capture=True), ValueError, "capture=True"),
        (dict(iterarg=object()), TypeError, "Could not understand iterarg"),
        (dict(iterkwargs="x"), TypeError, "iterkwargs must be a dict of lists"),
        (dict(iterkwargs=[1]), TypeError, "each entry must be a dict"),
        (dict(iterkwargs={"x": 1}), TypeError, "iterkwargs entries must be iterable"),
        (dict(iterarg=2, parallelizer=3), TypeError, "parallelizer must be"),
    ],
)
def test_bad_input_is_refused_before_any_work(call, error, message):
    with pytest.raises(error, match=message):
        parallelize(lambda *a, **k: None, **call)
