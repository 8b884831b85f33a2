"""A worker's kept mappings of shared segments: tidied when a call is released.

These run the worker-side functions of ``shoal._shm`` in the test process itself, which plays
the worker: it maps a segment it made, by content key, as a worker maps the driver's.
"""

from __future__ import annotations

import os

import pytest

np = pytest.importorskip("numpy")

from shoal import _native, _shm  # noqa: E402


@pytest.fixture
def kept_mapping():
    """``(key, segment)`` of a 4 MB segment mapped through ``_shm._map`` by content key."""
    data = np.arange(500_000, dtype=np.int64)
    segment = _native.Segment(memoryview(data).cast("B"))
    key = (os.getpid(), segment.size, 12345)
    yield key, segment
    with _shm._reuse_lock:
        _shm._REUSED.pop(key, None)
    segment.close()


def _array(key, segment):
    mapping = _shm._map(key[0], segment.fd, segment.size, content=key[2])
    return np.frombuffer(mapping, dtype=np.int64)


def test_a_released_mapping_is_reverted_then_reused_without_another_check(
    kept_mapping, monkeypatch
):
    key, segment = kept_mapping
    arr = _array(key, segment)
    arr[:1000] = -1  # a task writes into its argument
    del arr
    assert _shm._REUSED[key][2] is False, "handed out: not clean"

    _shm.tidy_reused()  # the call was released

    assert _shm._REUSED[key][2] is True
    # The next call gets the segment's data, without checking its pages again.
    monkeypatch.setattr(_shm, "_revert", lambda *a: pytest.fail("reverted again"))
    again = _array(key, segment)
    assert again[0] == 0 and again[999] == 999
    assert _shm._REUSED[key][2] is False, "handed out again"


def test_a_mapping_an_array_still_uses_is_left_alone(kept_mapping):
    key, segment = kept_mapping
    held = _array(key, segment)
    held[0] = -7
    _shm.tidy_reused()
    assert _shm._REUSED[key][2] is False
    assert held[0] == -7, "an array kept past its call keeps what it wrote"
    del held


def test_a_mapping_that_was_not_tidied_is_checked_when_reused(kept_mapping):
    key, segment = kept_mapping
    arr = _array(key, segment)
    arr[5] = -1
    del arr
    again = _array(key, segment)  # no release in between: reverted on reuse
    assert again[5] == 5
