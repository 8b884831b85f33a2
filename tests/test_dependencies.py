"""Futures as arguments of Executor.submit, the dependency graph, and shoal.batched."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import threading
import warnings
import weakref

import pytest

import shoal

from helpers import (
    Holder,
    add,
    describe,
    fail_on,
    make_payload,
    mark_after,
    sleep_then,
    square,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


def payload_x(p, *_):
    return p.x


def draw(*_):
    import random

    return random.random()


def ran(marker_dir, *_):
    """Leaves a marker if it runs at all."""
    with open(os.path.join(marker_dir, "ran"), "w"):
        pass


# -- results flow into dependants -----------------------------------------------------------


def test_results_replace_futures_at_any_depth(backend):
    with shoal.Executor(2, backend=backend) as ex:
        a, b = ex.submit(square, 3), ex.submit(square, 4)
        c = ex.submit(add, a, y=b)
        outer = [a, (b, {"k": c, "same": a}), "plain", 7]
        d = ex.submit(describe, outer, key={"x": [a]}, n=5)
        assert c.result(timeout=30) == 25
        assert d.result(timeout=30) == (
            ([9, (16, {"k": 25, "same": 9}), "plain", 7],),
            {"key": {"x": [9]}, "n": 5},
        )
        # The caller's own containers are left as they were.
        assert outer[0] is a and outer[1][1]["k"] is c


def test_a_dependant_starts_only_when_its_futures_are_done(backend):
    gate = cf.Future()
    with shoal.Executor(2, backend=backend) as ex:
        first = ex.submit(square, 5)
        dependant = ex.submit(add, first, gate)
        assert first.result(timeout=30) == 25
        # Its other argument does not exist yet: it cannot have run, whatever the timing.
        assert not dependant.done()
        gate.set_result(17)
        assert dependant.result(timeout=30) == 42


def test_futures_of_other_executors_are_dependencies(backend):
    with (
        cf.ThreadPoolExecutor(1) as threads,
        shoal.Executor(1, backend="threads") as other,
        shoal.Executor(2, backend=backend) as ex,
    ):
        a = threads.submit(square, 2)
        b = other.submit(square, 3)
        c = ex.submit(add, a, b)
        assert c.result(timeout=30) == 13


# -- failures and cancellations -------------------------------------------------------------


def test_a_failed_dependency_fails_its_dependants_without_running_them(backend, tmp_path):
    with shoal.Executor(2, backend=backend) as ex:
        bad = ex.submit(fail_on, 3)
        direct = ex.submit(ran, str(tmp_path), bad)
        chained = ex.submit(ran, str(tmp_path), direct)
        with pytest.raises(shoal.DependencyError) as info:
            direct.result(timeout=30)
        err = info.value
        assert isinstance(err.__cause__, ValueError) and "bad input 3" in str(err.__cause__)
        assert err.__cause__ is bad.exception()
        assert err.task_id == direct.task_id
        assert f"task {bad.task_id}" in str(err) and "ValueError: bad input 3" in str(err)
        # Down a chain, the cause is still the first error, and the message names it.
        with pytest.raises(shoal.DependencyError) as info:
            chained.result(timeout=30)
        assert info.value.__cause__ is bad.exception()
        assert f"task {direct.task_id}" in str(info.value)
        assert "ValueError: bad input 3" in str(info.value)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("end", ["fails", "is cancelled"])
def test_a_long_chain_fails_whole_without_recursing(backend, end):
    # Each failure settles the next dependant from a callback: done by recursion, a chain of
    # a few thousand would hit the recursion limit and leave the rest waiting.
    root = cf.Future()
    with shoal.Executor(1, backend=backend) as ex:
        chain = [ex.submit(add, root, 1)]
        for _ in range(2000):
            chain.append(ex.submit(add, chain[-1], 1))
        if end == "fails":
            root.set_exception(KeyError("root"))
        else:
            assert chain[0].cancel()
            chain = chain[1:]
        errors = [f.exception(timeout=30) for f in chain]
    assert all(isinstance(e, shoal.DependencyError) for e in errors)
    cause = KeyError if end == "fails" else cf.CancelledError
    assert all(type(e.__cause__) is cause for e in errors)
    assert str(errors[-1]).count("was not run") == 2  # the message names the first failure


def test_dependency_error_is_a_shoal_error_and_pickles():
    err = shoal.DependencyError(4, "f", "task 2", "failed with ValueError: x")
    assert isinstance(err, shoal.ShoalError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is shoal.DependencyError and str(again) == str(err)
    assert "DependencyError" in shoal.__all__ and "batched" in shoal.__all__


def test_a_cancelled_dependency_gives_a_cancelled_error_as_cause(backend, tmp_path):
    outside = cf.Future()
    with shoal.Executor(1, backend=backend) as ex:
        dependant = ex.submit(ran, str(tmp_path), outside)
        assert outside.cancel()
        with pytest.raises(shoal.DependencyError) as info:
            dependant.result(timeout=30)
        assert isinstance(info.value.__cause__, cf.CancelledError)
        assert "was cancelled" in str(info.value)
    assert not (tmp_path / "ran").exists()


def test_a_waiting_dependant_can_be_cancelled(backend, tmp_path):
    gate = cf.Future()
    with shoal.Executor(1, backend=backend) as ex:
        waiting = ex.submit(ran, str(tmp_path), gate)
        behind = ex.submit(ran, str(tmp_path), waiting)
        assert waiting.cancel() is True
        assert waiting.cancelled()
        with pytest.raises(shoal.DependencyError) as info:
            behind.result(timeout=30)
        assert isinstance(info.value.__cause__, cf.CancelledError)
        gate.set_result(1)  # too late: the cancelled task never runs
    assert not (tmp_path / "ran").exists()


def test_a_started_dependant_cannot_be_cancelled(tmp_path):
    with shoal.Executor(1, backend="threads") as ex:
        first = ex.submit(square, 2)
        running = ex.submit(mark_after, first, str(tmp_path), 1.0)
        assert wait_until(lambda: (tmp_path / "start-4").exists(), 30)
        assert running.cancel() is False
        assert running.result(timeout=30) == 4


def test_an_argument_that_cannot_be_pickled_fails_the_dependant():
    with shoal.Executor(1, backend="processes") as ex:
        a = ex.submit(square, 2)
        dependant = ex.submit(add, a, threading.Lock())
        with pytest.raises(shoal.PicklingError):
            dependant.result(timeout=30)
        assert ex.submit(add, a, 1).result(timeout=30) == 5


def test_submit_with_a_future_after_shutdown_is_refused():
    ex = shoal.Executor(1, backend="threads")
    a = ex.submit(square, 2)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, a, 1)


# -- shutdown -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shutdown_cancels_dependants_of_a_never_set_future_with_a_reason(backend, tmp_path):
    never = cf.Future()
    ex = shoal.Executor(2, backend=backend)
    ok = ex.submit(square, 3)
    stuck = ex.submit(ran, str(tmp_path), never)
    behind = ex.submit(ran, str(tmp_path), stuck)
    with pytest.warns(RuntimeWarning, match="can never complete") as record:
        ex.shutdown(wait=True)
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert ok.result() == 9
    assert stuck.cancelled() and behind.cancelled()
    with pytest.raises(cf.CancelledError, match=r"shutdown.*pending with nothing running"):
        stuck.result()
    with pytest.raises(cf.CancelledError, match=f"waits on task {stuck.task_id}"):
        behind.result()
    text = str(record[0].message)
    assert f"task {stuck.task_id} (ran)" in text and repr(never) in text
    never.set_result(1)  # nothing is left to run it
    assert not (tmp_path / "ran").exists()


@pytest.mark.timeout(60)
def test_leaving_a_with_block_does_not_hang_on_an_outside_future(backend):
    never = cf.Future()
    with (
        pytest.warns(RuntimeWarning, match="can never complete") as record,
        shoal.Executor(1, backend=backend) as ex,
    ):
        stuck = ex.submit(add, never, 1)
    assert record[0].filename == __file__
    assert stuck.cancelled()


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_still_cancels_them_and_warns(backend):
    never = cf.Future()
    with pytest.warns(RuntimeWarning, match="can never complete"):
        ex = shoal.Executor(1, backend=backend)
        stuck = ex.submit(add, never, 1)
        ex.shutdown(wait=False)
        assert wait_until(stuck.cancelled, 30)  # by the executor's own thread, meanwhile
    with pytest.raises(cf.CancelledError, match="pending with nothing running"):
        stuck.result()


@pytest.mark.timeout(60)
def test_shutdown_waits_for_an_outside_future_that_is_running(backend):
    release = threading.Event()
    with cf.ThreadPoolExecutor(1) as threads:
        outside = threads.submit(lambda: release.wait(30) and 20)
        assert wait_until(outside.running, 10)
        ex = shoal.Executor(1, backend=backend)
        dependant = ex.submit(add, outside, 1)
        threading.Timer(0.3, release.set).start()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ex.shutdown(wait=True)
        assert dependant.result(timeout=1) == 21


@pytest.mark.timeout(60)
def test_shutdown_follows_dependants_of_another_executor(backend):
    never = cf.Future()
    first = shoal.Executor(1, backend="threads")
    running = first.submit(sleep_then, 1, 0.3)
    moving = first.submit(add, running, 1)  # waits in `first` for a task that is running
    stuck = first.submit(add, never, 1)  # waits in `first` for a future nobody sets
    ex = shoal.Executor(1, backend=backend)
    fine = ex.submit(add, moving, 1)
    blocked = ex.submit(add, stuck, 1)
    with pytest.warns(RuntimeWarning, match="can never complete") as record:
        ex.shutdown(wait=True)
    assert fine.result(timeout=1) == 3  # waited for, through the other executor's dependant
    assert blocked.cancelled()
    assert "task 2 of another Executor, which can never start either" in str(record[0].message)
    with pytest.warns(RuntimeWarning, match="can never complete"):
        first.shutdown(wait=True)
    assert stuck.cancelled()


def test_shutdown_cancel_futures_cancels_waiting_dependants(backend, tmp_path):
    gate = cf.Future()
    ex = shoal.Executor(1, backend=backend)
    waiting = ex.submit(ran, str(tmp_path), gate)
    ex.shutdown(wait=True, cancel_futures=True)
    assert waiting.cancelled()
    gate.set_result(1)
    assert not (tmp_path / "ran").exists()


# -- what the executor keeps ----------------------------------------------------------------


def test_a_dependencys_result_is_kept_only_while_a_dependant_waits(backend):
    gate = cf.Future()
    with shoal.Executor(1, backend=backend) as ex:
        source = ex.submit(make_payload, 7)
        watch = weakref.ref(source.result(timeout=30))
        first = ex.submit(payload_x, source)
        later = ex.submit(payload_x, source, gate)
        assert first.result(timeout=30) == 7
        del source
        gc.collect()
        assert watch() is not None, "a dependant still waiting needs the result"
        gate.set_result(None)
        assert later.result(timeout=30) == 7
        assert wait_until(lambda: gc.collect() >= 0 and watch() is None, 5), (
            "the executor keeps a dependency's result after its dependants started"
        )


def test_a_dependant_that_never_runs_does_not_keep_its_function(backend):
    gate = cf.Future()
    with shoal.Executor(1, backend=backend) as ex:
        holder = Holder(b"x" * 100)
        watch = weakref.ref(holder)
        waiting = ex.submit(holder.size, gate)
        del holder
        gate.cancel()
        with pytest.raises(shoal.DependencyError):
            waiting.result(timeout=30)
        assert wait_until(lambda: gc.collect() >= 0 and watch() is None, 5), (
            "the executor keeps the function of a dependant that will never run"
        )


# -- ids, graph, seeds ----------------------------------------------------------------------


def test_task_ids_and_the_dependency_graph(backend):
    outside = cf.Future()
    outside.set_result(2)
    with shoal.Executor(2, backend=backend) as ex:
        a = ex.submit(square, 2)
        b = ex.submit(add, a, outside)
        c = ex.submit(describe, [b, a], x={"again": b})
        d = ex.submit(add, outside, outside)
        assert [f.task_id for f in (a, b, c, d)] == [0, 1, 2, 3]
        assert c.result(timeout=30)[0] == ([6, 4],)
        assert d.result(timeout=30) == 4
        graph = ex.dependency_graph()
    assert graph == {0: [], 1: [0, -1], 2: [1, 0], 3: [-1], -1: []}


def test_seeded_dependants_draw_by_submission_order(backend):
    reference = shoal.map(draw, range(4), seed=11, backend="serial")
    gate = cf.Future()
    with shoal.Executor(2, backend=backend, seed=11) as ex:
        late = ex.submit(draw, gate)  # task 0, but it runs last
        rest = [ex.submit(draw, i) for i in (1, 2, 3)]
        assert [f.result(timeout=30) for f in rest] == reference[1:]
        gate.set_result(None)
        assert late.result(timeout=30) == reference[0]


# -- batched --------------------------------------------------------------------------------


def test_batched_yields_lists_of_n_results(backend):
    with shoal.Executor(2, backend=backend) as ex:
        futures = [ex.submit(square, i) for i in range(7)]
        batches = list(shoal.batched(futures, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(r for b in batches for r in b) == [i * i for i in range(7)]


def test_batched_follows_completion_order():
    futures = [cf.Future() for _ in range(4)]
    batches = shoal.batched(futures, 2)
    futures[3].set_result("d")
    futures[1].set_result("b")
    assert sorted(next(batches)) == ["b", "d"]
    futures[2].set_result("c")
    futures[0].set_result("a")
    assert sorted(next(batches)) == ["a", "c"]
    with pytest.raises(StopIteration):
        next(batches)


def test_batched_raises_a_failed_futures_error():
    good, bad = cf.Future(), cf.Future()
    good.set_result(1)
    bad.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        list(shoal.batched([good, bad], 1))


@pytest.mark.parametrize("n", [0, -1])
def test_batched_refuses_n_below_one_at_the_call(n):
    with pytest.raises(ValueError, match="n >= 1"):
        shoal.batched([], n)  # no next(): the error comes at the call


@pytest.mark.parametrize("bad", [1.5, "2", True])
def test_batched_refuses_a_non_int_n(bad):
    with pytest.raises(TypeError, match="int n"):
        shoal.batched([], bad)


def test_batched_refuses_what_is_not_a_future():
    with pytest.raises(TypeError, match="Future"):
        shoal.batched([1, 2], 1)
