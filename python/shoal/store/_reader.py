"""Reading a store back: :class:`Store`."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from .._itemcall import hostname
from . import _codec, _db
from ._db import DONE, FAILED, StoreError


class Store:
    """A result store, opened for reading (``shoal.Store("sweep.sqlite")``).

    Reading never blocks the run that writes the store, and can be done while it runs.

    Parameters
    ----------
    path : str or os.PathLike
        The store file (written by a call with ``store=path``).

    Raises
    ------
    shoal.StoreError
        If the file does not exist, is not a shoal store, is of a newer schema, or is a WAL
        store being written from another host (see ``docs/store.md``).

    Examples
    --------
    >>> import shoal
    >>> with shoal.Store("sweep.sqlite") as store:  # doctest: +SKIP
    ...     print(store.summary()["done"])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _db.check_path(path, write=False)
        if os.path.getsize(self.path) == 0:
            raise StoreError(f"store {self.path!r} is empty: no run has written it yet")
        self._conn = _db.connect(self.path, read_only=True)
        try:
            if not _db.check_schema(self._conn, self.path):
                raise StoreError(f"store {self.path!r} is empty: no run has written it yet")
            self._check_host()
        except BaseException:
            self._conn.close()
            raise

    def _check_host(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        lock = _db.read_lock(self._conn)
        if mode == "wal" and lock is not None and lock[1] != hostname():
            raise StoreError(
                f"store {self.path!r} is in WAL mode and being written by {_db.owner(lock)}: "
                f"WAL stores cannot be read safely from another host. Read it on that host, or "
                f"after the run ends (stores on network filesystems use a rollback journal, "
                f"which can be read from anywhere; see SHOAL_STORE_JOURNAL)"
            )

    # -- readers ---------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.path!r}: {exc}") from exc

    def _buffers(self, rid: int) -> list[bytes]:
        rows = self._query("SELECT data FROM shoal_buffers WHERE item = ? ORDER BY n", (rid,))
        return [r[0] for r in rows]

    def results(self) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` of every done item, in input order; ``key`` is the user's key
        (``key=``) or the item's input index."""
        rows = self._query(
            "SELECT id, ukey, idx, value, nbuf FROM shoal_items WHERE status = ? ORDER BY idx, id",
            (DONE,),
        ).fetchall()
        for rid, ukey, idx, data, nbuf in rows:
            buffers = self._buffers(rid) if nbuf else []
            yield (idx if ukey is None else ukey), _codec.decode_value(data, buffers)

    def failures(self) -> Iterator[tuple[Any, BaseException]]:
        """``(key, exception)`` of every failed item, in input order; the exception has its
        original type where it can be rebuilt (else :class:`shoal.RemoteError`), and the
        worker's traceback as ``__cause__``."""
        rows = self._query(
            "SELECT ukey, idx, etype, emessage, traceback, exc FROM shoal_items "
            "WHERE status = ? ORDER BY idx, id",
            (FAILED,),
        ).fetchall()
        for ukey, idx, etype, message, tb, blob in rows:
            yield (idx if ukey is None else ukey), _codec.rebuild_error(etype, message, tb, blob)

    def items(self) -> Iterator[dict[str, Any]]:
        """One dict per item, in input order: ``key``, ``index``, ``status`` (``"done"`` or
        ``"failed"``), ``started``, ``finished`` (Unix seconds), ``duration`` (seconds),
        ``pid``, ``host``, ``attempts``, ``run`` and, for a failure, ``error`` (``type``,
        ``message``, ``traceback``)."""
        rows = self._query(
            "SELECT ukey, idx, status, started, finished, finished - started, pid, host, "
            "attempts, run, etype, emessage, traceback FROM shoal_items ORDER BY idx, id"
        ).fetchall()
        for row in rows:
            ukey, idx, status = row[0], row[1], row[2]
            item: dict[str, Any] = {
                "key": idx if ukey is None else ukey,
                "index": idx,
                "status": "done" if status == DONE else "failed",
                "started": row[3],
                "finished": row[4],
                "duration": row[5],
                "pid": row[6],
                "host": row[7],
                "attempts": row[8],
                "run": row[9],
            }
            if status == FAILED:
                item["error"] = {"type": row[10], "message": row[11], "traceback": row[12]}
            yield item

    def output(self, key: Any) -> tuple[str | None, str | None]:
        """``(stdout, stderr)`` captured for the item named ``key`` (its user key, or its
        input index), with ``capture=True``; ``None`` where nothing was captured."""
        column = "idx" if isinstance(key, int) and not self._has_user_keys() else "ukey"
        row = self._query(
            f"SELECT stdout, stderr FROM shoal_items WHERE {column} = ? ORDER BY id DESC",
            (key,),
        ).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0], row[1]

    def _has_user_keys(self) -> bool:
        row = self._query("SELECT 1 FROM shoal_items WHERE ukey IS NOT NULL LIMIT 1").fetchone()
        return row is not None

    def runs(self) -> list[dict[str, Any]]:
        """Provenance of every run, oldest first: ``id``, ``started``, ``finished``,
        ``status`` (``running``, ``finished``, ``interrupted``, ``failed``, ``closed``) and what
        was recorded at its start (versions, host, user, command line, function and source
        hash, backend, workers...)."""
        out = []
        for rid, started, finished, status, info in self._query(
            "SELECT id, started, finished, status, info FROM shoal_runs ORDER BY id"
        ):
            run = {"id": rid, "started": started, "finished": finished, "status": status}
            run.update(json.loads(info or "{}"))
            out.append(run)
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and timings: ``total`` (items in the last run's input; ``None`` when
        unknown), ``done``, ``failed``, ``pending`` (``None`` when the total is unknown),
        ``started`` and ``finished`` (Unix seconds; ``finished`` is ``None`` while a run goes
        on), ``elapsed`` (seconds), ``running`` (whether a live run holds the lock),
        ``mean_duration`` (seconds per done item), ``rate`` (items per second of the last run)
        and ``eta`` (seconds, while a run goes on)."""
        counts = dict(self._query("SELECT status, COUNT(*) FROM shoal_items GROUP BY status"))
        done, failed = counts.get(DONE, 0), counts.get(FAILED, 0)
        runs = self.runs()
        total = runs[-1].get("total") if runs else None
        pending = None if total is None else max(0, total - done - failed)
        started = runs[0]["started"] if runs else None
        lock = _db.read_lock(self._conn)
        running = lock is not None and not _db.is_stale(lock, time.time())
        finished = None if running or not runs else runs[-1]["finished"]
        end = finished if finished is not None else time.time()
        mean = self._query(
            "SELECT AVG(finished - started) FROM shoal_items WHERE status = ? "
            "AND started IS NOT NULL",
            (DONE,),
        ).fetchone()[0]
        rate = eta = None
        if runs:
            last = runs[-1]
            this_run = self._query(
                "SELECT COUNT(*) FROM shoal_items WHERE run = ?", (last["id"],)
            ).fetchone()[0]
            span = (last["finished"] or time.time()) - last["started"]
            rate = this_run / span if span > 0 else None
            if running and rate and pending is not None:
                eta = pending / rate
        return {
            "total": total,
            "done": done,
            "failed": failed,
            "pending": pending,
            "started": started,
            "finished": finished,
            "elapsed": None if started is None else end - started,
            "running": running,
            "mean_duration": mean,
            "rate": rate,
            "eta": eta,
        }

    def close(self) -> None:
        """Close the file."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"
