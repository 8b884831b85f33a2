"""store=: resume, identity, failures, provenance, capture, locking, durability, bad input.

Crash, Ctrl-C, disk-full and concurrency tests run the writer in a subprocess (with a hard
``timeout=``) and check the file it leaves from here.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from store_funcs import (
    big_array,
    counted,
    draw,
    echo,
    echo_pair,
    fails_when_flagged,
    noisy,
    other,
    slow,
    triple,
    unpicklable,
)

import shoal
from shoal._spec import MODE_SINGLE, MODE_STAR
from shoal.store import _db

HERE = os.path.dirname(os.path.abspath(__file__))


def _calls(log) -> list[int]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [int(line) for line in f]


def _integrity(path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _script(body: str, path) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {HERE!r})\n" + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_done(path, count: int, proc: subprocess.Popen, limit: float = 60) -> None:
    """Until the store holds ``count`` committed results (read as another process would)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                with shoal.Store(path) as st:
                    if st.summary()["done"] >= count:
                        return
            except shoal.StoreError:
                pass
        time.sleep(0.05)
    raise AssertionError("the writer did not commit in time")


# -- resume and identity -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["processes", "threads", "serial"])
def test_rerun_runs_only_missing_items_and_returns_the_same_list(tmp_path, backend):
    path, log = tmp_path / "s.sqlite", tmp_path / "calls"
    first = shoal.map(counted, range(20), args=(str(log),), store=path, backend=backend)
    assert first == list(range(1, 21))
    assert sorted(_calls(log)) == list(range(20))
    log.unlink()
    again = shoal.map(counted, range(25), args=(str(log),), store=path, backend=backend)
    assert again == list(range(1, 26))
    assert sorted(_calls(log)) == list(range(20, 25))  # only the new inputs ran


def test_failed_items_rerun_by_default_and_kept_with_rerun_failed_false(tmp_path):
    path, flag = tmp_path / "s.sqlite", tmp_path / "flag"
    flag.touch()
    out = shoal.map(fails_when_flagged, range(8), kwargs={"flag": str(flag)}, store=path,
                    on_error="return")  # fmt: skip
    assert [type(v) for v in out].count(ValueError) == 2
    with shoal.Store(path) as st:
        failures = dict(st.failures())
        assert sorted(failures) == [3, 5]
        assert isinstance(failures[3], ValueError) and "flagged 3" in str(failures[3])
        assert "fails_when_flagged" in failures[3].__cause__.tb  # the remote traceback
        item = next(i for i in st.items() if i["index"] == 3)
        assert item["status"] == "failed" and item["error"]["type"] == "ValueError"
        assert item["attempts"] == 1
    kept = shoal.map(fails_when_flagged, range(8), kwargs={"flag": str(flag)}, store=path,
                     on_error="return", rerun_failed=False)  # fmt: skip
    assert isinstance(kept[3], ValueError) and kept[4] == 40
    flag.unlink()
    fixed = shoal.map(fails_when_flagged, range(8), kwargs={"flag": str(flag)}, store=path)
    assert fixed == [x * 10 for x in range(8)]
    with shoal.Store(path) as st:
        assert st.summary()["failed"] == 0 and st.summary()["done"] == 8


@pytest.mark.parametrize("api", ["imap", "map"])
def test_scattered_stored_items_come_back_in_place(tmp_path, api):
    path, log = tmp_path / "s.sqlite", tmp_path / "calls"
    shoal.map(counted, range(0, 40, 3), args=(str(log),), store=path, chunksize=2)
    log.unlink()
    run = shoal.imap if api == "imap" else shoal.map
    out = list(run(counted, range(40), args=(str(log),), store=path, chunksize=2))
    assert out == list(range(1, 41))
    assert sorted(_calls(log)) == [x for x in range(40) if x % 3]


def test_stored_identities_are_the_documented_hash(tmp_path):
    """Identities hashed in bulk (native BLAKE2b) are those of _codec.item_key (hashlib), so a
    store written by any shoal version resumes with any other."""
    from shoal.store import _codec

    cases = [
        ("single", [*range(-300, 3000, 7), "a", "é" * 300, b"x", None, 2**70, (1, "b")]),
        ("star", [(i, str(i)) for i in range(500)]),
    ]
    for name, items in cases:
        path = tmp_path / f"{name}.sqlite"
        if name == "star":
            shoal.starmap(echo_pair, items, store=path, args=(1,))
            mode, args = MODE_STAR, (1,)
        else:
            shoal.map(echo, items, store=path)
            mode, args = MODE_SINGLE, ()
        fn = echo_pair if name == "star" else echo
        call_key = _codec.call_key(fn, mode, args, {}, None)
        conn = sqlite3.connect(path)
        stored = dict(conn.execute("SELECT idx, key FROM shoal_items"))
        conn.close()
        assert [stored[i] for i in range(len(items))] == [
            _codec.item_key(call_key, mode, item) for item in items
        ]


