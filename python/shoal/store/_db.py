"""The SQLite file of a store: checks on open, schema, journal mode and the writer's lock.

Journal mode. On a local filesystem the store uses WAL (readers never block the writer, a
commit costs one ``write``). WAL needs shared memory between every process that opens the file,
which a network filesystem (NFS, Lustre, GPFS, CIFS, BeeGFS, CephFS...) does not give across
hosts, so there the store uses the rollback journal (``DELETE``), whose POSIX locks do work
across hosts on those filesystems: ``shoal status`` on a login node can then read a store that a
compute node writes. ``SHOAL_STORE_JOURNAL=wal|delete`` overrides the choice. A reader that finds
a WAL store written by another host refuses with :class:`StoreError` rather than read pages that
may be stale.

Lock. One run writes a store at a time. The lock is a row in the store (pid, host, a random
token, a heartbeat renewed every :data:`HEARTBEAT_S` seconds). A lock is stale when its pid is
gone on this host, or when its heartbeat is older than :data:`STALE_S` seconds on any host; a
stale lock is taken over with a :class:`StoreWarning` that names its old owner.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import time
import urllib.parse
import warnings
from typing import Any

from .._errors import ShoalError
from .._itemcall import hostname

#: Version of the schema below, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 1
HEARTBEAT_S = 5.0
STALE_S = 30.0
_MAGIC = b"SQLite format 3\x00"
_NETWORK_FS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "cifs",
    "smb3",
    "smbfs",
    "beegfs",
    "ceph",
    "fuse.ceph",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "panfs",
    "afs",
    "9p",
}

_SCHEMA = """
CREATE TABLE shoal_meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE shoal_runs (
    id INTEGER PRIMARY KEY, started REAL, finished REAL, status TEXT, info TEXT
);
CREATE TABLE shoal_items (
    -- No index on `key`: a writer keeps every key in memory and addresses rows by id, so
    -- inserts append (a random-key index would cost a page write per item).
    id INTEGER PRIMARY KEY,
    key BLOB,              -- identity: a hash of the arguments, or of the user's key
    ukey,                  -- the user's key (str, int or bytes), NULL without key=
    idx INTEGER,           -- position in the input of the run that stored it
    run INTEGER,
    status INTEGER,        -- 1 done, 2 failed
    started REAL, finished REAL, pid INTEGER, host TEXT, attempts INTEGER,
    value BLOB, nbuf INTEGER,
    etype TEXT, emessage TEXT, traceback TEXT, exc BLOB,
    stdout TEXT, stderr TEXT
);
CREATE TABLE shoal_buffers (item INTEGER, n INTEGER, data BLOB, PRIMARY KEY (item, n));
CREATE TABLE shoal_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER, host TEXT, token TEXT, started REAL, heartbeat REAL
);
"""
_TABLES = {"shoal_meta", "shoal_runs", "shoal_items", "shoal_buffers", "shoal_lock"}

DONE, FAILED = 1, 2


class StoreError(ShoalError):
    """A store cannot be opened, read or written (bad path, not a store, newer schema, in use,
    disk full...). The message says which and what to do."""


class StoreWarning(ShoalError, UserWarning):  # noqa: N818 - a warning, not an error
    """Something about a store worth knowing that does not stop the run (a stale lock taken
    over, a changed function source)."""


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (``"ext4"``, ``"nfs4"``...), or ``""``."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return ""
    return fstype


def journal_mode_for(path: str) -> str:
    """``"wal"`` on a local filesystem, ``"delete"`` on a network one (see the module doc)."""
    forced = os.environ.get("SHOAL_STORE_JOURNAL", "").lower()
    if forced in ("wal", "delete"):
        return forced
    fstype = filesystem_type(os.path.dirname(os.path.abspath(path)) or ".")
    return "delete" if fstype in _NETWORK_FS else "wal"


def check_path(path: Any, *, write: bool) -> str:
    """Check a store path before anything is created; return it as a str."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"store must be a path (str or os.PathLike), not {type(path).__name__}")
    path = str(os.fspath(path))
    checked: str = path
    if not path:
        raise StoreError("store path is empty")
    if os.path.isdir(path):
        raise StoreError(f"store path {path!r} is a directory, not a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"cannot create store {path!r}: directory {directory!r} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.R_OK):
            raise StoreError(f"store {path!r} is not readable")
        if write and not os.access(path, os.W_OK):
            raise StoreError(f"store {path!r} is read-only")
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC))
        if head and head != _MAGIC:
            raise StoreError(f"{path!r} is not a shoal store (not an SQLite file)")
    elif not write:
        raise StoreError(f"store {path!r} does not exist")
    if write and not os.access(directory, os.W_OK):
        # SQLite writes its journal next to the file, so the directory must be writable too.
        raise StoreError(f"cannot write store {path!r}: directory {directory!r} is read-only")
    if write and not os.path.exists(path):
        # An empty file is a new store; creating it now proves the directory takes files
        # (os.access says yes to root on a read-only mount).
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise StoreError(f"cannot create store {path!r}: {exc.strerror}") from exc
    return checked


