"""What rank 0 (the driver) and a serving rank (a relay) say to each other.

Every message is a tuple whose first element names it. They travel on a communicator of their
own (a duplicate of the world, or the spawn intercommunicator), so user code that also uses
``MPI.COMM_WORLD`` never receives them.

driver -> relay (tag :data:`TAG_CONTROL`)::

    ("open", sid, timeout, max_tasks_per_worker, max_worker_memory, max_load, max_memory,
     first)                                       first: the session's first message to
                                                  this relay, handled right after
    ("setup", sid, spec_key, body, sizes)         once per call and relay; then one raw
                                                  message (TAG_DATA) per size: the spec's
                                                  large buffers, out of band
    ("drop", sid, spec_key)
    ("task", sid, spec_key, seq, n_items, payload, exclusive)
    ("cancel", sid, seqs)                         seqs: list, or None for all
    ("bell", name, rings_yours)                   rank 0's Bell (None if the relay is on
                                                  another host), and whether rank 0 rings
                                                  the relay's
    ("close", sid, abort)
    ("spmd", call_bytes)                          take part in rank 0's shoal.spmd.run
    ("stop",)

relay -> driver (tag :data:`TAG_REPLY`)::

    ("hello", rank, host, workers, pid, bell)     bell: the relay's Bell name, or None
    ("done", sid, [(seq, kind, payload, elapsed_ns, pid, message), ...])
    ("broken", sid, message)                      the relay's engine failed for this session
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any

TAG_CONTROL = 0x5A01
TAG_REPLY = 0x5A02
#: Raw buffers that follow a "setup" message, in order.
TAG_DATA = 0x5A03


class Backoff:
    """Sleeps between non-blocking probes: short right after traffic, longer when idle.

    Open MPI's blocking receives spin a core at 100 %; a relay or the driver's receiver would
    then steal a CPU from the workers on its node. Polling with a growing sleep costs a few
    microseconds of CPU per probe and at most ``longest`` seconds of latency when idle.
    """

    __slots__ = ("delay", "longest", "shortest")

    def __init__(self, shortest: float = 2e-4, longest: float = 0.001) -> None:
        self.shortest = shortest
        self.longest = longest
        self.delay = shortest

    def reset(self) -> None:
        self.delay = self.shortest

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.longest, self.delay * 1.5)


class Poller:
    """Sleeps between the non-blocking probes of a thread that waits for MPI messages.

    Open MPI's blocking receives spin a core, so a relay and rank 0's receiver probe and sleep
    instead. Right after traffic the next message is usually an answer that comes within a few
    tens of microseconds (rank 0 answers a result with the next chunk; a relay answers a chunk
    with its result), so the sleeps start at ``shortest`` and double up to ``longest``: a quick
    answer is seen quickly, while an idle thread wakes at most every ``longest`` seconds (a
    wake-up and probe cost about 15 us of CPU, so about 1.5 % of a core at 1 ms).

    With a :class:`Bell` that the peers ring after each message they send, a sleep ends at
    once when one does, and ``longest`` can be longer (:data:`BELL_LONGEST`): the probes are
    then a safety net, not what notices messages.
    """

    __slots__ = ("bell", "delay", "expected", "longest", "rang_at", "rung", "shortest")

    def __init__(
        self, shortest: float = 2e-5, longest: float = 0.001, bell: Bell | None = None
    ) -> None:
        self.shortest = shortest
        self.longest = longest
        self.delay = shortest
        self.bell = bell
        #: Rings not yet matched by a message received: their messages are on their way.
        self.expected = 0
        #: Whether every peer rings the bell after each message (see :func:`use_bell`).
        self.rung = False
        #: When the last ring came (``time.perf_counter``).
        self.rang_at = 0.0

    def reset(self) -> None:
        """Traffic just passed: probe at the fastest again."""
        self.delay = AFTER_RING if self.expected else self.shortest

    def received(self) -> None:
        """A message was received (and handled)."""
        self.expected = max(0, self.expected - 1)
        self.reset()

    def quiet(self) -> bool:
        """Whether no message can be waiting: every peer rings, and no ring is unmatched.

        A probe then would find nothing, and an empty probe is not free: besides the wake-up,
        Open MPI with more ranks than cores yields the CPU in it (``sched_yield``), a context
        switch on a node whose cores the workers keep busy.
        """
        return self.rung and not self.expected

    def sleep(self, cap: float | None = None) -> None:
        """Sleep until the next probe (at most ``cap`` seconds)."""
        if self.expected and time.perf_counter() - self.rang_at < SPIN_AFTER_RING:
            # A ring's message was not there at the last probe: it comes within microseconds,
            # while a sleep, however short, costs a wake-up that comes late on a busy node.
            return
        delay = self.delay if cap is None else min(self.delay, cap)
        if self.bell is not None:
            rings = self.bell.wait(delay)
            if rings:
                # Its message may reach this side's MPI some microseconds after the ring.
                self.expected += rings
                self.rang_at = time.perf_counter()
                self.delay = AFTER_RING
                return
            if delay >= STALE_RING:
                # A ring's message would be here by now: it was taken with an earlier one
                # (or the ring was this process's own, to wake it).
                self.expected = 0
        else:
            time.sleep(delay)
        self.delay = min(self.longest, self.delay * 2)


#: Shortest and longest sleeps between probes of a thread whose peers all ring its
#: :class:`Bell` (after a ring, a message that is not there yet is probed for again soon).
#: Equal: every message is rung for, so a probe soon after traffic would find nothing; each
#: one costs a wake-up (15-40 us of CPU) that the workers of a busy node need.
BELL_SHORTEST = 0.05
BELL_LONGEST = 0.05
#: Seconds after which a ring whose message was not found is forgotten.
STALE_RING = 1e-3
#: First sleep after a ring whose message was not there yet.
AFTER_RING = 1e-5
#: Seconds after a ring during which a probe that finds nothing is repeated at once.
SPIN_AFTER_RING = 5e-5
#: While its sends of the last :data:`SENDING_WINDOW` seconds are not complete, a thread
#: probes at least this often: a large message over copy-in/copy-out shared memory or TCP
#: needs the sender's progress for each fragment.
SENDING_LONGEST = 1e-4
SENDING_WINDOW = 0.05
#: The longest sleep of a polling thread while a small send of its process is in flight.
SMALL_SENDING_LONGEST = 0.005
#: Messages under this many bytes go by MPI's eager protocol (Open MPI's shared-memory and
#: TCP transports send at least 4 KiB eagerly): no progress of the sender is needed.
EAGER_BYTES = 4096


def use_bell(poller: Poller) -> None:
    """Every peer of ``poller``'s thread rings its bell: probes become a safety net."""
    poller.shortest = BELL_SHORTEST
    poller.longest = BELL_LONGEST
    poller.rung = True


