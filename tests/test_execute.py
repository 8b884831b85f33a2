"""shoal._execute: running a slice of a chunk, as a worker's reporting loop does."""

from __future__ import annotations

import pytest

from shoal._execute import _run_items
from shoal._spec import MODE_SINGLE, CallSpec


@pytest.mark.parametrize("kind", [list, tuple, lambda r: r], ids=["list", "tuple", "range"])
@pytest.mark.parametrize(
    ("lo", "hi"), [(0, None), (0, 3), (2, None), (2, 5), (4, 6), (9, None), (3, 3), (7, 20)]
)
def test_a_slice_runs_exactly_its_items(kind, lo, hi):
    seen: list[int] = []

    def record(x: int) -> int:
        seen.append(x)
        return x * 10

    items = kind(range(10))
    values, errors = _run_items(CallSpec(record, MODE_SINGLE), items, 0, None, lo, hi)
    expected = list(range(10))[lo:hi]
    assert seen == expected
    assert values == [x * 10 for x in expected]
    assert errors == []


def test_an_error_in_a_middle_slice_keeps_its_offset_and_the_slice_goes_on():
    def fail_on_4(x: int) -> int:
        if x == 4:
            raise ValueError("four")
        return x

    spec = CallSpec(fail_on_4, MODE_SINGLE, stop_on_error=False)
    values, errors = _run_items(spec, list(range(10)), 0, None, 2, 7)
    assert values == [2, 3, None, 5, 6]
    assert [(e.offset, str(e.exc)) for e in errors] == [(2, "four")]
