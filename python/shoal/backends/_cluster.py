"""What the Dask and Ray backends share: a session over an engine's futures.

The engine sees one task per chunk (:func:`shoal.backends._remote.run_remote`) and one copy of
each call's spec; the driver (:mod:`shoal._driver`) does everything else, as on the processes
backend. A subclass says how to send the spec (:meth:`ClusterSession._put_spec`), how to start
a chunk (:meth:`ClusterSession._start`), how to stop chunks (:meth:`ClusterSession._stop`) and
how finished chunks come back (:meth:`ClusterSession._collect`).
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
import uuid
from typing import Any

from .. import _native
from .._errors import PicklingError
from .._options import resolve_workers
from .._pickling import decode_outcome, dumps_items
from .._spec import CallSpec, ChunkResult, Crash, ItemError, Limits
from ._base import Backend, Pool, Session
from ._remote import dumps_remote_spec

#: Wanted compute time of one chunk. An engine's task costs about a millisecond of scheduling
#: and messages, against tens of microseconds for the processes backend, so chunks are longer
#: than that backend's 4 ms.
TARGET_CHUNK_S = 0.05

#: How long one slice of a blocking wait lasts: Ctrl-C and wake() are heard between slices.
SLICE_S = 0.05


#: Shortest worthwhile compute time of a chunk. The tail of a call shrinks chunks to balance the
#: workers, but an engine's round trip costs 5-15 ms here (against microseconds for the
#: processes engine, whose floor is 1 ms), so a shorter chunk buys nothing.
MIN_CHUNK_S = 0.01
#: Most items in one chunk (as the native policy).
MAX_CHUNK = 50_000


class ChunkSizer:
    """shoal's adaptive chunk sizes (:class:`shoal._native.ChunkSizer`), with a floor of
    :data:`MIN_CHUNK_S` of compute per chunk."""

    def __init__(self, workers: int, target_chunk_s: float) -> None:
        self._policy = _native.ChunkSizer(workers, target_chunk_s)
        self._items = 0.0
        self._ns = 0.0

    def record(self, items: int, elapsed_ns: int) -> None:
        self._policy.record(items, elapsed_ns)
        # The same decaying average as the native policy, for the floor.
        self._items = self._items * 0.5 + max(items, 1)
        self._ns = self._ns * 0.5 + elapsed_ns

    def size(self, remaining: int | None) -> int:
        size = int(self._policy.size(remaining))
        if self._items and self._ns:
            floor = min(int(MIN_CHUNK_S * 1e9 * self._items / self._ns), MAX_CHUNK)
            if remaining is not None:
                floor = min(floor, remaining)
            size = max(size, floor)
        return max(1, size)


def refuse(
    backend: str, limits: Limits | None, allowed: tuple[str, ...], why: dict[str, str]
) -> None:
    """Raise :class:`ValueError` for a limit the backend cannot honour (``why`` says why)."""
    if limits is None:
        return
    for name in ("timeout", "max_tasks_per_worker", "max_worker_memory", "max_load", "max_memory"):
        if name not in allowed and getattr(limits, name) is not None:
            raise ValueError(f"the {backend} backend cannot honour {name}=: {why[name]}")


#: Why a cluster backend refuses the machine-wide limits of the processes backend.
NOT_ON_A_CLUSTER = (
    "it holds back new items while the driver's machine is busy, which says nothing about a "
    "cluster's machines; size the cluster (or its workers' resources) instead"
)


class ClusterSession(Session):
    """One call (or Executor) on a cluster engine; see the module docs."""

    engine = "?"
    #: Longest slice of a blocking wait (Ctrl-C and wake() are heard between slices).
    slice_s = SLICE_S

    def __init__(self, *, ordered: bool, slots: int, target_chunk_s: float) -> None:
        self.ordered = ordered
        self.slots = max(1, slots)
        # One chunk per worker thread, and one waiting behind it so no thread idles for a round
        # trip. A chunk queued next to one that kills its worker is re-run, never lost.
        self.max_in_flight = 2 * self.slots
        self._target = target_chunk_s
        self._prefix = f"shoal-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)
        self._specs: dict[int, tuple[str, Any]] = {}
        self._sizers: dict[int, Any] = {}
        self._next_seq = 0
        self._next_out = 0
        self._parked: dict[int, ChunkResult] = {}
        self._cond = threading.Condition()
        self._woken = False
        self._closed = False
        #: seq -> (spec id, number of items, the engine's handle or None while held back)
        self._live: dict[int, tuple[int, int, Any]] = {}
        # An Executor submits from its callers' threads while its pump thread waits: this lock
        # guards the session's state (never held while blocking on the engine for long).
        self._lock = threading.RLock()

    # -- specs ----------------------------------------------------------------------------

    def register(self, spec: CallSpec) -> int:
        blob = dumps_remote_spec(spec)
        spec_id = next(self._ids)
        token = f"{self._prefix}-{spec_id}"
        self._specs[spec_id] = (token, self._put_spec(blob))
        self._sizers[spec_id] = ChunkSizer(self.slots, self._target)
        return spec_id

    def unregister(self, spec_id: int) -> None:
        entry = self._specs.pop(spec_id, None)
        self._sizers.pop(spec_id, None)
        if entry is not None:
            self._drop_spec(entry[1])

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        return int(self._sizers[spec_id].size(remaining))

    # -- chunks ---------------------------------------------------------------------------

    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        payload = dumps_items(items, start)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            token, handle = self._specs[spec_id]
            self._live[seq] = (spec_id, len(items), None)
            task = self._start(seq, spec_id, token, handle, payload)
            if task is not None:
                self._live[seq] = (spec_id, len(items), task)
        return seq

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[ChunkResult] = []
        while True:
            left = self.slice_s
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
            results = self._collect(max(0.0, left))
            with self._lock:
                for res in results:
                    self._order(res, out)
            with self._cond:
                woken, self._woken = self._woken, False
            if out or woken or self._closed:
                return out
            if deadline is not None and time.monotonic() >= deadline:
                return out

    def _order(self, res: ChunkResult, out: list[ChunkResult]) -> None:
        if not self.ordered:
            out.append(res)
            return
        self._parked[res.seq] = res
        while self._next_out in self._parked:
            out.append(self._parked.pop(self._next_out))
            self._next_out += 1

    def _finished(self, seq: int, outcome: tuple[bytes, int, int]) -> ChunkResult | None:
        """The result of a chunk whose task returned ``outcome`` (``None`` if it was dropped)."""
        entry = self._live.pop(seq, None)
        if entry is None:
            return None
        spec_id, count, _ = entry
        blob, elapsed, _pid = outcome
        try:
            values, errors = decode_outcome(blob)
        except Exception as exc:
            err = PicklingError(f"a result could not be unpickled in the driver: {exc!r}")
            values, errors = [None], [ItemError(0, err, "", "")]
        sizer = self._sizers.get(spec_id)
        if sizer is not None:
            sizer.record(count, elapsed)
        return ChunkResult(seq, values, errors, elapsed_ns=elapsed)

    def _crashed(self, seq: int, crash: Crash) -> ChunkResult | None:
        """The result of a chunk whose task failed in the engine (``None`` if dropped)."""
        if self._live.pop(seq, None) is None:
            return None
        return ChunkResult(seq, [], crash=crash)

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        # The engine cannot tell a queued task from a running one without a round trip: every
        # chosen chunk is dropped (a running one may finish in the background, unseen).
        with self._lock:
            chosen = list(self._live) if seqs is None else [s for s in seqs if s in self._live]
            handles = [h for h in (self._live.pop(s)[2] for s in chosen) if h is not None]
            if self.ordered:
                # Dropped chunks must not hold back the ones after them.
                self._parked.update({s: ChunkResult(s, []) for s in chosen})
            if handles:
                self._stop(handles)
        return chosen

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self, *, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.wake()
        with self._lock:
            handles = [entry[2] for entry in self._live.values() if entry[2] is not None]
            self._live.clear()
            if handles:
                self._stop(handles)
            for _, handle in self._specs.values():
                self._drop_spec(handle)
            self._specs.clear()
        self._forget(self._prefix)

    # -- what an engine provides ------------------------------------------------------------

    @abc.abstractmethod
    def _put_spec(self, blob: bytes) -> Any:
        """Send a spec to the cluster once; return the handle chunks pass to their task."""

    def _drop_spec(self, handle: Any) -> None:
        """Let the engine free a spec."""

    @abc.abstractmethod
    def _start(self, seq: int, spec_id: int, token: str, spec: Any, payload: bytes) -> Any:
        """Start one chunk's task; return its handle (or ``None``, and set it in ``_live``
        when the task is started later)."""

    @abc.abstractmethod
    def _collect(self, timeout: float) -> list[ChunkResult]:
        """Results of chunks that finished, waiting up to ``timeout`` for the first.

        Called by one thread at a time; take ``_lock`` around changes to ``_live``, and do not
        hold it while blocking."""

    @abc.abstractmethod
    def _stop(self, handles: list[Any]) -> None:
        """Cancel these tasks (queued ones at least); their results are not wanted."""

    def _forget(self, prefix: str) -> None:
        """Let workers drop their cached specs of this session."""


class ClusterPool(Pool):
    """The workers of a cluster, as seen by one backend: ``workers`` bounds chunks in flight.

    ``workers=0`` stands for the whole cluster, read again at each call (it may grow).
    """

    def __init__(self, backend: ClusterBackend, workers: int) -> None:
        self.backend = backend
        self._workers = workers

    @property
    def workers(self) -> int:  # type: ignore[override]
        total = self.backend.cluster_slots()
        return total if self._workers == 0 else min(self._workers, max(total, 1))

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        # The cluster belongs to the backend (or to the user): a pool has nothing of its own.
        pass


class ClusterBackend(Backend):
    """A backend on a cluster engine (Dask, Ray): the cluster's threads are the workers."""

    def pool_size(self, workers: int | float | None) -> int:
        # None means the whole cluster, read again at each call (0 stands for it).
        return 0 if workers is None else resolve_workers(workers)

    @abc.abstractmethod
    def cluster_slots(self) -> int:
        """Tasks the cluster runs at once (its worker threads or CPUs); starts it if needed."""