#: File descriptors from this number on are beyond ``select()`` (FD_SETSIZE).
SELECT_LIMIT = 1024


class Bell:
    """A doorbell: a datagram socket in Linux's abstract namespace that processes of the same
    host (and network namespace) ring after sending an MPI message to its owner, so that the
    owner's :class:`Poller` wakes at once instead of at its next probe.

    MPI has no way to wait for a message without spinning; this gives ranks on one node (the
    usual case, and the bench's) both a low latency and idle threads that seldom wake.
    Ranks on other hosts cannot ring it, and their messages are seen by the probes.
    """

    def __init__(self) -> None:
        import socket
        import uuid

        self.name = f"\0shoal-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self.name)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    @classmethod
    def create(cls) -> Bell | None:
        """A bell, or ``None`` where abstract sockets do not exist (not Linux)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for a ring; the number of rings (all consumed)."""
        import select

        if self._sock.fileno() < SELECT_LIMIT:
            ready: Any = select.select([self._sock], [], [], timeout)[0]  # microseconds
        else:  # select() cannot watch it; poll() can, to the millisecond
            watch = select.poll()
            watch.register(self._sock, select.POLLIN)
            ready = watch.poll(max(1, math.ceil(timeout * 1e3)))
        rings = 0
        while ready:
            try:
                self._sock.recv(64)
            except OSError:  # none left (BlockingIOError), or the socket is closed
                break
            rings += 1
        return rings

    def close(self) -> None:
        self._sock.close()


class Ringer:
    """Rings other processes' bells (one socket, shared by the threads of a process)."""

    def __init__(self) -> None:
        import socket

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self, name: str) -> bool:
        """Ring ``name``; ``False`` if there is no such bell here."""
        try:
            self._sock.sendto(b"!", name)
        except BlockingIOError:  # rung many times already, and not yet woken: it will be
            return True
        except OSError:
            return False
        return True


#: Timer slack (ns) of a polling thread; Linux's default of 50 us would more than double the
#: shortest sleeps of :class:`Poller`.
POLL_TIMER_SLACK_NS = 5_000


