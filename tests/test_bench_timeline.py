"""bench/timeline.py: the idle share of the workers' time, from item timestamps."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

import timeline


def test_idle_shares_split_the_idle_time_into_its_parts():
    # Two workers over a call of 10 s: worker 1 busy 1-4 and 5-9, worker 2 busy 0-10.
    spans = [(1.0, 4.0, 1), (5.0, 9.0, 1), (0.0, 10.0, 2)]
    got = timeline.idle_shares(spans, 0.0, 10.0, workers=2)
    assert got["first"] == pytest.approx(1 / 20)
    assert got["gaps"] == pytest.approx(1 / 20)
    assert got["last"] == pytest.approx(1 / 20)
    assert got["idle"] == pytest.approx(3 / 20)


def test_a_worker_that_got_no_item_idled_all_the_call():
    got = timeline.idle_shares([(0.0, 4.0, 7)], 0.0, 4.0, workers=2)
    assert got["idle"] == pytest.approx(0.5)
    assert got["first"] == pytest.approx(0.5)
    assert got["gaps"] == got["last"] == 0.0
