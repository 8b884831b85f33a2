"""The driver's side of ``store=`` and ``capture=``: which items to run, and recording results.

The driver (:class:`shoal._driver.Run`) calls three hooks:

- :meth:`CallRecorder.take` reads the next items of the input. Items done in the store (and,
  with ``rerun_failed=False``, failed ones) are handed back at once from the store instead of
  being run; the others form a chunk of consecutive input positions, so that seeding by index
  and ordering work unchanged. An item whose identity is already running in this call waits
  for that one's result.
- :meth:`CallRecorder.record` unwraps the facts :class:`shoal._itemcall.ItemCall` attached to
  each value and queues a row per item; rows are committed in one transaction at least every
  :data:`BATCH_S` seconds or :data:`BATCH_ITEMS` items, by the driver or, while it waits for
  results, by a background thread that also renews the lock's heartbeat.
- :meth:`CallRecorder.finish` commits what is left, closes the run's provenance record and
  releases the lock: at the end, after an error, or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pickle
import platform
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from itertools import chain, islice, repeat
from typing import Any

from .._itemcall import hostname
from .._native import blake2b_many, store_rows
from .._spec import MODE_KW, MODE_SINGLE, MODE_STAR, CallSpec
from . import _codec, _db
from ._db import DONE, FAILED, StoreError, StoreWarning

BATCH_S = 0.1
BATCH_ITEMS = 1000
# Status of a key seen in this call (in the in-memory map; the file keeps DONE/FAILED only).
_SEEN = 10
# The in-memory state of an identity running in this call (row id 0, a state of its own).
_RUNNING = 3

Replay = Callable[[int, list[Any], int], bool]

_ROW_SQL = (
    "INSERT INTO shoal_items (id, key, ukey, idx, run, status, started, finished, pid, host, "
    "attempts, value, nbuf, etype, emessage, traceback, exc, stdout, stderr) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Most stored results one ``take`` reads back (bounds memory on a huge done prefix).
_REPLAY_MAX = 10_000
#: Most parameters of one SQL statement (SQLite before 3.32 allows 999).
_MAX_PARAMETERS = 999
#: The writer falls this many rows behind before the driver commits itself (back-pressure).
_BACKLOG = 2 * BATCH_ITEMS


def _call_args(spec: CallSpec, item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments ``spec.fn`` gets for ``item`` (fixed ones included)."""
    if spec.mode == MODE_SINGLE:
        return (item, *spec.args), dict(spec.kwargs)
    if spec.mode == MODE_STAR:
        return (*item, *spec.args), dict(spec.kwargs)
    return (*item[0], *spec.args), {**spec.kwargs, **item[1]}


