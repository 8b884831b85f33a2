"""The backend contract: what any engine must provide so that every shoal API runs on it.

Three small classes, from long-lived to short-lived:

- :class:`Backend`: a kind of engine with its options (``"processes"``, ``"threads"``, a Dask
  client...). It creates :class:`Pool` objects, and keeps one shared pool per worker count for
  the top-level functions (:meth:`Backend.pool`).
- :class:`Pool`: a set of workers (processes, threads, MPI ranks, remote hosts).
- :class:`Session`: one stream of chunks with one completion queue. A ``map`` call opens one;
  an :class:`~shoal.Executor` opens one for all its futures.

A session only moves *chunks* (lists of items) under *registered specs* (function + fixed
arguments). Everything else (reading the input lazily, chunk sizes, bounded memory, ordering,
error policy, notes on exceptions) is done once, by the driver in :mod:`shoal._driver`, which
is why every backend behaves the same. A backend whose workers live on other hosts fits as is:
a spec and a chunk are plain picklable data.

To write a backend, subclass :class:`Backend` and implement :meth:`Backend.create_pool`, a
:class:`Pool` and a :class:`Session`. :class:`LocalSession` does most of the work for engines
that run Python callables in this process (threads, serial) and is a good model for others.
"""

from __future__ import annotations

import abc
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from .. import _native
from .._options import resolve_workers
from .._spec import CallSpec, ChunkResult, Limits

if TYPE_CHECKING:
    from collections.abc import Mapping


