"""SPMD on the processes backend: ranks are worker processes of a private pool of shoal's engine,
and collectives go through a coordinator thread in the calling process.

Each rank connects to the coordinator over a Unix socket (an abstract address: nothing on disk).
A collective is complete when every rank has called it; the coordinator then answers each rank.
Point-to-point messages wait in the coordinator until a matching ``recv``. A rank that raises,
dies or runs past ``timeout=`` ends the call: the engine stops the other ranks, even those
blocked in a collective, so nothing hangs.
"""

from __future__ import annotations

import contextlib
import operator
import os
import pickle
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from functools import reduce as _fold
from typing import Any

from . import _arrays, _frames
from ._comm import Comm, pickled

#: The rank's communicator while its function runs (in a worker process).
current: Comm | None = None


class LocalComm(Comm):
    """A rank's end: one socket to the coordinator, one request at a time."""

    def __init__(self, sock: socket.socket, rank: int, size: int) -> None:
        self.sock = sock
        self.rank = rank
        self.size = size
        # Large buffers of a collective go through shared memory (memfd segments that the
        # other ranks map). A segment must live until every rank has unpickled it, which is
        # certain once the *next* collective completes (every rank has called it): so each
        # collective's segments are closed at the end of the following one.
        self._segments: Any = None
        self._previous: Any = None
        # After an array reduce, peers may still be copying their result out of this rank's
        # segment: a collective that would overwrite all of it waits for them first (every
        # rank has the same value, as every rank makes the same calls).
        self._reads_pending = False
        self._layout = (0, 0)  # (items, item size) of the last array reduce

    def _pack(self, obj: Any, what: str) -> bytes:
        from .._shm import SegmentCache

        if self._segments is None:
            self._segments = SegmentCache()
        return pickled(obj, what, self.rank, self._segments)

    def _ask(self, head: tuple[Any, ...], parts: list[bytes] = ()) -> tuple[Any, list[bytearray]]:  # type: ignore[assignment]
        _frames.send(self.sock, head, parts)
        reply, data = _frames.recv(self.sock)
        if head[0] == "coll":
            self._release(self._previous)
            self._previous, self._segments = self._segments, None
        if reply[0] == "error":
            kind = {"ValueError": ValueError, "TypeError": TypeError}.get(reply[1], RuntimeError)
            raise kind(reply[2])
        return reply, data

    @staticmethod
    def _release(segments: Any) -> None:
        if segments is not None:
            segments.close()

    def finish(self) -> None:
        """After ``fn`` returned: wait for every rank (so none still maps this rank's last
        segments), then close them."""
        self.barrier()
        self._release(self._previous)
        self._release(self._segments)

    def _coll(
        self,
        kind: str,
        root: int,
        parts: list[bytes] = (),  # type: ignore[assignment]
        what: str | None = None,
        desc: str = "",
        meta: Any = None,
    ) -> tuple[Any, list[bytearray]]:
        # ``what`` is the collective the user called (a reduce is a gather underneath) and
        # ``desc`` describes this rank's object: the coordinator compares them across ranks.
        got = self._ask(("coll", kind, root, what or kind, desc, meta), parts)
        # Every rank has called this one: none still reads what an earlier one left.
        self._reads_pending = False
        return got

    def barrier(self) -> None:
        self._coll("allgather", 0, [self._pack(None, "barrier")], "barrier")

    def _wait_readers(self, what: str, obj: Any) -> None:
        # A barrier that still names the collective: if the ranks passed an array on some and
        # something else on others, the coordinator says so at once (a ValueError everywhere).
        if self._reads_pending:
            self._coll("allgather", 0, [self._pack(None, what)], what, _arrays.describe(obj))

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        self._check_root(root, "bcast")
        return self._bcast(obj, root, "bcast")

    def _bcast(self, obj: Any, root: int, what: str) -> Any:
        self._wait_readers(what, obj)
        parts: list[bytes] = []
        meta = None
        if self.rank == root:
            if self.size > 1 and _arrays.worth_placing(obj):
                meta = self._place(obj)
            else:
                parts = [self._pack(obj, what)]
        reply, data = self._coll("bcast", root, parts, what, meta=meta)
        if reply[1] is None:
            return obj if self.rank == root else _load(data[0])
        metas = [reply[1] if r == root else None for r in range(self.size)]
        value = obj if self.rank == root else self._fetch(metas, root)
        self.barrier()  # the root's segment is read
        return value

    def _place(self, arr: Any) -> tuple[str, tuple[int, ...], Any]:
        """Copy ``arr`` into this rank's segment; its description for the peers."""
        buffer, ref = _arrays.own(arr.nbytes)
        segment = _arrays.flat(buffer, arr.dtype, arr.size)
        segment.reshape(arr.shape)[...] = arr  # any layout
        return (arr.dtype.str, arr.shape, ref)

    def _fetch(self, metas: list[Any], rank: int) -> Any:
        """A new array holding what rank ``rank`` placed in its segment (see :meth:`_place`)."""
        np = sys.modules["numpy"]
        dtype, shape, _ = metas[rank]
        mapping = _arrays.peers([m and m[2] for m in metas], self.rank)[rank]
        result = np.empty(shape, dtype)
        result.reshape(-1)[...] = _arrays.flat(mapping, result.dtype, result.size)
        return result

    def scatter(self, seq: Sequence[Any] | None = None, root: int = 0) -> Any:
        self._check_root(root, "scatter")
        parts: list[bytes] = []
        if self.rank == root:
            if seq is None or not hasattr(seq, "__len__"):
                raise TypeError(
                    f"scatter: the root must pass a sequence of {self.size} parts, "
                    f"not {type(seq).__name__}"
                )
            parts = [self._pack(p, "scatter") for p in seq]
        _, data = self._coll("scatter", root, parts)
        return _load(data[0])

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        self._check_root(root, "gather")
        return self._gather(obj, root, "gather")

    def _gather(self, obj: Any, root: int | None, what: str) -> list[Any] | None:
        """``gather`` at ``root``, or ``allgather`` (``root`` None): arrays through the ranks'
        segments, anything else pickled."""
        self._wait_readers(what, obj)
        # The root keeps its own object: it need not cross (nor be copied) at all.
        part, meta = b"", None
        if root != self.rank:
            if self.size > 1 and _arrays.worth_placing(obj):
                meta = self._place(obj)
            else:
                part = self._pack(obj, what)
        kind = "gather" if root is not None else "allgather"
        reply, data = self._coll(kind, root or 0, [part], what, _arrays.describe(obj), meta)
        metas = reply[1]
        values = None
        if root is None or root == self.rank:
            values = [
                obj
                if r == self.rank
                else self._fetch(metas, r)
                if metas[r] is not None
                else _load(d)
                for r, d in enumerate(data)
            ]
        if any(m is not None for m in metas):
            self.barrier()  # the segments are read
        return values

    def reduce(self, obj: Any, op: Callable[[Any, Any], Any] = operator.add, root: int = 0) -> Any:
        self._check_root(root, "reduce")
        _check_op(op, "reduce")
        ufunc = _arrays.ufunc_for(obj, op, self.size)
        if ufunc is not None:
            return self._reduce_array("reduce", obj, ufunc, root)
        parts = self._gather(obj, root, "reduce")
        return None if parts is None else _fold(op, parts)

    def allreduce(self, obj: Any, op: Callable[[Any, Any], Any] = operator.add) -> Any:
        _check_op(op, "allreduce")
        ufunc = _arrays.ufunc_for(obj, op, self.size)
        if ufunc is not None:
            return self._reduce_array("allreduce", obj, ufunc, None)
        parts = self._gather(obj, 0, "allreduce")
        return self._bcast(None if parts is None else _fold(op, parts), 0, "allreduce")

    def _reduce_array(self, what: str, arr: Any, ufunc: Any, root: int | None) -> Any:
        """``reduce`` (at ``root``) or ``allreduce`` (``root`` None) of an array through the
        ranks' shared-memory segments (see :mod:`shoal.spmd._arrays`)."""
        np = sys.modules["numpy"]
        rank, size = self.rank, self.size
        mine = arr.reshape(-1) if arr.flags.c_contiguous else np.ravel(arr)
        count, dtype = mine.size, arr.dtype
        at = _arrays.bounds(count, size)
        buffer, ref = _arrays.own(arr.nbytes)
        segment = _arrays.flat(buffer, dtype, count)

        def place() -> None:
            # The parts the other ranks reduce: they read them from this rank's segment.
            for s in range(size):
                if s != rank:
                    segment[at[s] : at[s + 1]] = mine[at[s] : at[s + 1]]

        # Peers may still copy their result out of the last reduce: that part of each segment
        # is the one part not written before the exchange, if the parts fall where they did.
        # Else the parts are placed after it (every rank decides alike: if their arrays
        # differ, the exchange fails on every rank).
        early = not self._reads_pending or self._layout == (count, dtype.itemsize)
        if early:
            place()
        meta = (dtype.str, arr.shape, ufunc.__name__, ref)
        reply, _ = self._coll("array", root or 0, [], what, _arrays.describe(arr), meta)
        if not early:
            place()
            self.barrier()
        segments = [
            segment if s == rank else _arrays.flat(m, dtype, count)
            for s, m in enumerate(_arrays.peers(reply[1], rank))
        ]
        # Part ``rank`` of every array, in rank order, folded into part ``rank`` of this
        # rank's segment.
        lo, hi = at[rank], at[rank + 1]
        inputs = [mine[lo:hi] if s == rank else segments[s][lo:hi] for s in range(size)]
        out = segment[lo:hi]
        ufunc(inputs[0], inputs[1], out=out)
        for part in inputs[2:]:
            ufunc(out, part, out=out)
        self.barrier()  # every part is reduced
        self._reads_pending, self._layout = True, (count, dtype.itemsize)
        if root is not None and rank != root:
            return None
        result = np.empty(arr.shape, dtype)
        flat_result = result.reshape(-1)
        for s in range(size):
            flat_result[at[s] : at[s + 1]] = segments[s][at[s] : at[s + 1]]
        return result

    def allgather(self, obj: Any) -> list[Any]:
        return self._gather(obj, None, "allgather")  # type: ignore[return-value]

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._check_root(dest, "send")
        if isinstance(tag, bool) or not isinstance(tag, int):
            raise TypeError(f"send: tag must be an int, not {type(tag).__name__}")
        self._ask(("send", dest, tag), [pickled(obj, "send", self.rank)])

    def recv(self, source: int | None = None, tag: int | None = None) -> Any:
        if source is not None:
            self._check_root(source, "recv")
        _, data = self._ask(("recv", source, tag))
        return pickle.loads(data[0])