def test_results_of_every_kind_round_trip_through_the_store(tmp_path):
    import math

    import numpy as np

    class Sub(int):
        pass

    values = [0, -1, 2**63 - 1, -(2**63), 2**64, 1.5, -0.0, math.inf, math.nan, True, None,
              "", "x" * 300, "\ud800", b"", b"y" * 300, 1j, Sub(3), (1, 2), [3], {"a": 4},
              np.arange(3)]  # fmt: skip
    path = tmp_path / "s.sqlite"
    # The threads backend hands back the very objects: a local class is fine.
    out = shoal.map(echo, values, store=path, backend="threads")
    again = shoal.map(echo, values, store=path, backend="threads")
    with shoal.Store(path) as st:
        stored = [v for _, v in st.results()]
    for got in (out, again, stored):
        assert len(got) == len(values)
        for a, b in zip(values, got, strict=True):
            assert type(a) is type(b), (a, b)
            if isinstance(a, float) and math.isnan(a):
                assert math.isnan(b)
            elif isinstance(a, np.ndarray):
                assert (a == b).all()
            else:
                assert a == b and repr(a) == repr(b)


def test_a_resume_with_done_failed_new_and_repeated_items_in_bulk(tmp_path):
    """Thousands of items, some done, some failed, some new and some repeated: each runs or is
    read back as in an uninterrupted run, through the bulk paths of the recorder."""
    path, flag = tmp_path / "s.sqlite", tmp_path / "flag"
    flag.touch()
    bad = tuple(range(0, 3000, 97))
    first = list(range(0, 3000, 2))
    out = shoal.map(fails_when_flagged, first, kwargs={"flag": str(flag), "bad": bad},
                    store=path, on_error="return")  # fmt: skip
    assert sum(isinstance(v, ValueError) for v in out) == len([b for b in bad if b % 2 == 0])
    flag.unlink()
    items = list(range(3000)) + list(range(0, 3000, 5))  # repeats at the end
    got = shoal.map(fails_when_flagged, items, kwargs={"flag": str(flag), "bad": bad},
                    store=path)  # fmt: skip
    assert got == [x * 10 for x in items]
    with shoal.Store(path) as st:
        summary = st.summary()
        assert summary["done"] == 3000 and summary["failed"] == 0
        assert sorted(v for _, v in st.results()) == [x * 10 for x in range(3000)]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM shoal_items").fetchone() == (
        3000,
        3000,
    )
    conn.close()


def test_a_kept_failure_raises_in_input_order(tmp_path):
    path, flag = tmp_path / "s.sqlite", tmp_path / "flag"
    flag.touch()
    kw = {"flag": str(flag), "bad": (5,)}
    shoal.map(fails_when_flagged, [5], kwargs=kw, store=path, on_error="return")
    flag.unlink()
    with pytest.raises(ValueError, match="flagged 5"):
        shoal.map(fails_when_flagged, range(8), kwargs=kw, store=path, rerun_failed=False)
    with shoal.Store(path) as st:  # the items before it ran and were stored
        assert [k for k, _ in st.results()] == [0, 1, 2, 3, 4]


def test_changed_fixed_arguments_partial_and_seed_rerun_items(tmp_path):
    path, log = tmp_path / "s.sqlite", tmp_path / "calls"
    shoal.map(counted, range(3), args=(str(log),), store=path, backend="threads")
    n = len(_calls(log))
    part = functools.partial(counted, log=str(log))
    assert shoal.map(part, range(3), store=path, backend="threads") == [1, 2, 3]
    assert len(_calls(log)) == n + 3  # a partial's arguments are part of the identity
    shoal.map(part, range(3), store=path, backend="threads")
    assert len(_calls(log)) == n + 3
    shoal.map(part, range(3), store=path, backend="threads", seed=1)
    assert len(_calls(log)) == n + 6