class CallRecorder:
    """One call's link to its store (``path``), or only the unwrapping of ``capture=True``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        spec: CallSpec,
        items: Iterator[Any],
        *,
        path: str | None,
        key: Callable[..., Any] | None,
        capture: bool,
        rerun_failed: bool,
        total: int | None,
        api: str,
        backend: str,
        workers: int | None,
    ) -> None:
        self.spec = spec
        self.items = items
        self.path = path
        self.key = key
        self.capture = capture
        self.rerun_failed = rerun_failed
        self.index = 0
        self.input_error: BaseException | None = None
        self.finished = False
        self.error: BaseException | None = None
        # identity -> row id << 4 | state (DONE, FAILED, or those + _SEEN) of the stored rows,
        # or _RUNNING: one map (a lookup per item, and no set to add to and remove from)
        self.status: dict[bytes, int] = {}
        self.in_flight: dict[int, bytes] = {}  # index -> identity
        self.ukeys: dict[int, Any] = {}  # index -> user key (with key= only)
        self.waiting: dict[bytes, list[int]] = {}
        #: index -> id of the stored failure that the running item's row replaces
        self.replacing: dict[int, int] = {}
        # Items read from the input and not taken yet (after a gap), with their identities.
        self.ahead: list[Any] = []
        self.ahead_at = 0
        self.ahead_idents: list[bytes] | None = None
        self.input_end = False
        #: Rows not committed yet, in id order, as parts ``(rows, data, flat)``: done rows'
        #: parameters in one flat list (:attr:`width` per row), or failures' full rows.
        self.pending: list[tuple[int, list[Any], bool]] = []
        self.pending_rows = 0
        self.pending_at = 0
        self.pending_buffers: list[tuple[int, int, Any]] = []
        self.pending_deletes: list[tuple[int]] = []
        self.pending_since = 0.0
        self.next_id = 1
        self.first_pending_id = 1  # rows from this id on are not committed yet
        self.wake = threading.Event()
        self.committed = 0
        self.done = 0
        self.failed = 0
        self.buf_lock = threading.Lock()
        self.db_lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        #: Input position stored for call index i (the CLI leaves unreadable lines out of the
        #: call but counts them); ``None``: the index itself.
        self.positions: list[int] | None = None
        if path is None:
            return
        self.call_key = _codec.call_key(fn, spec.mode, spec.args, spec.kwargs, spec.seed)
        self.conn = _db.connect(path)
        try:
            _db.create_or_check(self.conn, path, _db.journal_mode_for(path))
            self._check_function(fn)
            self.token = _db.acquire_lock(self.conn, path)
        except BaseException:
            self.conn.close()
            raise
        try:
            self.run_id = self._start_run(fn, api, backend, workers, total)
            self.width, self.rows_per_insert = self._done_sql()
            self.status = dict(self.conn.execute("SELECT key, id << 4 | status FROM shoal_items"))
            self.next_id = self.first_pending_id = 1 + (
                self.conn.execute("SELECT MAX(id) FROM shoal_items").fetchone()[0] or 0
            )
        except BaseException:
            self._release()
            raise
        self.thread = threading.Thread(target=self._background, name="shoal-store", daemon=True)
        self.thread.start()

    # -- opening ---------------------------------------------------------------------------

    def _check_function(self, fn: Callable[..., Any]) -> None:
        name = _codec.function_name(fn)
        stored = _db.get_meta(self.conn, "function")
        if stored is None:
            self.conn.execute("INSERT OR IGNORE INTO shoal_meta VALUES ('function', ?)", (name,))
            stored = _db.get_meta(self.conn, "function")
        if stored != name:
            raise StoreError(
                f"store {self.path!r} holds results of {stored}, not of {name}: a store belongs "
                f"to one function; use another file for {name}"
            )

    def _done_sql(self) -> tuple[int, int]:
        """The insert of done items (:meth:`_done_insert`): only the columns they use (binding
        is most of an insert's cost); the run id and the status are constants of the statement.
        Many rows go in one statement (a third cheaper per row than one statement per row):
        returns the columns per row and the most rows per statement, whose parameters stay
        under SQLite's oldest limit (999)."""
        columns = ["id", "key", "idx", "started", "finished", "pid", "host", "attempts", "value"]
        columns.append("nbuf")
        if self.key is not None:
            columns.append("ukey")
        if self.capture:
            columns += ["stdout", "stderr"]
        self._done_row = f"({', '.join('?' * len(columns))}, {int(self.run_id)}, {DONE})"
        self._done_head = f"INSERT INTO shoal_items ({', '.join(columns)}, run, status) VALUES "
        return len(columns), _MAX_PARAMETERS // len(columns)

    def _done_insert(self, rows: int) -> str:
        """The insert of ``rows`` done rows in one statement (sqlite3 caches its preparation)."""
        return self._done_head + ", ".join([self._done_row] * rows)

    def _start_run(
        self, fn: Callable[..., Any], api: str, backend: str, workers: int | None, total: Any
    ) -> int:
        from .. import __version__

        source = _codec.source_hash(fn)
        row = self.conn.execute("SELECT info FROM shoal_runs ORDER BY id DESC LIMIT 1").fetchone()
        if row is not None:
            before = json.loads(row[0]).get("source_hash")
            if before and source and before != source:
                warnings.warn(
                    f"store {self.path!r}: the source of {_codec.function_name(fn)} changed "
                    f"since the last run; results already stored are kept (delete the store "
                    f"to recompute them)",
                    StoreWarning,
                    stacklevel=4,
                )
        try:
            user = getpass.getuser()
        except Exception:
            user = None
        info = {
            "shoal": __version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "host": hostname(),
            "pid": os.getpid(),
            "user": user,
            "argv": list(sys.argv),
            "cwd": os.getcwd(),
            "function": _codec.function_name(fn),
            "source_hash": source,
            "api": api,
            "backend": backend,
            "workers": workers,
            "total": total,
            "key": self.key is not None,
            "capture": self.capture,
        }
        cur = self.conn.execute(
            "INSERT INTO shoal_runs (started, status, info) VALUES (?, 'running', ?)",
            (time.time(), json.dumps(info)),
        )
        return int(cur.lastrowid or 0)

    # -- input side (driver hook) ----------------------------------------------------------

    def identity(self, item: Any) -> tuple[bytes, Any]:
        if self.key is None:
            return _codec.item_key(self.call_key, self.spec.mode, item), None
        args, kwargs = _call_args(self.spec, item)
        ukey = self.key(*args, **kwargs)
        return _codec.user_key(self.call_key, ukey), ukey

    def take(self, size: int, replay: Replay) -> tuple[int, list[Any], bool]:
        """The next chunk to run: ``(start index, items, input ended)``. Items not to run are
        passed to ``replay(index, values, failed)`` (which returns whether to go on)."""
        self._raise_error()
        start = self.index
        chunk: list[Any] = []
        if self.path is None:
            try:
                for item in self.items:
                    chunk.append(item)
                    if len(chunk) >= size:
                        break
            except Exception as exc:
                self.input_error = exc
                self.index += len(chunk)
                return start, chunk, True
            self.index += len(chunk)
            return start, chunk, len(chunk) < size
        replays: list[tuple[int, int]] = []  # (index, row id) to read back, in input order
        status, in_flight = self.status, self.in_flight
        ahead, at = self.ahead, self.ahead_at
        gap = False
        while len(chunk) < size and len(replays) < _REPLAY_MAX and not gap:
            if at >= len(ahead):
                if self.input_end:
                    break
                want = size - len(chunk)
                if replays:  # reading back a done stretch: read on in growing batches
                    want = max(want, min(len(replays), _REPLAY_MAX - len(replays)))
                ahead, at = self._read_ahead(want), 0
                self.ahead = ahead
                if not ahead:
                    break
            idents = self.ahead_idents
            if idents is not None:
                # The common case: a stretch of new, distinct items goes to the chunk in bulk.
                m = min(len(ahead) - at, size - len(chunk))
                part = idents[at : at + m]
                if list(map(status.get, part)).count(None) == m:
                    before = len(status)
                    status.update(zip(part, repeat(_RUNNING)))
                    if len(status) - before == m:  # no identity twice in the stretch either
                        if not chunk:
                            start = self.index
                        in_flight.update(zip(range(self.index, self.index + m), part, strict=True))
                        chunk.extend(ahead[at : at + m])
                        self.index += m
                        at += m
                        continue
                    for ident in part:  # undone: item by item below
                        status.pop(ident, None)
                if not chunk:
                    # A resume: a stretch of done items is read back in bulk.
                    m = min(len(ahead) - at, _REPLAY_MAX - len(replays))
                    part = idents[at : at + m]
                    stored = [p for p in map(status.get, part) if p is not None]
                    if (
                        len(stored) == m
                        and all(p & 15 == DONE for p in stored)
                        and len(set(part)) == m
                    ):
                        replays.extend(
                            zip(
                                range(self.index, self.index + m),
                                [p >> 4 for p in stored],
                                strict=True,
                            )
                        )
                        status.update(zip(part, [p + _SEEN for p in stored], strict=True))
                        self.index += m
                        at += m
                        continue
            # Item by item: some are stored, running or repeated.
            while at < len(ahead) and len(chunk) < size and len(replays) < _REPLAY_MAX:
                item = ahead[at]
                if idents is not None:
                    ident, ukey = idents[at], None
                else:
                    ident, ukey = self.identity(item)
                at += 1
                index = self.index
                self.index += 1
                packed = status.get(ident)
                st = -1 if packed is None else packed & 15
                is_running = packed == _RUNNING
                if (is_running or st >= _SEEN) and self.key is not None:
                    raise ValueError(f"duplicate key {ukey!r} in one call (item {index})")
                if not is_running and (st == -1 or (st == FAILED and self.rerun_failed)):
                    if not chunk:
                        start = index
                    if packed is not None:  # a failed row, replaced when the new one is written
                        self.replacing[index] = packed >> 4
                    status[ident] = _RUNNING
                    in_flight[index] = ident
                    if ukey is not None:
                        self.ukeys[index] = ukey
                    chunk.append(item)
                    continue
                if is_running:
                    # The same identity is running in this call: it shares that one's result.
                    self.waiting.setdefault(ident, []).append(index)
                else:
                    assert packed is not None
                    if st < _SEEN:
                        status[ident] = packed + _SEEN
                    replays.append((index, packed >> 4))
                if chunk:
                    gap = True  # a gap in the positions: the chunk so far goes alone
                    break
        self.ahead_at = at
        ended = self.input_end and at >= len(ahead)
        if not chunk:
            start = self.index
        stop = self._replay(replays, replay) if replays else None
        if stop is not None:
            # A stored failure stops the call (on_error="raise"): items before it still run.
            return start, chunk if chunk and start < stop else [], True
        return start, chunk, ended

    def _read_ahead(self, want: int) -> list[Any]:
        """Read up to ``want`` more items of the input (at least one) into the look-ahead, with
        their identities when no ``key=`` names them (hashed in one loop: the hot path)."""
        batch: list[Any] = []
        try:
            # extend() keeps what it read even if the input raises midway.
            batch.extend(islice(self.items, max(1, want)))
        except Exception as exc:
            self.input_error = exc
            self.input_end = True
        if len(batch) < max(1, want):
            self.input_end = True
        self.ahead_idents = None
        if self.key is None and self.spec.mode != MODE_KW:
            # The identities of the whole batch in one native call (as _codec.item_key).
            try:
                pickles = list(map(pickle.dumps, batch, repeat(5)))
            except Exception:  # cloudpickle, or the error of an item that cannot be hashed
                pickles = [_codec.pickled(item) for item in batch]
            idents = blake2b_many(self.call_key, 16, pickles)
            self.ahead_idents = idents
        return batch

    def _replay(self, replays: list[tuple[int, int]], replay: Replay) -> int | None:
        """Hand stored results to the driver, consecutive positions as one batch; the index
        of a stored failure that stops the call, or ``None``."""
        values = self._read([rid for _, rid in replays])
        run_start = -1
        run_values: list[Any] = []
        for (index, _), (value, failed) in zip(replays, values, strict=True):
            if failed:
                self.failed += 1
                if run_values:
                    replay(run_start, run_values, 0)
                run_values = []
                if not replay(index, [value], 1):
                    return index
                continue
            self.done += 1
            if run_values and index == run_start + len(run_values):
                run_values.append(value)
                continue
            if run_values:
                replay(run_start, run_values, 0)
            run_start, run_values = index, [value]
        if run_values:
            replay(run_start, run_values, 0)
        return None

    def _read(self, rids: list[int]) -> list[tuple[Any, bool]]:
        """Stored ``(value or exception, failed)`` of rows ``rids``."""
        if max(rids) >= self.first_pending_id:
            self.flush()
        rows: dict[int, Any] = {}
        with self.db_lock:
            for at in range(0, len(rids), 500):
                part = rids[at : at + 500]
                marks = ",".join("?" * len(part))
                for row in self.conn.execute(
                    "SELECT id, status, value, nbuf, etype, emessage, traceback, exc "
                    f"FROM shoal_items WHERE id IN ({marks})",
                    part,
                ):
                    rows[row[0]] = row
            buffers: dict[int, list[bytes]] = {}
            for rid, row in rows.items():
                if row[3]:
                    buffers[rid] = [
                        r[0]
                        for r in self.conn.execute(
                            "SELECT data FROM shoal_buffers WHERE item = ? ORDER BY n", (rid,)
                        )
                    ]
        out = []
        for rid in rids:
            row = rows.get(rid)
            if row is None:
                raise StoreError(f"store {self.path!r}: row {rid} vanished while running")
            if row[1] == DONE:
                out.append((_codec.decode_value(row[2], buffers.get(rid, [])), False))
            else:
                out.append((_codec.rebuild_error(row[4], row[5], row[6], row[7]), True))
        return out

    # -- output side (driver hook) ---------------------------------------------------------

    def record(
        self, start: int, values: list[Any], failed: int, attempts: int = 1
    ) -> list[tuple[int, list[Any], int]]:
        """Unwrap ``values`` in place and queue their rows; return results for items of the
        same identity that waited for these, as ``(index, values, failed)``."""
        if self.error is not None:
            raise self.error
        if self.path is None:
            for offset, wrapped in enumerate(values):
                if failed:
                    facts = wrapped.__dict__.pop("_shoal_item", None)
                    if facts is not None:
                        _note_output(wrapped, facts[4], facts[5])
                else:
                    values[offset] = wrapped[0]
            return []
        if not values:
            return []
        stop = start + len(values)
        entries = list(map(self.in_flight.pop, range(start, stop), repeat(None)))
        extra: list[tuple[int, list[Any], int]] = []
        part = None
        buffers: list[tuple[int, int, Any]] = []
        if not failed and self.key is None and not self.capture and not self.replacing:
            part = self._done_part(start, values, entries, attempts)
        parts = [part] if part is not None else self._parts(start, values, failed, attempts,
                                                            entries, buffers)  # fmt: skip
        if self.waiting:
            # Items of the same identity that waited for these share their results.
            for ident, value in zip(entries, values, strict=True):
                waiters = self.waiting.pop(ident, None) if ident is not None else None
                if waiters:
                    extra.extend((w, [value], int(failed)) for w in waiters)
        if parts:
            count = sum(p[0] for p in parts)
            with self.buf_lock:
                if not self.pending:
                    self.pending_since = time.monotonic()
                self.pending.extend(parts)
                self.pending_rows += count
                self.pending_buffers.extend(buffers)
                backlog = self.pending_rows
            if backlog >= _BACKLOG:
                self.flush(whole=True)  # the writer thread lags: commit here
            elif backlog >= BATCH_ITEMS:
                self.wake.set()
        return extra

    def _done_part(
        self, start: int, values: list[Any], entries: list[Any], attempts: int
    ) -> tuple[int, list[Any], bool] | None:
        """The rows of done items without ``key=`` or ``capture``, as one flat list of
        parameters built in one native call (the hot path of a run of many cheap items);
        ``None`` if :meth:`_parts` must do it item by item (a value that is not of a plain
        type, an item not from this call's input)."""
        if None in entries:
            return None
        n = len(values)
        rid = self.next_id
        positions = self.positions
        idx = range(start, start + n) if positions is None else positions[start : start + n]
        # Each wrapped value is (value, pid, host, started, finished): see ItemCall. The call
        # unwraps them in place.
        flat = store_rows(rid, entries, idx, values, attempts)
        if flat is None:
            return None  # values that are not plain (and may hold large buffers): _rows
        self.next_id = rid + n
        self.done += n
        # A row's state in memory: its id << 4 | DONE + _SEEN, consecutive ids.
        first = rid << 4 | (DONE + _SEEN)
        self.status.update(zip(entries, range(first, first + 16 * n, 16), strict=True))
        return n, flat, True

    def _parts(
        self,
        start: int,
        values: list[Any],
        failed: int,
        attempts: int,
        entries: list[Any],
        buffers: list[tuple[int, int, Any]],
    ) -> list[tuple[int, list[Any], bool]]:
        """The rows of ``values`` item by item (any kind), as parts of :attr:`pending`."""
        others: list[tuple[Any, ...]] = []  # failures: every column
        rows = self._rows(start, values, failed, attempts, entries, others, buffers)
        if not others:
            return [(len(rows), list(chain.from_iterable(rows)), True)] if rows else []
        # Failures are rare: they go on their own, in id order with the rest.
        tagged = sorted([(r[0], True, r) for r in rows] + [(o[0], False, o) for o in others])
        parts: list[tuple[int, list[Any], bool]] = []
        for _, flat, row in tagged:
            if parts and parts[-1][2] == flat:
                count, data, _ = parts[-1]
                if flat:
                    data.extend(row)
                else:
                    data.append(row)
                parts[-1] = (count + 1, data, flat)
            else:
                parts.append((1, list(row) if flat else [row], flat))
        return parts

    def _rows(
        self,
        start: int,
        values: list[Any],
        failed: int,
        attempts: int,
        entries: list[Any],
        others: list[tuple[Any, ...]],
        buffers: list[tuple[int, int, Any]],
    ) -> list[tuple[Any, ...]]:
        """The rows of ``values`` item by item (any kind); failures go to ``others``."""
        rows: list[tuple[Any, ...]] = []
        status, positions, run = self.status, self.positions, self.run_id
        capture = self.capture
        named = self.key is not None
        plain = not named and not capture
        next_id = self.next_id
        encode = _codec.encode_value
        for offset, (wrapped, entry) in enumerate(zip(values, entries, strict=True)):
            index = start + offset
            result = wrapped if failed else wrapped[0]
            if not failed:
                values[offset] = result
            if entry is None:
                continue  # not from this call's input (cannot happen; be safe)
            ident, ukey = entry, self.ukeys.pop(index, None)
            rid = next_id
            next_id += 1
            old = self.replacing.pop(index, 0)
            if old:
                self.pending_deletes.append((old,))
            idx = index if positions is None else positions[index]
            if failed:
                others.append(self._failure_row(rid, ident, ukey, idx, wrapped))
                state = FAILED
            else:
                pid, host, t0, t1 = wrapped[1], wrapped[2], wrapped[3], wrapped[4]
                out = wrapped[5] if capture else None
                err = wrapped[6] if capture else None
                try:
                    data, raw = encode(result)
                except Exception as exc:
                    # Kept as this item's failure; the caller still gets the value now.
                    self.failed += 1
                    state = FAILED
                    others.append((
                        rid, ident, ukey, idx, run, FAILED, t0, t1, pid, host, attempts, None, 0,
                        "PicklingError", f"result cannot be stored: {type(exc).__name__}: {exc}",
                        "", None, out, err,
                    ))  # fmt: skip
                else:
                    self.done += 1
                    state = DONE
                    row = (
                        rid, bytearray(ident), idx, t0, t1, pid, host, attempts,
                        bytearray(data), len(raw),
                    )  # fmt: skip
                    if plain:
                        rows.append(row)
                    else:
                        rows.append(
                            row + ((ukey,) if named else ()) + ((out, err) if capture else ())
                        )
                    if raw:
                        buffers.extend((rid, n, b) for n, b in enumerate(raw))
            status[ident] = rid << 4 | (state + _SEEN)
        self.next_id = next_id
        return rows

    def _failure_row(
        self, rid: int, ident: bytes, ukey: Any, idx: int, exc: BaseException
    ) -> tuple[Any, ...]:
        self.failed += 1
        facts = exc.__dict__.pop("_shoal_item", None)
        if facts is None:  # crashed, timed out: the driver knows only the worker's pid
            facts = (getattr(exc, "pid", None), None, None, None, None, None)
        out, err = (facts[4], facts[5]) if self.capture else (None, None)
        etype, message, tb, blob = _codec.describe_error(exc)
        tries = 1 + len(getattr(exc, "attempts", None) or ())
        return (
            rid, ident, ukey, idx, self.run_id, FAILED, facts[2], facts[3], facts[0], facts[1],
            tries, None, 0, etype, message, tb, blob, out, err,
        )  # fmt: skip

    # -- writing ---------------------------------------------------------------------------

    def flush(self, whole: bool = False) -> None:
        """Commit the queued rows, in transactions of at most :data:`BATCH_ITEMS` rows; with
        ``whole``, full transactions only: the rest waits for more rows or for its time
        (a small transaction after each full one cost a commit and rewrote a page)."""
        if self.path is None:
            return
        with self.db_lock:
            while True:
                with self.buf_lock:
                    if whole and self.pending_rows < BATCH_ITEMS:
                        return  # the rows left keep their pending_since: they wait no longer
                    parts, last = self._take_pending(BATCH_ITEMS)
                    # Buffers and replaced rows of the rows taken (ids up to `last`).
                    cut = 0
                    while cut < len(self.pending_buffers) and self.pending_buffers[cut][0] <= last:
                        cut += 1
                    buffers = self.pending_buffers[:cut]
                    del self.pending_buffers[:cut]
                    deletes, self.pending_deletes = self.pending_deletes, []
                    if self.pending and not whole:
                        self.pending_since = time.monotonic()
                if not parts and not buffers and not deletes:
                    return
                self._commit(parts, buffers, deletes)
                self.first_pending_id = last + 1

    def _take_pending(self, most: int) -> tuple[list[tuple[int, list[Any], bool]], int]:
        """The first rows of :attr:`pending`, at most ``most``, as parts, and the id of the last
        row taken. A part is taken whole or in part (:attr:`pending_at` rows of the first part
        are taken already: a long part is not copied again at each batch). Called with
        :attr:`buf_lock` held."""
        pending, width = self.pending, self.width
        taken: list[tuple[int, list[Any], bool]] = []
        room = most
        while pending and room:
            count, data, flat = pending[0]
            at = self.pending_at
            take = min(room, count - at)
            if at == 0 and take == count:
                taken.append(pending.pop(0))
            else:
                unit = width if flat else 1
                taken.append((take, data[at * unit : (at + take) * unit], flat))
                if at + take == count:
                    pending.pop(0)
                    at = 0
                else:
                    at += take
                self.pending_at = at
            room -= take
        self.pending_rows -= most - room
        if not taken:
            return taken, self.next_id - 1
        _, data, flat = taken[-1]
        # A flat part's rows start with their id; a failure's row too.
        return taken, data[-width] if flat else data[-1][0]

    def _commit(
        self, parts: list[tuple[int, list[Any], bool]], buffers: list[Any], deletes: list[Any]
    ) -> None:
        rows = sum(p[0] for p in parts)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            lock = _db.read_lock(self.conn)
            if lock is None or lock[2] != self.token:
                # Never write after losing the lock: another run owns the store now.
                self.conn.execute("ROLLBACK")
                self.error = self._lost(lock)
                raise self.error
            if deletes:
                self.conn.executemany("DELETE FROM shoal_items WHERE id = ?", deletes)
                self.conn.executemany("DELETE FROM shoal_buffers WHERE item = ?", deletes)
            done = [data for _, data, flat in parts if flat]
            full = [row for _, data, flat in parts if not flat for row in data]
            if full:
                self.conn.executemany(_ROW_SQL, full)
            if done:
                self._insert_done(done[0] if len(done) == 1 else list(chain.from_iterable(done)))
            if buffers:
                self.conn.executemany("INSERT INTO shoal_buffers VALUES (?, ?, ?)", buffers)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            with self.buf_lock:
                lost = rows + self.pending_rows
                self.pending.clear()
                self.pending_rows = self.pending_at = 0
                self.pending_buffers.clear()
            err = StoreError(
                f"writing to store {self.path!r} failed ({exc}); the {self.committed} results "
                f"committed before are kept, the last {lost} were lost"
            )
            self.error = err
            raise err from exc
        self.committed += rows

    def _insert_done(self, flat: list[Any]) -> None:
        """Insert done rows from the flat list of their parameters, :attr:`rows_per_insert`
        per statement, and the rest in one more."""
        step = self.width * self.rows_per_insert
        full = len(flat) - len(flat) % step
        if full:
            self.conn.executemany(
                self._done_insert(self.rows_per_insert),
                [flat[at : at + step] for at in range(0, full, step)],
            )
        # The rest in statements of 64, 32, ... 1 rows: a few statements whose preparation
        # sqlite3 keeps, not a new one for each size of the rest.
        at, rest = full, (len(flat) - full) // self.width
        size = 64
        while rest:
            if rest >= size:
                end = at + size * self.width
                self.conn.execute(self._done_insert(size), flat[at:end])
                at, rest = end, rest - size
            size //= 2

    def _background(self) -> None:
        last_beat = time.monotonic()
        while not self.stop.is_set():
            self.wake.wait(BATCH_S)
            self.wake.clear()
            try:
                if self.pending and time.monotonic() - self.pending_since >= BATCH_S:
                    self.flush()
                elif self.pending_rows >= BATCH_ITEMS:
                    self.flush(whole=True)
                if time.monotonic() - last_beat >= _db.HEARTBEAT_S:
                    last_beat = time.monotonic()
                    self._heartbeat()
            except StoreError:
                return  # self.error is set; the driver raises it at its next hook
            except Exception as exc:  # never let the thread die silently
                self.error = StoreError(f"store {self.path!r}: {exc}")
                return

    def _heartbeat(self) -> None:
        with self.db_lock:
            try:
                cur = self.conn.execute(
                    "UPDATE shoal_lock SET heartbeat = ? WHERE token = ?",
                    (time.time(), self.token),
                )
                lost = cur.rowcount == 0
                row = _db.read_lock(self.conn) if lost else None
            except sqlite3.Error:
                return  # busy: the next beat retries
        if lost:
            self.error = self._lost(row)

    def _lost(self, lock: tuple[Any, ...] | None) -> StoreError:
        whom = _db.owner(lock) if lock else "nobody"
        return StoreError(
            f"store {self.path!r}: this run's lock was taken over (now held by {whom}); "
            f"stopping so that two runs do not write the same store. The "
            f"{self.committed} results committed before are kept"
        )

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self, status: str) -> None:
        """Commit what is left, record the end of the run and release the lock. Idempotent.
        Raises :class:`StoreError` if the last commit fails and ``status`` is ``"finished"``."""
        if self.finished or self.path is None:
            self.finished = True
            return
        self.finished = True
        self.stop.set()
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        failure: BaseException | None = None
        try:
            if self.error is None:
                self.flush()
        except StoreError as exc:
            failure = exc
        if failure is None and self.error is not None:
            failure = self.error
            status = "failed"
        try:
            with self.db_lock:
                self.conn.execute(
                    "UPDATE shoal_runs SET finished = ?, status = ? WHERE id = ?",
                    (time.time(), status if failure is None else "failed", self.run_id),
                )
        except sqlite3.Error:
            pass  # the disk is full: the run stays 'running' in the file, its lock goes stale
        self._release()
        if failure is not None and status == "finished":
            raise failure

    def _release(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("DELETE FROM shoal_lock WHERE token = ?", (self.token,))
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


def _note_output(exc: BaseException, out: str | None, err: str | None) -> None:
    """Without a store, captured output goes into a note on the item's error."""
    for name, text in (("stdout", out), ("stderr", err)):
        if text:
            with contextlib.suppress(Exception):
                exc.add_note(f"shoal: captured {name}:\n{text.rstrip()}")


__all__ = ["MODE_KW", "CallRecorder"]