def _check_op(op: Any, what: str) -> None:
    if not callable(op):
        raise TypeError(f"{what}: op must be a binary callable, not {type(op).__name__}")


def _load(data: bytearray) -> Any:
    from .._shm import loads

    return loads(data)  # type: ignore[arg-type]


class _Collective:
    __slots__ = ("arrived",)

    def __init__(self) -> None:
        # rank -> (kind, root, what, desc, meta, parts); see LocalComm._coll
        self.arrived: dict[int, tuple[Any, ...]] = {}


class Coordinator:
    """The meeting point of one ``run``'s ranks, in the calling process (one thread per rank)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.address = f"\0shoal-spmd-{os.getpid()}-{uuid.uuid4().hex}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(size)
        self.lock = threading.Lock()
        self.conns: dict[int, socket.socket] = {}
        self.write_locks: dict[int, threading.Lock] = {}
        self.next_coll: dict[int, int] = {}
        self.colls: dict[int, _Collective] = {}
        self.mail: list[tuple[int, int, int, bytearray]] = []  # (dest, source, tag, blob)
        self.waiting: dict[int, tuple[int | None, int | None]] = {}
        self.mismatch: str | None = None
        self.closed = False
        threading.Thread(target=self._accept, name="shoal-spmd-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _reply(self, rank: int, head: tuple[Any, ...], parts: list[Any] = ()) -> None:  # type: ignore[assignment]
        # A rank that is gone is the driver's to report.
        with self.write_locks[rank], contextlib.suppress(OSError):
            _frames.send(self.conns[rank], head, parts)

    def _serve(self, sock: socket.socket) -> None:
        try:
            (_, rank), _ = _frames.recv(sock)
            with self.lock:
                self.conns[rank] = sock
                self.write_locks[rank] = threading.Lock()
                self.next_coll[rank] = 0
                everyone = len(self.conns) == self.size
            if everyone:
                # Ranks start together, so each holds its own worker: no rank can run later
                # in the process of one that already finished.
                for other in range(self.size):
                    self._reply(other, ("start",))
            while True:
                head, parts = _frames.recv(sock)
                self._handle(rank, head, parts)
        except (OSError, ConnectionError, EOFError):
            sock.close()

    def _handle(self, rank: int, head: tuple[Any, ...], parts: list[bytearray]) -> None:
        kind = head[0]
        if kind == "coll":
            with self.lock:
                k = self.next_coll[rank]
                self.next_coll[rank] = k + 1
                coll = self.colls.setdefault(k, _Collective())
                coll.arrived[rank] = (*head[1:], parts)
                if len(coll.arrived) < self.size:
                    return
                del self.colls[k]
            self._complete(k, coll)
        elif kind == "send":
            _, dest, tag = head
            with self.lock:
                self.mail.append((dest, rank, tag, parts[0]))
                match = self._match(dest)
            self._reply(rank, ("ok",))
            if match is not None:
                self._reply(dest, ("ok",), [match])
        elif kind == "recv":
            with self.lock:
                self.waiting[rank] = (head[1], head[2])
                match = self._match(rank)
            if match is not None:
                self._reply(rank, ("ok",), [match])

    def _match(self, dest: int) -> bytearray | None:
        # With the lock held: the first message for ``dest`` that its pending recv accepts.
        want = self.waiting.get(dest)
        if want is None:
            return None
        source, tag = want
        for i, (to, src, t, blob) in enumerate(self.mail):
            if to == dest and (source is None or src == source) and (tag is None or t == tag):
                del self.mail[i]
                del self.waiting[dest]
                return blob
        return None

    def _error(self, message: str) -> None:
        for rank in range(self.size):
            self._reply(rank, ("error", "ValueError", message))

    def _complete(self, k: int, coll: _Collective) -> None:
        arrived = coll.arrived
        calls = {rank: (a[0], a[1]) for rank, a in arrived.items()}
        n = self.size
        whats = {a[2] for a in arrived.values()}
        if len(set(calls.values())) > 1:
            if len(whats) == 1 and any(kind == "array" for kind, _ in calls.values()):
                # The same collective, with an array on some ranks and not on others.
                said = "; ".join(f"rank {r}: {arrived[r][3]}" for r in range(n))
                self._error(f"{whats.pop()}: the ranks passed different kinds of objects ({said})")
                return
            # Left unanswered, as MPI would hang; the timeout ends it and the note explains.
            what = ", ".join(f"rank {r}: {kd}(root={rt})" for r, (kd, rt) in sorted(calls.items()))
            self.mismatch = f"the ranks called different collectives (collective #{k}: {what})"
            return
        kind, root = calls[0]
        if kind == "array":
            metas = [arrived[r][4] for r in range(n)]
            if len({m[:3] for m in metas}) > 1:
                said = "; ".join(f"rank {r}: {arrived[r][3]}, op {metas[r][2]}" for r in range(n))
                self._error(
                    f"{whats.pop()}: every rank must pass an array of the same dtype and shape, "
                    f"with the same op ({said})"
                )
                return
            for rank in range(n):
                self._reply(rank, ("ok", [m[3] for m in metas]))
        elif kind == "bcast":
            meta = arrived[root][4]  # where the root placed an array; None if pickled
            for rank in range(n):
                self._reply(rank, ("ok", meta), arrived[root][-1] if rank != root else [])
        elif kind == "scatter":
            parts = arrived[root][-1]
            if len(parts) != n:
                msg = f"scatter: the root (rank {root}) gave {len(parts)} parts for {n} ranks"
                for rank in range(n):
                    self._reply(rank, ("error", "ValueError", msg))
                return
            for rank in range(n):
                self._reply(rank, ("ok",), [parts[rank]])
        elif kind == "gather":
            everything = [arrived[r][-1][0] for r in range(n)]
            metas = [arrived[r][4] for r in range(n)]
            for rank in range(n):
                self._reply(rank, ("ok", metas), everything if rank == root else [])
        elif kind == "allgather":
            everything = [arrived[r][-1][0] for r in range(n)]
            metas = [arrived[r][4] for r in range(n)]
            for rank in range(n):
                self._reply(rank, ("ok", metas), everything)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in list(self.conns.values()):
            with contextlib.suppress(OSError):
                sock.close()


class RankMain:
    """The task each rank's worker runs: connect, run ``fn`` with :func:`comm` set, return."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        address: str,
        size: int,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.address = address
        self.size = size
        # Error notes name the user's function, not this wrapper.
        self.__qualname__ = getattr(fn, "__qualname__", None) or repr(fn)

    def __call__(self, rank: int) -> Any:
        global current
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.address)
        _frames.send(sock, ("hello", rank))
        _frames.recv(sock)  # "start": every rank is connected
        comm = current = LocalComm(sock, rank, self.size)
        try:
            value = self.fn(*self.args, **self.kwargs)
            comm.finish()
            return rank, value
        except BaseException as exc:
            exc.add_note(f"shoal.spmd: raised on rank {rank} of {self.size}")
            raise
        finally:
            current = None
            sock.close()