def connect(path: str, *, read_only: bool = False) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit ``BEGIN``/``COMMIT``). A reader of a
    store in a directory it cannot write (an archive) opens it as immutable: SQLite could not
    create its journal or WAL index there."""
    directory = os.path.dirname(os.path.abspath(path))
    target, uri = path, False
    if read_only and not os.access(directory, os.W_OK):
        target, uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?immutable=1", True
    try:
        conn = sqlite3.connect(
            target, isolation_level=None, timeout=30.0, check_same_thread=False, uri=uri
        )
        conn.execute("PRAGMA busy_timeout = 30000")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path!r}: {exc}") from exc
    return conn


def check_schema(conn: sqlite3.Connection, path: str) -> bool:
    """Whether ``conn`` is an existing shoal store (``False``: empty file, a new store)."""
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path!r} is not a shoal store: {exc}") from exc
    if not names:
        return False
    if "shoal_meta" not in names:
        shown = ", ".join(sorted(names)[:5])
        raise StoreError(f"{path!r} is an SQLite file of something else (tables: {shown})")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path!r} has schema version {version}, newer than this shoal understands "
            f"({SCHEMA_VERSION}); upgrade shoal to read it"
        )
    if not names >= _TABLES:
        raise StoreError(f"store {path!r} is incomplete (missing {sorted(_TABLES - names)})")
    return True


def create_or_check(conn: sqlite3.Connection, path: str, journal: str) -> None:
    """Make ``conn``'s file a store if it is empty; check it is one otherwise."""
    if check_schema(conn, path):
        _set_journal(conn, path, journal)
        return
    _set_journal(conn, path, journal)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # Another process may have created it between the check and the lock.
        if not check_schema(conn, path):
            # Statement by statement: executescript() would commit the open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(
                "INSERT INTO shoal_meta VALUES ('created', ?), ('schema', ?)",
                (str(time.time()), str(SCHEMA_VERSION)),
            )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise StoreError(f"cannot create store {path!r}: {exc}") from exc


def _set_journal(conn: sqlite3.Connection, path: str, journal: str) -> None:
    try:
        conn.execute(f"PRAGMA journal_mode = {journal}")
        # NORMAL: a commit survives the process being killed; only power loss can undo the last
        # transactions (never corrupting the file).
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint (the only step that syncs in WAL mode) every ~40 MB of WAL, not 4 MB.
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot set the journal mode of store {path!r}: {exc}") from exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner(row: tuple[Any, ...]) -> str:
    """``"pid 123 on host node7"`` for a lock row ``(pid, host, token, started, heartbeat)``."""
    return f"pid {row[0]} on host {row[1]}"


def is_stale(row: tuple[Any, ...], now: float) -> bool:
    """Whether a lock row is left by a run that died (see the module docstring)."""
    pid, host, _, _, heartbeat = row
    if host == hostname() and not pid_alive(int(pid)):
        return True
    return now - float(heartbeat) > STALE_S


def acquire_lock(conn: sqlite3.Connection, path: str) -> str:
    """Take the writer's lock; return its token. Raise :class:`StoreError` if a live run holds
    it; take over a stale one with a warning."""
    token = secrets.token_hex(8)
    now = time.time()
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "SELECT pid, host, token, started, heartbeat FROM shoal_lock WHERE id = 1"
        ).fetchone()
        if row is not None:
            if not is_stale(row, now):
                conn.execute("ROLLBACK")
                raise StoreError(
                    f"store {path!r} is in use by another run ({owner(row)}, started "
                    f"{time.ctime(row[3])}, heartbeat {now - row[4]:.0f} s ago); wait for it to "
                    f"finish or stop it. A lock whose pid is gone, or whose heartbeat is older "
                    f"than {STALE_S:g} s, is taken over automatically"
                )
            warnings.warn(
                f"store {path!r}: taking over the lock left by a run that is gone ({owner(row)}, "
                f"last heartbeat {now - row[4]:.0f} s ago)",
                StoreWarning,
                stacklevel=2,
            )
        conn.execute(
            "INSERT OR REPLACE INTO shoal_lock VALUES (1, ?, ?, ?, ?, ?)",
            (os.getpid(), hostname(), token, now, now),
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise StoreError(f"cannot lock store {path!r}: {exc}") from exc
    return token


def read_lock(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
    """The lock row ``(pid, host, token, started, heartbeat)``, or ``None``."""
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT pid, host, token, started, heartbeat FROM shoal_lock WHERE id = 1"
    ).fetchone()
    return row


def get_meta(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM shoal_meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]