def fine_timer() -> None:
    """Give the calling thread a small timer slack (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, POLL_TIMER_SLACK_NS, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):  # no libc symbols (static builds): keep the default
        pass


class Outbox:
    """Messages sent without waiting: each is posted with a non-blocking send, and its request
    is kept (with the buffer it holds) until it completes.

    Open MPI's blocking send of anything but a tiny message returns only once the receiver has
    taken it (its shared-memory fragments come back from the receiver), spinning a core
    meanwhile: a send to a relay that sleeps between probes would cost up to a poll interval
    of busy CPU, and hold up whoever sends. :meth:`reap` is called from a polling loop (which
    also drives MPI's progress); :meth:`drain` before leaving.
    """

    __slots__ = ("_lock", "_pending", "_posted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._posted = 0.0

    def send(self, comm: Any, message: object, dest: int, tag: int, size: int = 0) -> bool:
        """Post ``message`` (pickled; ``size``: about how many bytes that makes). Whether its
        transfer needs this side's progress: the polling thread, if it sleeps long, must then
        be woken to drive it.

        A small message is copied to the receiver at once (MPI's eager protocol); its request
        completes only once the receiver has taken it, which needs nothing more from this
        side, so it is reaped at the next wake-up that comes anyway. Polling fast for it
        would cost a wake-up and an empty probe every :data:`SENDING_LONGEST`.
        """
        with self._lock:
            request = comm.isend(message, dest=dest, tag=tag)
            # A test drives MPI's progress: the message is handed to the transport now rather
            # than at this process's next probe (the receiver may be woken before that).
            if request.Test():
                return False
            self._pending.append(request)
            if size < EAGER_BYTES:
                return False
            self._posted = time.monotonic()
            return True

    def cap(self) -> float | None:
        """The longest sleep for the polling thread that drives these sends' progress."""
        if not self._pending:
            return None
        if time.monotonic() - self._posted < SENDING_WINDOW:
            return SENDING_LONGEST
        # Small sends only: should the transport have had no room for one (it then waits in
        # this side's queue for MPI's progress), it still goes within this bound.
        return SMALL_SENDING_LONGEST

    def reap(self) -> None:
        """Forget the sends that have completed."""
        if self._pending:
            with self._lock:
                self._pending = [req for req in self._pending if not req.Test()]

    def drain(self, timeout: float) -> bool:
        """Wait (sleeping, not spinning) until every send completed or ``timeout`` passed;
        whether all did."""
        deadline = time.monotonic() + timeout
        poller = Poller()
        while True:
            self.reap()
            if not self._pending:
                return True
            if time.monotonic() > deadline:
                return False
            poller.sleep()

    def __len__(self) -> int:
        return len(self._pending)


def complete(request: Any, *, raw: bool = False) -> Any:
    """Wait for a receive request without spinning; the object received (``None`` for a
    ``raw`` buffer receive)."""
    # Called once a probe matched the message: its data is on its way (a large one over TCP
    # needs this side's progress for each fragment), so the sleeps stay short.
    poller = Poller(shortest=5e-6, longest=1e-4)
    while True:
        if raw:
            if request.Test():
                return None
        else:
            done, obj = request.test()
            if done:
                return obj
        poller.sleep()


def receive(comm: Any, source: int, tag: int, status: Any) -> tuple[bool, Any]:
    """``(True, message)`` if a message from ``source`` with ``tag`` is there, else
    ``(False, None)``; never blocks for long, nor spins (a large message is taken with a
    non-blocking receive that sleeps between tests while the sender transfers it)."""
    found = comm.improbe(source=source, tag=tag, status=status)
    if found is None:
        return False, None
    return True, complete(found.irecv())


def load_with_path(path: list[str], blob: bytes) -> object:
    """Unpickle ``blob`` after putting rank 0's ``sys.path`` entries on this process's path.

    A call spec crosses to a relay's workers wrapped in this, so that functions pickled by
    reference (``module.function``) import there as they do on rank 0, whatever the script
    added to ``sys.path`` after the job started.
    """
    import pickle
    import sys

    for entry in reversed(path):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    return pickle.loads(blob)


class WithPath:
    """Pickles as :func:`load_with_path` of rank 0's path and an inner pickle."""

    __slots__ = ("blob", "path")

    def __init__(self, path: list[str], blob: bytes) -> None:
        self.path = path
        self.blob = blob

    def __reduce__(self) -> tuple[object, ...]:
        return (load_with_path, (self.path, self.blob))


def _set_path(path: list[str]) -> None:
    import sys

    for entry in reversed(path):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)


def _second(first: object, second: object) -> object:
    return second


class PathFirst:
    """Pickles as "put rank 0's ``sys.path`` in place, then ``obj``", in one pickle stream.

    Unpickling runs in order, so the path is set before ``obj``'s functions are imported; the
    result is ``obj`` itself. Unlike :class:`WithPath`, ``obj``'s large buffers can stay out of
    band (pickle protocol 5), so they cross MPI as raw buffers.
    """

    __slots__ = ("obj", "path")

    def __init__(self, path: list[str], obj: object) -> None:
        self.path = path
        self.obj = obj

    def __reduce__(self) -> tuple[object, ...]:
        return (_second, (_PathSetter(self.path), self.obj))


class _PathSetter:
    __slots__ = ("path",)

    def __init__(self, path: list[str]) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_set_path, (self.path,))
