"""The ``mpi`` backend: the shoal API on MPI ranks.

Two ways to get ranks:

- **launch mode**: ``mpiexec -n N python -m shoal.mpi script.py``. Rank 0 runs the script; the
  other ranks are relays (:mod:`shoal.mpi._relay`), each with local worker processes run by
  shoal's Rust engine. ``mpi`` is then the default backend.
- **spawn mode**: from a plain ``python``, ``backend="mpi"`` spawns ``workers`` ranks with
  ``MPI_Comm_spawn``, each a relay with one worker.

This module is the rank-0 side: a :class:`_Link` to the relays (one receiver thread that polls
for their replies) and a :class:`MpiSession` that queues chunks and hands each to the relay with
the most free worker slots. Chunks and specs are pickled here exactly as for the processes
backend and cross to the relay as bytes; outcomes come back as the relay's workers made them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any

from .. import _native
from .._errors import PicklingError, ShoalError
from .._options import resolve_workers
from .._pickling import MAX_MESSAGE_BYTES, decode_outcome, dumps_items, dumps_spec
from .._spec import NO_LIMITS, CallSpec, ChunkResult, Crash, ItemError, Limits
from ._base import Backend, Pool, Session


def _spec_out_of_band(spec: CallSpec) -> tuple[bytes, list[memoryview]]:
    """The spec pickled for a relay's workers, with its large buffers (a big array in
    ``args=``, a ``functools.partial`` or ``shared=``) left out of the pickle.

    They cross MPI once per call and relay as raw buffers; the relay puts them in shared memory
    that all its workers map. Rank 0's ``sys.path`` travels in the same pickle.
    """
    import pickle

    from .. import _shm
    from .._pickling import _by_value_pickler, needs_by_value
    from ..mpi._wire import PathFirst

    buffers: list[memoryview] = []

    def out_of_band(buffer: Any) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: in the pickle
            return True
        if view.nbytes < _shm.THRESHOLD:
            return True
        buffers.append(view)
        return False

    payload = PathFirst(list(sys.path), spec)
    # The standard pickle first (C, a tenth of cloudpickle's time on a fresh Executor's first
    # submit); cloudpickle, by value, for what it cannot do or what the relays could not import
    # (a function of __main__ or of a module made at run time), as for any call (_pickling).
    try:
        body = pickle.dumps(payload, 5, buffer_callback=out_of_band)
        if not needs_by_value(body):
            return body, buffers
    except Exception:
        pass
    buffers.clear()
    try:
        body = _by_value_pickler().dumps(payload, 5, buffer_callback=out_of_band)
    except Exception:
        dumps_spec(spec)  # raises a PicklingError that names what failed
        raise
    return body, buffers


class RemoteCrash(Crash):
    """A :class:`Crash` on a serving rank; :meth:`locate` marks the error the driver makes."""

    def __init__(self, crash: Crash, rank: int, host: str) -> None:
        super().__init__(crash.pid, crash.exit, crash.kind, crash.limit, crash.rss)
        self.rank = rank
        self.host = host

    def locate(self, exc: BaseException) -> None:
        from ..mpi import place

        place(exc, self.rank, self.host)


class _RelayInfo:
    __slots__ = ("bell", "host", "pid", "rank", "workers")

    def __init__(self, rank: int, host: str, workers: int, pid: int, bell: str | None) -> None:
        self.rank = rank
        self.host = host
        self.workers = workers
        self.pid = pid
        #: The relay's doorbell, rung after each message to it; None if it is out of reach.
        self.bell = bell


class _Link:
    """Rank 0's connection to its relays: sends, and a thread that routes their replies."""

    def __init__(self, comm: Any, relay_ranks: list[int], *, hello_timeout: float = 60.0) -> None:
        from ..mpi._wire import TAG_CONTROL, Outbox

        self.comm = comm
        self.relays: dict[int, _RelayInfo] = {}
        self.sessions: dict[int, MpiSession] = {}
        self._sid = itertools.count(1)
        self._outbox = Outbox()
        self._data_lock = threading.Lock()
        self._stopped = False
        #: Why the link cannot be used any more (its receiver thread failed), or None.
        self.failure: str | None = None
        try:
            self._connect(relay_ranks, hello_timeout)
        except BaseException:
            # Relays that reported, or will, would wait for rank 0's messages forever.
            outbox = Outbox()
            with contextlib.suppress(BaseException):
                for rank in relay_ranks:
                    outbox.send(comm, ("stop",), rank, TAG_CONTROL)
                outbox.drain(0.5)
            raise
        self._thread = threading.Thread(target=self._receive, name="shoal-mpi-recv", daemon=True)
        self._thread.start()

    def _connect(self, relay_ranks: list[int], hello_timeout: float) -> None:
        """Wait for each relay's hello; set up the doorbells."""
        from mpi4py import MPI

        from ..mpi import hostname
        from ..mpi._wire import TAG_REPLY, Backoff, Bell, Poller, Ringer, use_bell

        comm = self.comm
        backoff = Backoff()
        deadline = time.monotonic() + hello_timeout
        waiting = set(relay_ranks)
        while waiting:
            if comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REPLY):
                message = comm.recv(source=MPI.ANY_SOURCE, tag=TAG_REPLY)
                if message[0] == "hello":
                    _, rank, host, workers, pid, bell = message
                    self.relays[rank] = _RelayInfo(rank, host, workers, pid, bell)
                    waiting.discard(rank)
                continue
            if time.monotonic() > deadline:
                raise ShoalError(f"MPI ranks {sorted(waiting)} did not report for service")
            backoff.sleep()
        self.workers = sum(r.workers for r in self.relays.values())
        # Doorbells between rank 0 and the relays of its host (see Bell): a ring that does not
        # get through (another host, or another network namespace) leaves that relay to probes.
        self._bell = Bell.create()
        self._ringer = Ringer()
        here = hostname()
        for relay in self.relays.values():
            if relay.bell is not None and not (
                relay.host == here and self._ringer.ring(relay.bell)
            ):
                relay.bell = None
        # A send makes a reply likely soon: the receiver then polls at its fastest again.
        self._poller = Poller(bell=self._bell)
        if self._bell is not None and all(r.bell for r in self.relays.values()):
            use_bell(self._poller)
        mine = None if self._bell is None else self._bell.name
        for relay in self.relays.values():
            rung = relay.bell is not None
            self.send(relay.rank, ("bell", mine if rung else None, rung))

    def send(
        self,
        rank: int,
        message: tuple[Any, ...],
        buffers: list[memoryview] = (),  # type: ignore[assignment]
        size: int = 0,
    ) -> None:
        """Send ``message`` (of about ``size`` bytes), then each of ``buffers`` as a raw
        message (not pickled).

        The message is posted without waiting (the receiver thread sees it complete); raw
        buffers, large by definition, go with a blocking send, which moves their data fastest.
        """
        from ..mpi._wire import TAG_CONTROL, TAG_DATA

        if not buffers:
            in_flight = self._outbox.send(self.comm, message, rank, TAG_CONTROL, size)
            bell = self.relays[rank].bell
            if bell is not None:
                self._ringer.ring(bell)
            if in_flight and self._bell is not None:
                # The receiver thread, which may sleep long, drives the transfer's progress.
                self._ringer.ring(self._bell.name)
        else:
            from mpi4py import MPI

            # One setup's buffers follow it in order on their own tag: never interleaved with
            # another thread's setup to the same rank.
            with self._data_lock:
                self._outbox.send(self.comm, message, rank, TAG_CONTROL, size)
                bell = self.relays[rank].bell
                if bell is not None:
                    self._ringer.ring(bell)
                for buf in buffers:
                    self.comm.Send([buf, MPI.BYTE], dest=rank, tag=TAG_DATA)
        self._poller.reset()

    def send_all(self, message: tuple[Any, ...]) -> None:
        for rank in self.relays:
            self.send(rank, message)

    def new_sid(self) -> int:
        return next(self._sid)

    def _receive(self) -> None:
        from mpi4py import MPI

        from ..mpi._wire import TAG_REPLY, fine_timer, receive

        fine_timer()
        status = MPI.Status()
        poller = self._poller
        outbox = self._outbox
        while not self._stopped:
            try:
                outbox.reap()
                found, message = receive(self.comm, MPI.ANY_SOURCE, TAG_REPLY, status)
                if not found:
                    poller.sleep(outbox.cap())
                    continue
                poller.received()
                source = status.Get_source()
            except BaseException as exc:
                if self._stopped or MPI.Is_finalized():  # MPI finalised under us at exit
                    return
                # Nothing would receive the relays' replies any more: every call fails
                # rather than waits forever.
                self._fail(f"rank 0's receiver thread failed: {type(exc).__name__}: {exc}")
                return
            session = self.sessions.get(message[1])
            if session is None:
                continue
            try:
                if message[0] == "done":
                    session._deliver(source, message[2])
                elif message[0] == "broken":
                    session._broken(source, message[2])
            except BaseException as exc:
                session._broken(
                    source, f"rank 0 could not take its results: {type(exc).__name__}: {exc}"
                )
            if poller.quiet():  # nothing else waits: the next probe comes after a ring
                poller.sleep(outbox.cap())

    def _fail(self, why: str) -> None:
        """The link is broken: fail every open call, and refuse new ones."""
        self.failure = why
        for session in list(self.sessions.values()):
            session._broken(None, why)

    def stop(self, *, disconnect: bool = False) -> None:
        """Tell every relay to exit; with ``disconnect``, drop the spawn intercommunicator."""
        if self._stopped:
            return
        self._stopped = True
        for rank in self.relays:
            with contextlib.suppress(Exception):
                self.send(rank, ("stop",))
        self._thread.join(1.0)
        # Relays that are gone never take their last messages: wait a little, not forever.
        self._outbox.drain(1.0)
        if disconnect:
            with contextlib.suppress(Exception):
                self.comm.Disconnect()