def test_a_store_belongs_to_one_function(tmp_path):
    path = tmp_path / "s.sqlite"
    shoal.map(triple, [1], store=path, backend="serial")
    with pytest.raises(shoal.StoreError) as info:
        shoal.map(other, [1], store=path, backend="serial")
    assert "store_funcs:triple" in str(info.value) and "store_funcs:other" in str(info.value)


def test_seeded_resume_matches_an_uninterrupted_run(tmp_path):
    whole = shoal.map(draw, range(30), seed=7, workers=2)
    path = tmp_path / "s.sqlite"
    part = shoal.map(draw, range(0, 30, 3), seed=7, store=path)  # different indices: other ids
    assert len(part) == 10
    first = shoal.map(draw, [*range(12)], seed=7, store=tmp_path / "t.sqlite")
    rest = shoal.map(draw, range(30), seed=7, store=tmp_path / "t.sqlite", workers=2)
    assert first == whole[:12] and rest == whole


def test_key_names_items_and_duplicates_raise(tmp_path):
    path = tmp_path / "s.sqlite"
    out = shoal.map(triple, [1, 2, 3], store=path, key=lambda x: f"f{x}.dat", backend="threads")
    assert out == [3, 6, 9]
    with shoal.Store(path) as st:
        assert list(st.results()) == [("f1.dat", 3), ("f2.dat", 6), ("f3.dat", 9)]
    with pytest.raises(ValueError, match=r"f1\.dat"):
        shoal.map(triple, [1, 4, 1], store=tmp_path / "t.sqlite", key=lambda x: f"f{x}.dat")
    with pytest.raises(TypeError, match="key"):
        shoal.map(triple, [1], store=tmp_path / "u.sqlite", key=lambda x: 1.5)


def test_items_of_the_same_identity_run_once_and_share_the_result(tmp_path):
    log = tmp_path / "calls"
    out = shoal.map(counted, [1, 2, 1, 1, 2, 3], args=(str(log),), store=tmp_path / "s.sqlite")
    assert out == [2, 3, 2, 2, 3, 4]
    assert sorted(_calls(log)) == [1, 2, 3]


def test_on_error_raise_stores_results_before_the_failure_and_the_failure(tmp_path):
    path, flag = tmp_path / "s.sqlite", tmp_path / "flag"
    flag.touch()
    with pytest.raises(ValueError, match="flagged 3"):
        shoal.map(fails_when_flagged, range(6), kwargs={"flag": str(flag), "bad": (3,)},
                  store=path, backend="serial")  # fmt: skip
    with shoal.Store(path) as st:
        assert list(st.results()) == [(0, 0), (1, 10), (2, 20)]
        assert [k for k, _ in st.failures()] == [3]
        assert st.runs()[-1]["status"] == "failed"


@pytest.mark.parametrize("api", ["imap", "as_completed", "starmap", "executor"])
def test_every_api_takes_a_store(tmp_path, api):
    path, log = tmp_path / "s.sqlite", tmp_path / "calls"

    def call(n):
        if api == "imap":
            return list(shoal.imap(counted, range(n), args=(str(log),), store=path))
        if api == "as_completed":
            got = shoal.as_completed(counted, range(n), args=(str(log),), store=path,
                                     with_index=True)  # fmt: skip
            return [v for _, v in sorted(got)]
        if api == "starmap":
            return shoal.starmap(counted, [(i, str(log)) for i in range(n)], store=path)
        with shoal.Executor(workers=2) as ex:
            return list(ex.map(counted, range(n), args=(str(log),), store=path))

    assert call(6) == list(range(1, 7))
    log.unlink()
    assert call(9) == list(range(1, 10))
    assert sorted(_calls(log)) == [6, 7, 8]


def test_a_stream_closed_early_releases_the_store(tmp_path):
    path = tmp_path / "s.sqlite"
    stream = shoal.imap(triple, range(100), store=path)
    stream.close()  # before its first next()
    assert shoal.map(triple, range(5), store=path) == [0, 3, 6, 9, 12]


# -- what is stored ------------------------------------------------------------------------


def test_provenance_of_runs_and_items(tmp_path):
    path = tmp_path / "s.sqlite"
    shoal.map(slow, range(4), kwargs={"seconds": 0.01}, store=path, workers=2)
    with shoal.Store(path) as st:
        (run,) = st.runs()
        for field in ("shoal", "python", "platform", "host", "user", "argv", "source_hash"):
            assert run[field], field
        assert run["function"] == "store_funcs:slow" and run["status"] == "finished"
        assert run["backend"] == "processes" and run["workers"] == 2
        assert run["started"] <= run["finished"]
        items = list(st.items())
        assert [i["index"] for i in items] == [0, 1, 2, 3]
        for item in items:
            assert item["pid"] != os.getpid() and item["host"] == socket.gethostname()
            assert item["duration"] >= 0.005 and item["finished"] >= item["started"]
        summary = st.summary()
        assert summary["total"] == 4 and summary["done"] == 4 and summary["pending"] == 0
        assert summary["finished"] is not None and summary["elapsed"] > 0


