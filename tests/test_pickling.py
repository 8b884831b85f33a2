"""What travels by value: anything defined in ``__main__`` or in a module made at run time."""

from __future__ import annotations

import pickle
import sys
import types

import pytest

import shoal
from shoal import _pickling

from helpers import run_script

MAIN_SCRIPT = """
import shoal

class Box:
    def __init__(self, v):
        self.v = v
    def __eq__(self, other):
        return type(other) is Box and other.v == self.v
    def __repr__(self):
        return f"Box({self.v})"

def unbox(b, extra=None):
    return b.v + (extra.v if extra is not None else 0)

def rebox(x):
    return Box(x * 2)

def from_shared(x):
    return shoal.shared().v + x

def init(b):
    shoal.worker_state()["b"] = b

def from_state(x):
    return shoal.worker_state()["b"].v + x

if __name__ == "__main__":
    backend = "BACKEND"
    print(shoal.map(unbox, [Box(0), Box(1)], backend=backend))
    print(shoal.map(unbox, [Box(0), Box(1)], args=(Box(10),), backend=backend))
    print(shoal.map(unbox, [Box(0)], kwargs={"extra": Box(5)}, backend=backend))
    r = shoal.map(rebox, [1, 2], backend=backend)
    print(r, all(type(b) is Box for b in r))
    print(list(shoal.imap(unbox, iter([Box(4)]), backend=backend)))
    print(shoal.map(from_shared, [1, 2], shared=Box(100), backend=backend))
    print(shoal.map(from_state, [1, 2], initializer=init, initargs=(Box(7),), backend=backend))
    with shoal.Executor(2, backend=backend) as ex:
        print(ex.submit(unbox, Box(3)).result(), ex.submit(rebox, 3).result() == Box(6))
        print(list(ex.map(unbox, [Box(1), Box(2)])))
"""

EXPECTED = [
    "[0, 1]",
    "[10, 11]",
    "[5]",
    "[Box(2), Box(4)] True",
    "[4]",
    "[101, 102]",
    "[8, 9]",
    "3 True",
    "[1, 2]",
]


@pytest.mark.parametrize("backend", ["processes", "threads", "serial"])
def test_instances_of_main_classes_travel_by_value_everywhere(backend):
    out = run_script(MAIN_SCRIPT.replace("BACKEND", backend))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == EXPECTED


def test_plain_data_keeps_the_standard_pickle():
    blob = _pickling.dumps([1, 2.5, "main", b"__main__", {"k": (1, None)}])
    assert not _pickling.needs_by_value(blob)
    assert blob == pickle.dumps([1, 2.5, "main", b"__main__", {"k": (1, None)}], 5)


def test_a_reference_to_main_is_detected():
    class Local:
        pass

    Local.__module__ = "__main__"
    Local.__qualname__ = "Local"
    sys.modules["__main__"].Local = Local  # so that the standard pickler accepts it
    try:
        assert _pickling.needs_by_value(pickle.dumps(Local(), 5))
        assert not _pickling.needs_by_value(pickle.dumps(shoal.ShoalError("x"), 5))
    finally:
        del sys.modules["__main__"].Local


def test_classes_of_a_module_made_at_run_time_travel_by_value():
    mod = types.ModuleType("shoal_test_dynamic_mod")
    exec(
        "class Thing:\n    def __init__(self, v):\n        self.v = v\n",
        mod.__dict__,
    )
    sys.modules[mod.__name__] = mod
    try:
        things = [mod.Thing(i) for i in range(4)]
        assert shoal.map(_value_of, things, workers=2) == [0, 1, 2, 3]
    finally:
        del sys.modules[mod.__name__]


def _value_of(thing):
    return thing.v