#: Wanted compute time of one chunk. A chunk costs rank 0 and a relay about 0.1-0.25 ms of CPU
#: each (messages, pickling, wake-ups), against some 30 us on the processes backend, so chunks
#: are longer than that backend's 4 ms; near the end of a call they still shrink to balance.
#: On 2 cores with 2 relays, 20 ms rather than 10 ms took a quarter to a third off that CPU
#: (W2, W4 of bench/mpi.py), which the workers of the node get back; 40 ms rather than 20 ms
#: took a tenth to a sixth more off it on W2, and of calls alternating between the two in one
#: job, most pairs were faster at 40 ms on W1, W2 and W3 (W4: level). 80 ms bought nothing.
TARGET_CHUNK_S = 0.04
#: Work (ns) that may wait on a relay behind its running chunks.
PIPELINE_NS = 8e6
#: Chunks longer than this (ns) are never queued behind another on a relay (a queued chunk
#: behind a long one could make a slow tail; for shorter ones, the round trip it hides is worth
#: more). Chunk times are wall times in a worker, longer on a loaded machine, and a heavy-tailed
#: call's chunks vary: hence the margin over the target.
LONG_CHUNK_NS = 2.5 * TARGET_CHUNK_S * 1e9


class MpiSession(Session):
    """One call's chunks on the relays; see the module docs."""

    #: Specs are kept only as the relays' pickled copies: an Executor need not unregister a
    #: function it no longer runs (each unregistering would cost a message to every relay,
    #: and the next submit of that function a new registration).
    holds_specs = False

    def __init__(self, link: _Link, *, ordered: bool, limits: Limits | None) -> None:
        lim = limits or NO_LIMITS
        self.link = link
        self.ordered = ordered
        self.sid = link.new_sid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[tuple[int, int, int, bytes, bool]] = deque()
        self._workers = {r.rank: r.workers for r in link.relays.values()}
        self._chunk_ns: float | None = None  # running mean of a chunk's compute time
        self._load = dict.fromkeys(link.relays, 0)
        self._where: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._raw: deque[tuple[int, tuple[Any, ...]]] = deque()
        self._parked: dict[int, ChunkResult] = {}
        self._next_out = 0
        self._seq = itertools.count()
        self._keys = itertools.count(1)
        self._sizers: dict[int, Any] = {}
        #: Registered specs: key -> (pickle, out-of-band buffers, their sizes, the relays that
        #: have it); see register().
        self._specs: dict[int, tuple[bytes, list[memoryview], list[int], set[int]]] = {}
        self._woken = False
        self._closed = False
        self._failure: str | None = None
        link.sessions[self.sid] = self
        if link.failure is not None:  # broke meanwhile
            self._failure = link.failure
        #: The session opens on a relay with the first message it sends there (one message
        #: fewer per relay and call, on the way to the first result).
        self._open = (
            "open",
            self.sid,
            lim.timeout,
            lim.max_tasks_per_worker,
            lim.max_worker_memory,
            lim.max_load,
            lim.max_memory,
        )
        self._opened: set[int] = set()
        self._send_lock = threading.Lock()

    def _send(
        self,
        rank: int,
        message: tuple[Any, ...],
        buffers: list[memoryview] = (),  # type: ignore[assignment]
        size: int = 0,
    ) -> None:
        """Send one of this session's messages to ``rank``, opening the session there first."""
        with self._send_lock:  # an "open" is never overtaken by the session's next message
            if rank not in self._opened:
                if message[0] == "close":
                    return  # never opened there
                self._opened.add(rank)
                message = (*self._open, message)
            self.link.send(rank, message, buffers, size)

    def _send_all(self, message: tuple[Any, ...]) -> None:
        for rank in self.link.relays:
            self._send(rank, message)

    @property
    def max_in_flight(self) -> int:  # type: ignore[override]
        """Chunks the driver may hold: few until a chunk has been timed (the first ones are
        single items of unknown cost), then enough that an early slow item, whose successors
        finish and wait for it in order, does not hold back new work while the ranks idle
        (a heavy-tailed call would otherwise lose about a tenth of its time)."""
        workers = self.link.workers
        if self._chunk_ns is None:
            return 2 * workers + 2
        return 4 * workers + 24

    # -- the contract ----------------------------------------------------------------------

    def register(self, spec: CallSpec) -> int:
        # Pickled now, so that a spec that cannot travel fails here; sent to a relay only with
        # the first task that goes there: a call that one relay serves alone (a single
        # future, a short map) neither wakes nor burdens the others.
        # A spec with large buffers (raw, blocking sends) goes everywhere now, from this
        # thread: _dispatch may run on the receiver thread, which must never block.
        body, buffers = _spec_out_of_band(spec)
        key = next(self._keys)
        self._sizers[key] = _native.ChunkSizer(self.link.workers, TARGET_CHUNK_S)
        self._specs[key] = (body, buffers, [b.nbytes for b in buffers], set())
        if buffers:
            with self._lock:
                for rank in self.link.relays:
                    self._ensure_setup(rank, key)
        return key

    def _ensure_setup(
        self, rank: int, key: int, then: tuple[Any, ...] | None = None, size: int = 0
    ) -> bool:
        """Send spec ``key`` to ``rank`` before its first task there (lock held); a spec without
        raw buffers carries ``then`` (that task, of ``size`` bytes) in the same message. Whether
        ``then`` went with it."""
        spec = self._specs.get(key)
        if spec is None or rank in spec[3]:
            return False
        body, buffers, sizes, sent_to = spec
        sent_to.add(rank)
        if buffers or then is None:
            self._send(rank, ("setup", self.sid, key, body, sizes), buffers, len(body))
            return False
        self._send(rank, ("setup", self.sid, key, body, sizes, then), size=len(body) + size)
        return True

    def unregister(self, spec_id: int) -> None:
        self._sizers.pop(spec_id, None)
        with self._lock:
            spec = self._specs.pop(spec_id, None)
        if spec is not None and not self._closed:
            for rank in spec[3]:
                self._send(rank, ("drop", self.sid, spec_id))

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        return int(self._sizers[spec_id].size(remaining))

    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        payload = dumps_items(items, start)
        if len(payload) > MAX_MESSAGE_BYTES:
            raise PicklingError(
                f"the arguments of items {start}..{start + len(items) - 1} pickle to "
                f"{len(payload)} bytes, over the channel limit of {MAX_MESSAGE_BYTES} bytes"
            )
        with self._lock:
            seq = next(self._seq)
            self._sizes[seq] = spec_id
            self._queue.append((seq, spec_id, len(items), payload, exclusive))
            self._dispatch()
        return seq

    def _dispatch(self) -> None:
        # Called with the lock held: hand queued chunks to the relays with free slots.
        while self._queue and not self._closed:
            free = {r: self._room(r) - load for r, load in self._load.items()}
            rank = max(free, key=free.__getitem__)
            if free[rank] <= 0:
                return
            seq, key, n, payload, exclusive = self._queue.popleft()
            self._load[rank] += 1
            self._where[seq] = rank
            task = ("task", self.sid, key, seq, n, payload, exclusive)
            if not self._ensure_setup(rank, key, task, len(payload)):
                self._send(rank, task, size=len(payload))

    def _room(self, rank: int) -> int:
        """Chunks a relay may hold: one per worker, plus some queued behind them so that no
        worker idles while a result travels back, as long as that queued work is short (the
        local engine's rule: a chunk never waits behind a long one, which would make a slow
        tail). Until the first chunk is measured, none waits."""
        workers = self._workers[rank]
        if self._chunk_ns is None:
            return workers
        queued = int(PIPELINE_NS // max(self._chunk_ns, 1.0))
        if self._chunk_ns < LONG_CHUNK_NS:
            queued = max(queued, 1)  # hides the round trip of one message
        return workers + min(queued, workers + 1)

    def _deliver(self, rank: int, outcomes: list[tuple[Any, ...]]) -> None:
        with self._cond:
            for outcome in outcomes:
                if outcome[1] == _native.OUTCOME_PARTIAL:
                    # A long chunk's first items: the chunk goes on, on the same rank.
                    if outcome[0] in self._where:
                        self._raw.append((rank, outcome))
                    continue
                if self._where.pop(outcome[0], None) is None:
                    continue  # cancelled meanwhile
                self._load[rank] -= 1
                self._raw.append((rank, outcome))
                if outcome[1] == _native.OUTCOME_DONE:
                    elapsed = float(outcome[3])
                    mean = self._chunk_ns
                    self._chunk_ns = elapsed if mean is None else 0.8 * mean + 0.2 * elapsed
            self._dispatch()
            self._cond.notify_all()

    def _broken(self, rank: int | None, message: str) -> None:
        """This call cannot go on (``rank``: the relay that says so, or None for rank 0)."""
        if rank is not None:
            relay = self.link.relays.get(rank)
            host = "?" if relay is None else relay.host
            message = f"rank {rank} (host {host}): {message}"
        with self._cond:
            self._failure = message
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._raw and not self._woken and self._failure is None:
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)  # short slices keep Ctrl-C responsive
            if self._failure is not None and not self._raw:
                raise ShoalError(f"an MPI rank could not run this call: {self._failure}")
            self._woken = False
            raw, self._raw = list(self._raw), deque()
        out = [self._decode(rank, outcome) for rank, outcome in raw]
        if not self.ordered:
            return out
        # Partial reports go out at once (they precede their chunk's own result).
        ready = [res for res in out if res.partial]
        for res in out:
            if not res.partial:
                self._parked[res.seq] = res
        while self._next_out in self._parked:
            ready.append(self._parked.pop(self._next_out))
            self._next_out += 1
        return ready

    def _decode(self, rank: int, outcome: tuple[Any, ...]) -> ChunkResult:
        from ..mpi import place
        from .processes import _crash

        seq, kind, payload, elapsed, pid, message = outcome
        host = self.link.relays[rank].host
        partial = kind == _native.OUTCOME_PARTIAL
        key = self._sizes.get(seq) if partial else self._sizes.pop(seq, None)
        if kind != _native.OUTCOME_DONE and not partial:
            return ChunkResult(seq, [], crash=RemoteCrash(_crash(kind, pid, message), rank, host))
        try:
            values, errors = decode_outcome(payload)
        except Exception as exc:
            failure = PicklingError(f"a result could not be unpickled on rank 0: {exc!r}")
            count = int(message) if partial else 1
            values = [None] * count
            errors = [ItemError(i, failure, "", "") for i in range(count)]
        for item_error in errors:
            place(item_error.exc, rank, host)
        if partial:
            return ChunkResult(seq, values, errors, partial=True)
        sizer = self._sizers.get(key) if key is not None else None
        if sizer is not None and values:
            sizer.record(len(values), elapsed)
        return ChunkResult(seq, values, errors, elapsed_ns=elapsed)

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        # A chunk already with a relay may be running there: like the cluster backends, every
        # chosen chunk is dropped (a running one's result is ignored when it comes back).
        with self._lock:
            if seqs is None:
                dropped = [job[0] for job in self._queue]
                self._queue.clear()
                dispatched = dict(self._where)
            else:
                drop = set(seqs)
                dropped = [job[0] for job in self._queue if job[0] in drop]
                self._queue = deque(job for job in self._queue if job[0] not in drop)
                dispatched = {s: r for s, r in self._where.items() if s in drop}
            dropped += list(dispatched)
            by_rank: dict[int, list[int]] = {}
            for seq, rank in dispatched.items():
                by_rank.setdefault(rank, []).append(seq)
                # A relay drops queued chunks without a word: count them free now (one that
                # already runs comes back and is ignored).
                del self._where[seq]
                self._load[rank] -= 1
                self._sizes.pop(seq, None)
            self._dispatch()
        for rank, on_rank in by_rank.items():
            self._send(rank, ("cancel", self.sid, None if seqs is None else on_rank))
        return sorted(dropped)

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self, *, abort: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self.link.sessions.pop(self.sid, None)
        if not self.link._stopped:
            self._send_all(("close", self.sid, abort))
        self._specs.clear()  # the buffers of the call's arguments