def test_capture_keeps_bounded_output_in_the_store_or_on_the_error(tmp_path):
    path = tmp_path / "s.sqlite"
    shoal.map(noisy, [1, 2], kwargs={"lines": 20_000}, store=path, capture=True,
              on_error="return", backend="threads")  # fmt: skip
    with shoal.Store(path) as st:
        out, err = st.output(0)  # by input index
        assert out.startswith("out 1 0\n") and out.rstrip().endswith("out 1 19999")
        assert "characters left out" in out and len(out) < 2 * 65536 + 200
        assert err == "err 1\n"
        out2, _ = st.output(1)  # a failed item keeps its output too
        assert "out 2 0" in out2
    with pytest.raises(RuntimeError) as info:
        shoal.map(noisy, [2], capture=True)
    assert any("captured stdout" in n and "out 2 0" in n for n in info.value.__notes__)


def test_many_rows_with_keys_and_capture(tmp_path):
    """Hundreds of rows with the key and captured-output columns (inserted many per
    statement) come back whole, each with its own key and output."""
    path = tmp_path / "s.sqlite"
    items = list(range(3, 450))
    out = shoal.map(noisy, items, store=path, capture=True, key=lambda x: f"k{x}")
    assert out == items
    with shoal.Store(path) as st:
        assert list(st.results()) == [(f"k{x}", x) for x in items]
        for x in (3, 200, 449):
            assert st.output(f"k{x}") == (f"out {x} 0\n", f"err {x}\n")
        assert [i["key"] for i in st.items()] == [f"k{x}" for x in items]