class Session(abc.ABC):
    """One stream of chunks with one completion queue (see the module docs)."""

    #: How many chunks the driver may have submitted and not yet received (it may grow during
    #: a call: the driver reads it before each submit).
    max_in_flight: int = 4

    #: Bytes of the last chunk passed to :meth:`submit` as it travels to a worker, if the
    #: session knows it (the driver then bounds read-ahead by it); ``None``: the driver
    #: estimates it.
    last_submit_nbytes: int | None = None

    #: The session times each item of a chunk itself against ``Limits.timeout`` (the slurm
    #: backend's tasks do); otherwise the driver sends single-item chunks under a timeout,
    #: because the engine times whole chunks.
    times_items: bool = False

    @abc.abstractmethod
    def register(self, spec: CallSpec) -> int:
        """Make ``spec`` available to the workers; return an id for :meth:`submit`.

        Raise :class:`~shoal.PicklingError` here if the spec cannot travel to the workers.
        """

    def unregister(self, spec_id: int) -> None:  # noqa: B027 - optional hook
        """Forget a spec (no chunk of it is queued any more)."""

    @abc.abstractmethod
    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        """Queue a chunk; return its sequence number (0, 1, 2, ... within the session).

        ``start`` is the input index of ``items[0]``, for error messages. An ``exclusive``
        chunk should run alone on its worker (nothing queued behind it), so that if the worker
        dies, this chunk is known to be the cause.
        """

    def submit_slice(self, spec_id: int, source: list[Any], lo: int, hi: int) -> int:
        """Queue ``source[lo:hi]`` as a chunk whose first input index is ``lo`` (the input is
        one list); as :meth:`submit`. A session that can send a range of the list without
        slicing it (the processes engine packs plain values straight from it) overrides this.
        """
        return self.submit(spec_id, source[lo:hi], lo)

    @abc.abstractmethod
    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        """Items to put in the next chunk (``remaining`` is the count left, if known)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None) -> list[ChunkResult]:
        """Block until at least one chunk finished (or ``timeout`` passed, or :meth:`wake`);
        return all finished chunks, in sequence order if the session is ordered.

        Must stay interruptible by Ctrl-C.
        """

    #: Whether the session keeps registered specs (and so their functions) as Python objects;
    #: an :class:`~shoal.Executor` unregisters a function it no longer runs from such a
    #: session, so that the function (a bound method: its object) can be freed.
    holds_specs: bool = True

    @abc.abstractmethod
    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        """Drop queued chunks that did not start: all of them, or those in ``seqs``.

        Returns the sequence numbers dropped; any other had started (or finished) and will
        report its result as usual.
        """

    def wake(self) -> None:  # noqa: B027 - optional hook
        """Make a blocked :meth:`wait` return early."""

    def hold_resources(self, item: Any, resources: Mapping[str, Any]) -> None:
        """Run ``item``, once submitted, with its own ``resources`` (and its retries too).

        Only sessions of a pool that :attr:`Pool.takes_resources` are asked (slurm).
        """
        raise NotImplementedError(f"{type(self).__name__} takes no per-task resources")

    @abc.abstractmethod
    def close(self, *, abort: bool = False) -> None:
        """End the session. With ``abort``, stop its running tasks if the engine can."""


class Pool(abc.ABC):
    """A set of workers; see the module docs."""

    workers: int

    #: ``Executor.submit(..., resources={...})`` goes to the session with its task (the slurm
    #: backend turns it into sbatch options); elsewhere ``resources`` is the function's own
    #: keyword argument.
    takes_resources: bool = False

    @abc.abstractmethod
    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> Session:
        """Open a session; ``ordered`` sessions return chunks in submission order.

        ``limits`` (per-item timeout, worker recycling, memory cap) must be enforced, or
        refused with a :class:`ValueError` naming the option, at this call.
        """

    @abc.abstractmethod
    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """Stop the workers (``kill``: at once). Idempotent."""


class Backend(abc.ABC):
    """A kind of engine; see the module docs.

    Parameters
    ----------
    workers : int, float or None
        Default pool size: a count, a fraction in (0, 1) of the usable CPUs, or ``None`` for all
        usable CPUs.
    """

    name: ClassVar[str] = "?"

    def __init__(self, workers: int | float | None = None) -> None:
        resolve_workers(workers)  # validate now, not at first use
        self.workers = workers
        self._pools: dict[tuple[Any, ...], Pool] = {}
        self._lock = threading.Lock()
        _ALL_BACKENDS.add(self)

    #: Per-pool options this backend honours besides ``workers`` (given per call, to an
    #: :class:`~shoal.Executor`, or to :meth:`pool`); others are refused by
    #: :meth:`check_pool_options`.
    pool_options: ClassVar[frozenset[str]] = frozenset()

    def check_pool_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The per-pool options that were set (not ``None``), validated.

        Raises
        ------
        ValueError
            For an option this backend cannot honour (it is never silently ignored).
        """
        given = {k: v for k, v in options.items() if v is not None}
        for name in given:
            if name not in self.pool_options:
                raise ValueError(
                    f"the {self.name} backend cannot honour {name}= (it has no worker "
                    f"processes of its own to configure); use the processes backend"
                )
        return given

    def pool(self, workers: int | float | None = None, **options: Any) -> Pool:
        """The shared pool of this backend for ``workers`` (default: the backend's setting) and
        per-pool ``options`` such as ``threads_per_worker``: one pool per distinct setting.

        Top-level calls reuse it, so they pay the start-up cost once.
        """
        n = self.pool_size(self.workers if workers is None else workers)
        given = self.check_pool_options(options)
        key = (n, *sorted(given.items()))
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = self.create_pool(n, **given)
            return pool

    def pool_size(self, workers: int | float | None) -> int:
        """The worker count a ``workers`` setting means here (``None``: all usable CPUs)."""
        return resolve_workers(workers)

    @abc.abstractmethod
    def create_pool(self, workers: int, **options: Any) -> Pool:
        """A new private pool of ``workers`` workers (the caller shuts it down); ``options``
        are per-pool options from :attr:`pool_options` that were set."""

    def shutdown(self, *, kill: bool = False) -> None:
        """Shut down the shared pools of this backend."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=not kill, kill=kill)

    def __repr__(self) -> str:
        return f"<shoal backend {self.name!r} workers={self.workers!r}>"


_ALL_BACKENDS: weakref.WeakSet[Backend] = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    # A forked child inherits pool objects but not their threads or workers: start afresh.
    for backend in list(_ALL_BACKENDS):
        backend._pools = {}
        backend._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def refuse_engine_limits(backend: str, limits: Limits | None) -> None:
    """Raise :class:`ValueError` for limits an in-process backend cannot enforce."""
    if limits is None:
        return
    for name in ("timeout", "max_tasks_per_worker", "max_worker_memory", "max_load", "max_memory"):
        if getattr(limits, name) is not None:
            raise ValueError(
                f"the {backend} backend cannot honour {name}= (only the processes engine can "
                f"stop, replace or hold back tasks); use the processes backend"
            )


class LocalSession(Session):
    """A session for engines that run callables in this process (threads, serial).

    Subclasses decide where a chunk runs by overriding :meth:`_enqueue`; a runner calls
    :meth:`_run` for a queued chunk, which records its result. Ordering, cancellation, waiting
    and chunk sizing are handled here.
    """

    def __init__(self, *, ordered: bool, workers: int) -> None:
        self.ordered = ordered
        self.max_in_flight = 2 * workers + 2
        self._specs: dict[int, CallSpec] = {}
        self._sizers: dict[int, Any] = {}
        self._spec_ids = 0  # never reused: an id freed by unregister may still be queued
        self._workers = workers
        self._next_seq = 0
        self._next_out = 0
        self._parked: dict[int, ChunkResult] = {}
        self._ready: deque[ChunkResult] = deque()
        self._cond = threading.Condition()
        self._queued: set[int] = set()  # submitted, not started, not cancelled
        self._closed = False
        self._woken = False

    def register(self, spec: CallSpec) -> int:
        self._spec_ids += 1
        spec_id = self._spec_ids
        self._specs[spec_id] = spec
        self._sizers[spec_id] = _native.ChunkSizer(self._workers)
        return spec_id

    def unregister(self, spec_id: int) -> None:
        self._specs.pop(spec_id, None)
        self._sizers.pop(spec_id, None)

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        return int(self._sizers[spec_id].size(remaining))

    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        seq = self._next_seq
        self._next_seq += 1
        with self._cond:
            self._queued.add(seq)
        self._enqueue(seq, spec_id, items, start)
        return seq

    @abc.abstractmethod
    def _enqueue(self, seq: int, spec_id: int, items: list[Any], start: int) -> None:
        """Arrange for ``self._run(seq, spec_id, items, start)`` to be called."""

    #: Held around each seeded item when items share this process's global random state
    #: concurrently (threads); ``None`` when they run one at a time.
    _seed_lock: Any = None

    def _skipped(self, seq: int) -> bool:
        return self._closed or seq not in self._queued

    def _run(self, seq: int, spec_id: int, items: list[Any], index: int = 0) -> None:
        from .._execute import run_chunk

        with self._cond:  # starting and cancelling exclude each other
            if self._skipped(seq):
                return
            self._queued.discard(seq)
        spec = self._specs[spec_id]
        start = time.perf_counter_ns()
        values, errors = run_chunk(spec, items, index, self._seed_lock)
        elapsed = time.perf_counter_ns() - start
        sizer = self._sizers.get(spec_id)
        if sizer is not None:
            sizer.record(len(items), elapsed)
        self._deliver(ChunkResult(seq, values, errors, elapsed_ns=elapsed))

    def _deliver(self, result: ChunkResult) -> None:
        with self._cond:
            if self._closed:
                return
            if self.ordered:
                self._parked[result.seq] = result
                while self._next_out in self._parked:
                    self._ready.append(self._parked.pop(self._next_out))
                    self._next_out += 1
            else:
                self._ready.append(result)
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ready and not self._woken:
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                # Short slices keep Ctrl-C responsive in the main thread.
                self._cond.wait(left)
            self._woken = False
            out = list(self._ready)
            self._ready.clear()
            return out

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        with self._cond:
            if seqs is None:
                dropped = sorted(self._queued)
                self._queued.clear()
            else:
                dropped = [seq for seq in seqs if seq in self._queued]
                self._queued.difference_update(dropped)
        return dropped

    def close(self, *, abort: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        from .._context import release

        for spec in self._specs.values():
            if spec.context is not None:
                release(spec.context.key)