class MpiPool(Pool):
    """The relays of one link (launch mode: every other rank; spawn mode: the spawned ones)."""

    def __init__(self, link: _Link, *, owns_link: bool) -> None:
        self.link = link
        self.workers = link.workers
        self._owns_link = owns_link

    @property
    def relays(self) -> list[tuple[int, str, int]]:
        """``(rank, host, workers)`` of each serving rank."""
        return sorted((r.rank, r.host, r.workers) for r in self.link.relays.values())

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> MpiSession:
        if self.link._stopped:
            raise ShoalError("this MPI pool was shut down")
        if self.link.failure is not None:
            raise ShoalError(f"this MPI pool is broken: {self.link.failure}")
        return MpiSession(self.link, ordered=ordered, limits=limits)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        if self._owns_link:
            self.link.stop(disconnect=True)


def _spawn_link(workers: int) -> _Link:
    from ..mpi import MPIUnavailableError, hostname, library_name, require_mpi

    mpi = require_mpi()
    try:
        intercomm = mpi.COMM_SELF.Spawn(
            sys.executable,
            args=["-m", "shoal.mpi", "--serve", str(os.getpid()), hostname()],
            maxprocs=workers,
        )
    except Exception as exc:
        raise MPIUnavailableError(
            f"could not spawn {workers} MPI ranks with MPI_Comm_spawn "
            f"({library_name(mpi)}): {exc}. Start the job with "
            f"`mpiexec -n N python -m shoal.mpi script.py` instead"
        ) from exc
    link = _Link(intercomm, list(range(intercomm.Get_remote_size())))
    _SPAWNED.add(link)
    return link