def test_large_arrays_are_stored_as_raw_buffers(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "s.sqlite"
    shoal.map(big_array, [1, 2], store=path)
    conn = sqlite3.connect(path)
    sizes = [r[0] for r in conn.execute("SELECT length(data) FROM shoal_buffers ORDER BY item")]
    pickles = [r[0] for r in conn.execute("SELECT length(value) FROM shoal_items")]
    conn.close()
    assert sizes == [2_400_000, 2_400_000] and max(pickles) < 1000
    with shoal.Store(path) as st:
        values = dict(st.results())
    assert values[0]["x"] == 1 and np.array_equal(values[1]["a"], np.full(300_000, 2.0))
    again = shoal.map(big_array, [1, 2], store=path)  # read back on resume
    assert np.array_equal(again[0]["a"], values[0]["a"])


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_result_that_cannot_be_pickled_is_that_items_failure(tmp_path, backend):
    path = tmp_path / "s.sqlite"
    shoal.map(unpicklable, [0, 1, 2], store=path, on_error="return", backend=backend)
    with shoal.Store(path) as st:
        assert [k for k, _ in st.results()] == [0, 2]
        ((key, exc),) = st.failures()
        assert key == 1 and "pickle" in str(exc).lower()


# -- bad stores ----------------------------------------------------------------------------


def test_bad_store_paths_fail_before_any_work(tmp_path):
    log = tmp_path / "calls"
    for bad in (tmp_path / "missing" / "s.sqlite", "/sys/shoal-test.sqlite", tmp_path):
        with pytest.raises(shoal.StoreError):
            shoal.map(counted, [1], args=(str(log),), store=bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(shoal.StoreError, match="not a shoal store"):
        shoal.map(counted, [1], args=(str(log),), store=text)
    other_db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other_db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(shoal.StoreError, match="something else"):
        shoal.map(counted, [1], args=(str(log),), store=other_db)
    assert not log.exists()
    with pytest.raises(TypeError, match="store"):
        shoal.map(counted, [1], store=3)
    with pytest.raises(shoal.StoreError, match="does not exist"):
        shoal.Store(tmp_path / "nothing.sqlite")
    assert issubclass(shoal.StoreError, shoal.ShoalError)


def test_an_empty_file_is_a_new_store(tmp_path):
    path = tmp_path / "s.sqlite"
    path.touch()
    assert shoal.map(triple, [1, 2], store=path) == [3, 6]


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    shoal.map(triple, [1], store=path, backend="serial")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {_db.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    for opener in (lambda: shoal.map(triple, [1], store=path), lambda: shoal.Store(path)):
        with pytest.raises(shoal.StoreError, match="newer"):
            opener()


def test_a_store_in_a_directory_the_reader_cannot_write_is_read_as_immutable(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    shoal.map(triple, [1, 2], store=path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path)
                        and mode == os.W_OK else real(p, mode))  # fmt: skip
    with shoal.Store(path) as st:
        assert list(st.results()) == [(0, 3), (1, 6)]


def test_journal_mode_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOAL_STORE_JOURNAL", raising=False)
    assert _db.journal_mode_for(str(tmp_path / "s.sqlite")) in ("wal", "delete")
    monkeypatch.setenv("SHOAL_STORE_JOURNAL", "delete")
    path = tmp_path / "s.sqlite"
    shoal.map(triple, [1], store=path, backend="serial")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def test_a_wal_store_written_from_another_host_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_STORE_JOURNAL", "wal")
    path = tmp_path / "s.sqlite"
    shoal.map(triple, [1], store=path, backend="serial")
    conn = sqlite3.connect(path)
    now = time.time()
    conn.execute("INSERT INTO shoal_lock VALUES (1, 4242, 'node-elsewhere', 't', ?, ?)",
                 (now, now))  # fmt: skip
    conn.commit()
    conn.close()
    with pytest.raises(shoal.StoreError, match="node-elsewhere"):
        shoal.Store(path)
    with pytest.raises(shoal.StoreError, match="pid 4242 on host node-elsewhere"):
        shoal.map(triple, [1], store=path)  # a live lock of another host: in use


# -- crashes, Ctrl-C, disk full, two writers ------------------------------------------------

_SLOW_RUN = """
import shoal, store_funcs
shoal.map(store_funcs.slow, range(200), kwargs={"seconds": 0.02}, store=sys.argv[1], workers=2)
"""


@pytest.mark.timeout(120)
def test_sigkill_mid_run_leaves_a_store_that_resumes(tmp_path):
    path = tmp_path / "s.sqlite"
    proc = _script(_SLOW_RUN, path)
    try:
        _wait_for_done(path, 30, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert _integrity(path) == "ok"
    with shoal.Store(path) as st:
        before = st.summary()["done"]
    assert 30 <= before < 200
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = shoal.map(slow, range(200), kwargs={"seconds": 0.001}, store=path)
    assert out == [2 * x for x in range(200)]
    notes = [str(w.message) for w in caught if issubclass(w.category, shoal.StoreWarning)]
    assert any(f"pid {proc.pid}" in n and "taking over" in n for n in notes), notes
    with shoal.Store(path) as st:
        runs = st.runs()
        assert [r["status"] for r in runs] == ["running", "finished"]
        kept = sum(1 for i in st.items() if i["run"] == runs[0]["id"])
        assert kept >= before  # nothing committed was lost or recomputed


@pytest.mark.timeout(120)
def test_ctrl_c_commits_what_finished(tmp_path):
    path = tmp_path / "s.sqlite"
    body = _SLOW_RUN.replace("shoal.map(", "try:\n    shoal.map(") + (
        "except KeyboardInterrupt:\n    print('interrupted')\n"
    )
    proc = _script(body, path)
    try:
        _wait_for_done(path, 20, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "interrupted" in out, err
    with shoal.Store(path) as st:
        summary = st.summary()
        assert st.runs()[-1]["status"] == "interrupted"
        assert summary["done"] >= 20 and not summary["running"]
        assert all(v == 2 * k for k, v in st.results())


@pytest.mark.timeout(120)
def test_two_concurrent_writers(tmp_path):
    path = tmp_path / "s.sqlite"
    proc = _script(_SLOW_RUN, path)
    try:
        _wait_for_done(path, 1, proc)
        with pytest.raises(shoal.StoreError) as info:
            shoal.map(slow, range(200), store=path)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(info.value)
        with shoal.Store(path) as st:  # reading while it runs is fine
            assert st.summary()["running"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.timeout(120)
def test_a_run_whose_lock_was_taken_over_stops(tmp_path):
    path = tmp_path / "s.sqlite"
    body = _SLOW_RUN.replace("shoal.map(", "try:\n    shoal.map(") + (
        "except shoal.StoreError as exc:\n    print('StoreError:', exc)\n"
    )
    proc = _script(body, path)
    try:
        _wait_for_done(path, 1, proc)
        conn = sqlite3.connect(path, timeout=30)
        now = time.time()
        conn.execute("UPDATE shoal_lock SET pid = 4242, host = 'other-node', token = 'x', "
                     "heartbeat = ?", (now + 60,))  # fmt: skip
        conn.commit()
        conn.close()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "StoreError:" in out and "taken over" in out and "other-node" in out, (out, err)


@pytest.mark.timeout(120)
def test_disk_full_raises_store_error_and_keeps_what_was_committed(tmp_path):
    path = tmp_path / "s.sqlite"
    body = """
    import resource, signal, shoal, store_funcs
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    try:
        shoal.map(store_funcs.text, range(20_000), kwargs={"suffix": "x" * 500},
                  store=sys.argv[1], backend="threads")
    except shoal.StoreError as exc:
        print("StoreError:", exc)
    """
    proc = _script(body, path)
    out, err = proc.communicate(timeout=100)
    assert "StoreError:" in out, (out, err)
    assert "results committed before are kept" in out
    assert _integrity(path) == "ok"
    with shoal.Store(path) as st:
        got = list(st.results())
    assert 100 < len(got) < 20_000
    assert all(v == f"{k}" + "x" * 500 for k, v in got)
    out = shoal.map(triple, [1], store=tmp_path / "t.sqlite")  # unaffected elsewhere
    assert out == [3]


def test_status_json_of_a_finished_store(tmp_path):
    path = tmp_path / "s.sqlite"
    shoal.map(triple, range(3), store=path)
    with shoal.Store(path) as st:
        assert json.loads(json.dumps(st.summary()))["done"] == 3


def test_a_changed_source_is_warned_about_and_done_items_are_kept(tmp_path):
    module = tmp_path / "swept.py"
    store = tmp_path / "s.sqlite"
    run = (
        "import sys, warnings, shoal; sys.path.insert(0, sys.argv[2]); import swept\n"
        "warnings.simplefilter('always')\n"
        "print(shoal.map(swept.f, [1, 2], store=sys.argv[1], backend='serial'))\n"
    )

    def once(body: str) -> subprocess.CompletedProcess:
        module.write_text(body)
        return subprocess.run([sys.executable, "-c", run, str(store), str(tmp_path)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    first = once("def f(x):\n    return x + 1\n")
    assert first.stdout.strip() == "[2, 3]", first.stderr
    second = once("def f(x):\n    return x + 100\n")
    assert second.stdout.strip() == "[2, 3]", second.stderr  # done items are not re-run
    assert "source of swept:f changed" in second.stderr
    with shoal.Store(store) as st:
        hashes = [r["source_hash"] for r in st.runs()]
    assert len(set(hashes)) == 2


def test_store_rows_builds_flat_parameters_and_unwraps_values():
    import pickle

    from shoal._native import store_rows

    values = [(7, 11, "h", 1.0, 2.0), ("é", 12, "h", 3.0, 4.0), (None, 11, "h", 5.0, 6.0)]
    idents = [b"a" * 16, b"b" * 16, b"c" * 16]
    flat = store_rows(40, idents, range(5, 8), values, 1)
    assert values == [7, "é", None]  # unwrapped in place
    assert flat is not None and len(flat) == 30
    rows = [flat[i : i + 10] for i in range(0, 30, 10)]
    assert [r[0] for r in rows] == [40, 41, 42]
    assert [bytes(r[1]) for r in rows] == idents
    assert [r[2] for r in rows] == [5, 6, 7]
    assert rows[1][3:8] == [3.0, 4.0, 12, "h", 1]
    assert [pickle.loads(r[8]) for r in rows] == [7, "é", None] and rows[0][9] == 0
    # Anything not plain (or not a fact tuple): None, and the values are left as they were.
    for odd in [([1], 1, "h", 0.0, 0.0), (2**70, 1, "h", 0.0, 0.0), (True, 1, "h", 0.0), 5]:
        values = [(1, 1, "h", 0.0, 0.0), odd]
        before = list(values)
        assert store_rows(1, idents[:2], range(2), values, 1) is None
        assert values == before


def test_item_facts_name_the_process_that_ran_it_after_a_fork():
    from shoal._itemcall import ItemCall

    call = ItemCall(abs, False, "abs")
    assert call(-1)[:2] == (1, os.getpid())  # caches this process's pid
    child = os.fork()
    if child == 0:  # the cached pid is the parent's: the child must not report it
        os._exit(0 if call(-1)[1] == os.getpid() else 3)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
