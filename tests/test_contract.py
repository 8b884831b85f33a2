"""The contract every backend keeps: same results, ordering, options and errors."""

from __future__ import annotations

import itertools
import operator

import pytest

import shoal
from shoal import _driver

from helpers import (
    add,
    affine,
    describe,
    exit_on,
    fail_on,
    sleep_then,
    square,
)


def test_map_matches_builtin(backend):
    xs = list(range(2000))
    assert shoal.map(square, xs, backend=backend) == [x * x for x in xs]


def test_map_empty_input(backend):
    assert shoal.map(square, [], backend=backend) == []
    assert list(shoal.imap(square, iter([]), backend=backend)) == []


def test_several_iterables_zip_like_builtin_map(backend):
    assert shoal.map(add, [1, 2, 3], [10, 20], backend=backend) == [11, 22]
    assert shoal.map(pow, range(5), itertools.repeat(2), backend=backend) == [0, 1, 4, 9, 16]


def test_starmap(backend):
    assert shoal.starmap(pow, [(2, 5), (3, 2)], backend=backend) == [32, 9]
    assert shoal.starmap(add, iter([[1, 2], [3, 4]]), backend=backend) == [3, 7]


def test_imap_is_ordered_and_lazy_over_a_generator(backend):
    gen = (x for x in range(500))
    stream = shoal.imap(square, gen, backend=backend)
    assert next(stream) == 0
    assert list(stream) == [x * x for x in range(1, 500)]


def test_imap_over_an_infinite_generator(backend):
    stream = shoal.imap(square, itertools.count(), backend=backend)
    assert list(itertools.islice(stream, 300)) == [x * x for x in range(300)]
    stream.close()


def test_as_completed_yields_every_result(backend):
    got = list(shoal.as_completed(sleep_then, [0.03, 0.0, 0.01], backend=backend, chunksize=1))
    assert sorted(got) == [0.0, 0.01, 0.03]


def test_as_completed_with_index(backend):
    pairs = list(shoal.as_completed(square, range(50), with_index=True, backend=backend))
    assert sorted(pairs) == [(i, i * i) for i in range(50)]


def test_fixed_args_and_kwargs(backend):
    assert shoal.map(affine, [1, 2], args=(10,), kwargs={"b": 1}, backend=backend) == [11, 21]
    assert shoal.map(affine, [1, 2], kwargs={"a": 3}, backend=backend) == [3, 6]


def test_iterkwargs_per_item(backend):
    got = shoal.map(affine, [1, 2, 3], iterkwargs=[{"a": 2}, {"b": 5}, {}], backend=backend)
    assert got == [2, 7, 3]
    # Without positional inputs.
    got = shoal.map(describe, iterkwargs=[{"k": 1}, {"k": 2}], backend=backend)
    assert got == [((), {"k": 1}), ((), {"k": 2})]
    # Per-item keywords override fixed ones of the same name.
    got = shoal.map(affine, [1], kwargs={"a": 5}, iterkwargs=[{"a": 7}], backend=backend)
    assert got == [7]


def test_starmap_with_iterkwargs(backend):
    got = shoal.starmap(describe, [(1, 2)], kwargs={"z": 0}, iterkwargs=[{"k": 3}], backend=backend)
    assert got == [((1, 2), {"k": 3, "z": 0})]


def test_lambdas_and_closures(backend):
    offset = 7
    assert shoal.map(lambda x: x + offset, range(5), backend=backend) == [7, 8, 9, 10, 11]


def test_explicit_chunksize(backend):
    assert shoal.map(square, range(100), chunksize=7, backend=backend) == [
        x * x for x in range(100)
    ]


def test_error_is_reraised_with_cause_and_note(backend):
    with pytest.raises(ValueError, match="bad input 3") as info:
        shoal.map(fail_on, range(10), backend=backend)
    exc = info.value
    assert isinstance(exc.__cause__, shoal.RemoteTraceback)
    assert "fail_on" in str(exc.__cause__)
    assert any("item 3" in note and "fail_on(3)" in note for note in exc.__notes__)


def test_the_first_failing_item_in_input_order_is_raised(backend):
    def fail_small(x):
        if x in (5, 50):
            raise KeyError(x)
        return x

    with pytest.raises(KeyError) as info:
        shoal.map(fail_small, range(100), chunksize=1, backend=backend)
    assert info.value.args == (5,)


def test_on_error_return_keeps_every_other_item(backend):
    got = shoal.map(fail_on, range(6), on_error="return", backend=backend)
    assert got[:3] == [0, 1, 2] and got[4:] == [4, 5]
    assert isinstance(got[3], ValueError)
    assert any("item 3" in n for n in got[3].__notes__)


def test_imap_yields_results_before_the_failure(backend):
    stream = shoal.imap(fail_on, range(10), chunksize=1, backend=backend)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(stream)


def test_sys_exit_in_a_task_is_an_error_of_that_task(backend):
    got = shoal.map(exit_on, range(5), on_error="return", backend=backend)
    assert isinstance(got[3], SystemExit)
    assert [g for i, g in enumerate(got) if i != 3] == [0, 1, 2, 4]
    # The pool still works afterwards.
    assert shoal.map(square, [3], backend=backend) == [9]


