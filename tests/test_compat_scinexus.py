"""ShoalParallel makes scinexus' parallel calls and apps run on shoal.

scinexus' own tests/test_parallel.py, run with this backend set, is in
scripts/upstream_compat_tests.sh (it needs the sdist, so it runs by hand).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

import shoal

from compat_helpers import die_on, where

snx_parallel = pytest.importorskip("scinexus.parallel")
composable = pytest.importorskip("scinexus.composable")
ShoalParallel = pytest.importorskip("shoal.compat.scinexus").ShoalParallel


@pytest.fixture(autouse=True)
def shoal_backend():
    snx_parallel.set_parallel_backend(ShoalParallel(workers=2))
    yield
    snx_parallel.set_parallel_backend(None)


def test_map_imap_as_completed_run_in_shoal_workers():
    assert snx_parallel.get_parallel_backend().__class__ is ShoalParallel
    runs = snx_parallel.map(where, list(range(6)))
    assert [x for x, _, _ in runs] == list(range(6))
    assert all(pid != os.getpid() and in_worker for _, pid, in_worker in runs)
    assert list(snx_parallel.imap(where, iter(range(3))))[2][0] == 2
    assert sorted(x for x, _, _ in snx_parallel.as_completed(where, range(5))) == list(range(5))


def test_lambdas_and_closures_work():
    offset = 10
    assert snx_parallel.map(lambda x: x + offset, [1, 2, 3]) == [11, 12, 13]


def test_max_workers_of_a_call_wins_over_the_backends_workers():
    one = snx_parallel.map(where, list(range(8)), max_workers=1)
    assert len({pid for _, pid, _ in one}) == 1
    two = {pid for _, pid, _ in snx_parallel.map(where, list(range(40)))}
    assert 1 <= len(two) <= 2


def test_an_exception_is_raised_at_its_input_as_on_scinexus_backends():
    seen = []
    with pytest.raises(ZeroDivisionError):
        for value in snx_parallel.imap(lambda x: 1 / x, [1, 2, 0, 4], max_workers=1):
            seen.append(value)
    assert seen == [1.0, 0.5]
    with pytest.raises(ZeroDivisionError):
        list(snx_parallel.as_completed(lambda x: 1 / x, [1, 0]))


def test_a_returned_exception_stays_a_value():
    assert isinstance(snx_parallel.map(ValueError, ["x"])[0], ValueError)


def test_a_dead_worker_in_a_plain_function_raises_at_its_input():
    seen = []
    with pytest.raises(shoal.WorkerCrashedError):
        for value in snx_parallel.imap(die_on, [0, 1, 2]):
            seen.append(value)
    assert seen == [0]


def test_a_dead_worker_in_an_app_is_a_not_completed_for_that_input_alone():
    from compat_helpers import crash_on_three

    app = crash_on_three()
    results = list(app.as_completed(list(range(8)), parallel=True))
    failed = [r for r in results if isinstance(r, composable.NotCompleted)]
    done = sorted(r.obj for r in results if not isinstance(r, composable.NotCompleted))
    assert done == [10, 20, 40, 60, 70]  # scinexus drops the 0 result itself, in serial too
    assert len(failed) == 2
    crashed = [r for r in failed if "WorkerCrashedError" in r.message]
    assert len(crashed) == 1 and crashed[0].type is composable.NotCompletedType.ERROR
    assert "exit code 7" in crashed[0].message
    assert any("five" in r.message for r in failed)  # the app's own failure, as ever


def test_the_driver_is_the_master_and_workers_are_not():
    assert snx_parallel.is_master_process()
    assert snx_parallel.get_rank() == 0
    assert snx_parallel.get_size() == 1
    assert not any(snx_parallel.map(_master, list(range(4))))
    assert all(rank > 0 for rank in snx_parallel.map(_rank, list(range(4))))


def _master(_):
    import scinexus.parallel

    return scinexus.parallel.is_master_process()


def _rank(_):
    import scinexus.parallel

    return scinexus.parallel.get_rank()


def test_shoal_options_reach_shoal():
    snx_parallel.set_parallel_backend(ShoalParallel(workers=1, timeout=1))
    with pytest.raises(shoal.TaskTimeoutError):
        list(snx_parallel.imap(_sleep, [0, 5]))


def _sleep(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_empty_input():
    assert snx_parallel.map(abs, []) == []
    assert list(snx_parallel.as_completed(abs, [])) == []


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_below_one(bad):
    with pytest.raises(ValueError, match=rf"max_workers \({bad}\) must be greater than 0"):
        list(snx_parallel.imap(abs, [1], max_workers=bad))
    with pytest.raises(ValueError, match=rf"max_workers \({bad}\)"):
        list(snx_parallel.as_completed(abs, [1], max_workers=bad))


def test_bad_max_workers_and_chunksize():
    with pytest.raises(TypeError, match="max_workers must be an int or None"):
        list(snx_parallel.imap(abs, [1], max_workers=True))
    with pytest.raises(TypeError, match="max_workers must be an int or None"):
        list(snx_parallel.imap(abs, [1], max_workers=2.5))
    with pytest.raises(ValueError, match=r"chunksize \(-1\)"):
        list(snx_parallel.imap(abs, [1], chunksize=-1))
    too_many = multiprocessing.cpu_count() + 1
    with pytest.raises(ValueError, match="must be less than or equal to CPU count"):
        list(snx_parallel.imap(abs, [1], max_workers=too_many))
    assert list(snx_parallel.as_completed(abs, [-1], max_workers=too_many)) == [1]  # clamped


def test_bad_backend_options():
    with pytest.raises(TypeError, match="sets on_error"):
        ShoalParallel(on_error="raise")
    with pytest.raises(ValueError):
        ShoalParallel(workers=0)