#: Seconds that stand for "no timeout": the engine then still runs each rank alone on its worker.
_FOREVER = 10.0**9
_backends: dict[int, Any] = {}
_backends_lock = threading.Lock()


def _backend(size: int) -> Any:
    from ..backends.processes import ProcessBackend

    with _backends_lock:
        be = _backends.get(size)
        if be is None:
            be = _backends[size] = ProcessBackend(workers=size, idle_timeout=30.0)
        return be


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    size: int,
    timeout: float | None,
) -> list[Any]:
    """Run ``fn`` on ``size`` local ranks; see :func:`shoal.spmd.run`."""
    from .._api import as_completed
    from .._errors import TaskTimeoutError, WorkerCrashedError, WorkerMemoryError

    coordinator = Coordinator(size)
    main = RankMain(fn, args, kwargs, coordinator.address, size)
    be = _backend(size)
    be.pool().prestart()
    results: list[Any] = [None] * size
    try:
        for rank, value in as_completed(
            main, range(size), backend=be, timeout=timeout or _FOREVER, chunksize=1
        ):
            results[rank] = value
    except (WorkerCrashedError, TaskTimeoutError, WorkerMemoryError) as exc:
        exc.add_note(f"shoal.spmd: on rank {exc.index} of {size}")
        if isinstance(exc, TaskTimeoutError) and coordinator.mismatch:
            exc.add_note(f"shoal.spmd: {coordinator.mismatch}")
        raise
    finally:
        coordinator.close()
    return results