def test_pool_is_usable_after_an_error(backend):
    with pytest.raises(ValueError):
        shoal.map(fail_on, range(10), backend=backend)
    assert shoal.map(square, range(10), backend=backend) == [x * x for x in range(10)]


def test_generator_that_raises_midway(backend):
    def gen():
        yield from range(5)
        raise RuntimeError("input broke")

    stream = shoal.imap(square, gen(), chunksize=2, backend=backend)
    got = []
    with pytest.raises(RuntimeError, match="input broke"):
        for r in stream:
            got.append(r)
    assert got == [0, 1, 4, 9, 16], "results already computed are delivered"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"workers": 0}, ValueError),
        ({"workers": -2}, ValueError),
        ({"workers": 1.5}, ValueError),
        ({"workers": "4"}, TypeError),
        ({"workers": True}, TypeError),
        ({"chunksize": 0}, ValueError),
        ({"chunksize": 2.5}, TypeError),
        ({"on_error": "ignore"}, ValueError),
        ({"args": 5}, TypeError),
        ({"kwargs": [1]}, TypeError),
        ({"iterkwargs": {"a": 1}}, TypeError),
    ],
)
def test_bad_options_fail_before_work(backend, kwargs, error):
    calls = []

    def record(x):
        calls.append(x)
        return x

    with pytest.raises(error):
        shoal.map(record, range(3), backend=backend, **kwargs)
    with pytest.raises(error):
        shoal.imap(record, range(3), backend=backend, **kwargs)
    assert calls == []


def test_bad_function_and_inputs(backend):
    with pytest.raises(TypeError, match="callable"):
        shoal.map(42, [1], backend=backend)
    with pytest.raises(TypeError, match=r"argument 2 .* iterable"):
        shoal.map(square, 5, backend=backend)
    with pytest.raises(TypeError, match="at least one iterable"):
        shoal.map(square, backend=backend)
    with pytest.raises(TypeError):
        shoal.map(square, [1], backend=backend, bogus=1)


def test_fractional_workers(backend):
    assert shoal.map(square, range(10), workers=0.5, backend=backend) == [x * x for x in range(10)]


def test_executor_on_every_backend(backend):
    with shoal.Executor(workers=2, backend=backend) as ex:
        fut = ex.submit(affine, 2, a=3, b=1)
        assert fut.result(timeout=30) == 7
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        assert list(ex.starmap(operator.mul, [(2, 3), (4, 5)])) == [6, 20]
        assert sorted(ex.as_completed(square, range(5))) == [0, 1, 4, 9, 16]
        bad = ex.submit(fail_on, 3)
        with pytest.raises(ValueError, match="bad input 3"):
            bad.result(timeout=30)
        assert isinstance(bad.exception().__cause__, shoal.RemoteTraceback)


@pytest.mark.parametrize("rng", [range(0), range(1000), range(5, 500, 7), range(100, -50, -3)])
def test_range_inputs_travel_as_ranges_and_give_the_same_results(backend, rng):
    assert shoal.map(square, rng, backend=backend) == [x * x for x in rng]
    assert list(shoal.imap(square, rng, backend=backend, chunksize=9)) == [x * x for x in rng]
    got = sorted(shoal.as_completed(square, rng, with_index=True, backend=backend))
    assert got == [(i, x * x) for i, x in enumerate(rng)]


def test_range_inputs_keep_errors_and_indices(backend):
    got = shoal.map(fail_on, range(10), kwargs={"bad": 7}, on_error="return", backend=backend)
    assert isinstance(got[7], ValueError) and any("item 7" in n for n in got[7].__notes__)


def test_read_ahead_is_bounded_by_bytes(backend, monkeypatch):
    # Cheap 1 KiB items: the chunk-count bound alone let ~100k of them pile up ahead of the
    # consumer. With a 2 MiB budget, at most a few thousand may be read ahead.
    monkeypatch.setattr(_driver, "READ_AHEAD_BYTES", 2 * 2**20, raising=False)
    read = 0

    def kibibyte_items():
        nonlocal read
        for i in itertools.count():
            read += 1
            yield i.to_bytes(8, "little") * 128  # a new 1 KiB object each time

    consumed = 0
    # Results as large as the items (bytes returns its argument), so every item read ahead
    # holds 1 KiB whether it is in flight or a result not yet consumed: with len, small results
    # may rightly wait by the thousand within the byte budget.
    with shoal.imap(bytes, kibibyte_items(), backend=backend) as stream:
        for value in stream:
            assert len(value) == 1024
            consumed += 1
            ahead = read - consumed
            assert ahead * 1024 <= 2 * 2 * 2**20, f"{ahead} items read ahead of the consumer"
            # Past 4x the budget in items: a missing bound would have read far ahead by now
            # (a whole window of chunks at once). More only costs time on slow backends.
            if consumed == 8_000:
                break