def test_a_module_found_only_on_a_path_added_after_the_pool_started(tmp_path):
    out = run_script(
        f"""
        import sys
        import shoal

        print(shoal.map(abs, [-1], workers=1))  # the worker starts with the old sys.path
        sys.path.insert(0, {str(tmp_path)!r})
        with open({str(tmp_path / "late_mod.py")!r}, "w") as f:
            f.write("def triple(x):\\n    return 3 * x\\n")
        import late_mod

        print(shoal.map(late_mod.triple, [1, 2], workers=1))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[1]", "[3, 6]"]


def _identity(x):
    return x


def _type_and_value(x):
    return type(x).__name__, x


def test_plain_lists_round_trip_exactly_through_workers():
    import enum
    import math

    class Colour(enum.IntEnum):
        RED = 1

    values = [
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64,  # beyond 64 bits: pickled
        1.5,
        -0.0,
        math.inf,
        True,
        False,
        None,
        "",
        "héllo ✓",
        "\ud800",  # a lone surrogate is not UTF-8: pickled
        b"",
        b"\x00\xff",
        Colour.RED,  # a subclass of int keeps its type
    ]
    got = shoal.map(_type_and_value, values, workers=2, chunksize=len(values))
    assert got == [(type(v).__name__, v) for v in values]
    nan = shoal.map(_identity, [math.nan], workers=1)[0]
    assert math.isnan(nan)
    # Homogeneous lists take the packed-array layout both ways.
    ints = list(range(-5, 5000))
    floats = [i / 7 for i in range(3000)]
    assert shoal.map(_identity, ints, workers=2) == ints
    assert shoal.map(_identity, floats, workers=2) == floats
    assert shoal.map(_identity, tuple(ints), workers=2) == ints


def test_the_plain_encoding_refuses_what_it_cannot_hold():
    from shoal import _native

    assert _native.pack_plain(0, [1, 2**70]) is None
    assert _native.pack_plain(0, [1, [2]]) is None
    assert _native.pack_plain(0, [1.0, 2]) is not None  # mixed: the tagged layout
    for values in ([], [1, -2], [0.5], [None, "a", b"b", True, 3, 4.0]):
        packed = _native.pack_plain(7, values)
        assert _native.unpack_plain(packed) == (7, values)
        assert [type(v) for v in _native.unpack_plain(packed)[1]] == [type(v) for v in values]
    with pytest.raises(Exception, match=r"truncated|wrong length"):
        _native.unpack_plain(_native.pack_plain(0, [1, 2])[:-3])


def test_the_plain_encoding_packs_a_range_of_a_list_as_its_slice():
    from shoal import _native

    for values in (list(range(-3, 40)), [i / 3 for i in range(40)], ["a", 1, None] * 13):
        for lo, hi in ((0, None), (5, 17), (17, 17), (30, 99), (45, 50)):
            expect = values[lo:hi]
            packed = _native.pack_plain(lo, values, lo, hi)
            assert packed == _native.pack_plain(lo, expect), (lo, hi)
            assert _native.unpack_plain(packed) == (lo, expect)
    # A value that needs pickle anywhere in the range refuses the whole range, not outside it.
    mixed = [1, 2, [3], 4]
    assert _native.pack_plain(0, mixed, 0, 3) is None
    assert _native.pack_plain(3, mixed, 3, 4) is not None


def test_blake2b_many_is_hashlibs_keyed_blake2b():
    import hashlib
    import random

    from shoal import _native

    rng = random.Random(7)
    messages = [rng.randbytes(rng.randrange(0, 400)) for _ in range(300)] + [b"", b"\x00" * 128]
    for key, size in ((rng.randbytes(32), 16), (b"", 64), (rng.randbytes(64), 1)):
        expected = [hashlib.blake2b(m, digest_size=size, key=key).digest() for m in messages]
        assert _native.blake2b_many(key, size, messages) == expected
    with pytest.raises(ValueError, match="digest_size"):
        _native.blake2b_many(b"k" * 65, 16, [b"x"])
    with pytest.raises(TypeError):
        _native.blake2b_many(b"k", 16, ["not bytes"])


def test_pickle_plain_round_trips_and_refuses_what_it_cannot_hold():
    import math
    import pickle

    from shoal import _native

    values = [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, 2**63 - 1, -(2**63),
              0.0, -0.0, 1.5, math.inf, math.nan, None, True, False, "", "é" * 255, "z" * 70_000,
              b"", b"q" * 300]  # fmt: skip
    out = _native.pickle_plain(values)
    assert out is not None and all(type(o) is bytearray for o in out)
    for value, data in zip(values, out, strict=True):
        back = pickle.loads(data)
        assert type(back) is type(value)
        assert repr(back) == repr(value)  # -0.0 and nan included
    assert _native.pickle_plain(()) == []

    class Sub(int):
        pass

    for bad in (2**63, 1j, "\ud800", Sub(1), (1,), [1]):
        assert _native.pickle_plain([1, bad]) is None