_SPAWNED: weakref.WeakSet[_Link] = weakref.WeakSet()


@atexit.register
def _stop_spawned() -> None:
    # Spawned ranks would notice this process is gone (they watch its pid), but telling them
    # is quicker, and leaves MPI's finalisation nothing to wait for.
    for link in list(_SPAWNED):
        link.stop()


class MpiBackend(Backend):
    """Run tasks on MPI ranks (see the module docs).

    Parameters
    ----------
    workers : int, float or None
        Spawn mode: worker processes, one per spawned rank. Launch mode: ignored; every serving
        rank runs as many workers as its CPUs (:func:`shoal.cpu_count`).
    """

    name = "mpi"

    def __init__(self, workers: int | float | None = None) -> None:
        super().__init__(workers)
        from ..mpi import require_mpi

        require_mpi()  # fail at choice time, with the install hint, if MPI is missing

    def pool_size(self, workers: int | float | None) -> int:
        from .. import mpi

        if mpi._launch is None:
            return super().pool_size(workers)
        # Launch mode: the serving ranks' workers, whatever the setting (which is still
        # checked); counting this rank's CPUs would only cost time.
        if workers is not None:
            resolve_workers(workers)
        return int(mpi._launch.workers)

    def create_pool(self, workers: int, **options: Any) -> MpiPool:
        self.check_pool_options(options)
        from .. import mpi

        if mpi._launch is not None:
            return MpiPool(mpi._launch, owns_link=False)
        if mpi.in_mpi_job():
            raise ShoalError(
                "backend='mpi' inside an MPI job needs launch mode: run the script as "
                "`mpiexec -n N python -m shoal.mpi script.py` (or use shoal.spmd.run)"
            )
        return MpiPool(_spawn_link(workers), owns_link=True)
