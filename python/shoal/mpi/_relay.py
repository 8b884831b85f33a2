"""A serving rank: a light relay between rank 0 and worker processes on its own node.

The relay never runs a task itself. It owns a local :class:`~shoal.backends.processes.ProcessPool`
(shoal's Rust supervisor), hands it the call specs and chunks that rank 0 sends, and sends the
outcomes back as they are. So a task that segfaults, exits, runs past ``timeout=`` or over
``max_worker_memory`` kills one local worker, and only its own item fails; the relay and the
MPI job go on. Payloads pass through as bytes: the relay never unpickles user data, so it needs
none of the script's modules.

Threads: the main thread polls for rank 0's messages (non-blocking probe with back-off, so an
idle relay uses no CPU); one thread per open session waits on the engine (GIL released) and
sends outcomes back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from typing import Any, NoReturn

from .. import _native
from .._options import cpu_count
from .._threads import Reused
from ..backends.processes import ProcessPool
from . import hostname
from ._wire import (
    TAG_CONTROL,
    TAG_DATA,
    TAG_REPLY,
    Bell,
    Outbox,
    Poller,
    Ringer,
    fine_timer,
    receive,
    use_bell,
)

#: Results and arguments always travel in-band between a relay and its workers: a shared-memory
#: segment of a worker means nothing on rank 0's host.
_IN_BAND = {"SHOAL_SHM_THRESHOLD": str(2**62)}
#: Seconds between two reports of a long chunk's finished items by a relay's worker (locally
#: 0.02, see shoal._execute.REPORT_INTERVAL). Each report crosses to rank 0 as a message, which
#: costs the relay and rank 0 some 0.2 ms of CPU between them, against some 20 us locally: at
#: the local interval, a call of 20-100 ms chunks (bench/mpi.py W4) sent a report for one chunk in
#: three, and the relays and rank 0 spent 2-8 ms more CPU a second, which the workers need.
REPORT_INTERVAL_S = 0.1


class _RelaySession:
    def __init__(self, relay: Relay, sid: int, limits: tuple[Any, ...]) -> None:
        self.relay = relay
        self.sid = sid
        self.engine = relay.pool._engine
        self.local = self.engine.open_session(False, *limits)
        self.setups: dict[int, int] = {}
        self.segments: dict[int, list[Any]] = {}
        self.to_global: dict[int, int] = {}
        self.to_local: dict[int, int] = {}
        self.lock = threading.Lock()
        self.closed = False
        relay.pumps.run(self.pump)  # never raises: a failure is reported to rank 0

    def setup(self, key: int, body: bytes, segments: list[Any]) -> None:
        blob = body
        if segments:
            from .. import _shm

            # The format the processes backend uses for a spec with buffers in shared memory:
            # workers map each segment through /proc/<relay pid>/fd/<fd>.
            refs = [(os.getpid(), seg.fd, seg.size) for seg in segments]
            blob = _shm.MAGIC + pickle.dumps((refs, body), 5)
            self.segments[key] = segments
        self.setups[key] = int(self.engine.add_setup(self.local, blob))

    def drop(self, key: int) -> None:
        local = self.setups.pop(key, None)
        if local is not None:
            self.engine.remove_setup(local)
        for seg in self.segments.pop(key, []):
            seg.close()

    def task(self, key: int, seq: int, n: int, payload: bytes, exclusive: bool) -> None:
        with self.lock:
            local = int(self.engine.submit(self.setups[key], n, payload, exclusive))
            self.to_global[local] = seq
            self.to_local[seq] = local

    def cancel(self, seqs: list[int] | None) -> None:
        if seqs is None:
            self.engine.cancel(self.local, None)
            return
        with self.lock:
            local = [self.to_local[s] for s in seqs if s in self.to_local]
        if local:
            self.engine.cancel(self.local, local)

    def close(self, abort: bool) -> None:
        self.closed = True
        with contextlib.suppress(_native.EngineError):
            self.engine.close_session(self.local, abort)
        # Workers that already mapped a segment keep their mapping.
        for key in list(self.segments):
            for seg in self.segments.pop(key):
                seg.close()

    def pump(self) -> None:
        """The session's reply thread: sends outcomes back as the engine reports them."""
        try:
            while not self.closed:
                try:
                    outcomes = self.engine.wait(self.local, 0.25)
                except _native.EngineError as exc:
                    if not self.closed:
                        self.relay.reply(("broken", self.sid, str(exc)))
                    return
                if outcomes:
                    self.forward(outcomes)
        except BaseException as exc:
            # A thread that ended silently would leave rank 0 waiting for these outcomes
            # forever: the call fails instead, naming this rank.
            self.relay.failed(self.sid, "reply thread", exc)

    def forward(self, outcomes: list[Any]) -> None:
        """Send the engine's ``outcomes`` to rank 0, under their global sequence numbers."""
        out = []
        with self.lock:
            for seq, kind, payload, elapsed, pid, message, segments in outcomes:
                if kind == _native.OUTCOME_PARTIAL:  # the chunk goes on: keep its mapping
                    gseq = self.to_global.get(seq)
                else:
                    gseq = self.to_global.pop(seq, None)
                    if gseq is not None:
                        self.to_local.pop(gseq, None)
                if gseq is None:
                    continue
                if segments:  # only if a worker ignored the in-band setting
                    payload = _inline(payload, segments)
                out.append((gseq, kind, bytes(payload), elapsed, pid, message))
        if out and not self.closed:
            self.relay.reply(("done", self.sid, out), sum(len(o[2]) for o in out))


def _inline(payload: bytes, segments: list[Any]) -> bytes:
    from .. import _shm

    values = _shm.loads(payload, segments)
    return _shm.dumps(values, None)


#: Environment variables through which a launcher tells a process it is a rank of a job.
_JOB_VARIABLES = ("PMI_", "PMIX_", "OMPI_COMM_WORLD_", "OMPI_WORLD_", "MPI_LOCAL")
_JOB_NAMES = {
    "OMPI_UNIVERSE_SIZE",
    "OMPI_NUM_APP_CTX",
    "OMPI_FILE_LOCATION",
    "OMPI_MCA_num_procs",
    "OMPI_COMMAND",
    "OMPI_ARGV",
    "PRTE_LAUNCHED",
}
_KEEP = ("PMIX_PREFIX", "PMIX_MCA_")


def forget_job_identity() -> None:
    """Drop this rank's identity from the environment its worker processes will inherit.

    MPI has read it already. A worker that inherited it and imported mpi4py (directly or
    through a library) would take itself for this rank and wait forever in ``MPI_Init``;
    without it, such a worker starts as a singleton MPI process of its own.
    """
    for name in list(os.environ):
        if name.startswith(_KEEP):
            continue
        if name in _JOB_NAMES or name.startswith(_JOB_VARIABLES):
            del os.environ[name]


class Relay:
    """The serving loop of one rank; see the module docs.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The control communicator (world duplicate, or the parent intercommunicator).
    root : int
        Rank 0's rank in ``comm`` (its rank in the remote group for an intercommunicator).
    workers : int
        Local worker processes.
    """

    def __init__(self, comm: Any, root: int, rank: int, workers: int) -> None:
        self.comm = comm
        self.root = root
        self.rank = rank
        self.workers = workers
        from .. import mpi

        mpi._serving = True
        forget_job_identity()
        # Tasks can tell which rank serves them (SHOAL_MPI_RANK), not take themselves for it.
        env = {
            **_IN_BAND,
            "SHOAL_MPI_RANK": str(rank),
            "SHOAL_REPORT_INTERVAL": str(REPORT_INTERVAL_S),
        }
        # Rank 0 bounds what waits on this rank (see MpiSession._room). With one worker, a
        # chunk that waits would run on it next anyway: in the worker's pipe rather than in
        # the engine's queue, it starts without a local round trip (about 0.2 ms a chunk on a
        # busy node, some 0.5 % of a call of 40 ms chunks). With several workers, a chunk in one
        # worker's pipe could wait while another worker idles: the engine keeps its own rule.
        self.pool = ProcessPool(workers, env=env, idle_timeout=None, queue_any=workers == 1)
        self.sessions: dict[int, _RelaySession] = {}
        # The sessions' reply threads, kept for the next session: a new one would cost
        # 0.1-0.5 ms on a busy node, on the path of a call's first result. One waits from the
        # start.
        self.pumps = Reused("shoal-relay", prestart=True)
        self.outbox = Outbox()
        self.bell = Bell.create()
        self.poller = Poller(bell=self.bell)
        self.ringer = Ringer()
        #: Rank 0's bell, once rank 0 said it is on this host (see "bell").
        self.root_bell: str | None = None

    def reply(self, message: tuple[Any, ...], size: int = 0) -> None:
        """Send ``message`` (of about ``size`` bytes) to rank 0."""
        in_flight = self.outbox.send(self.comm, message, self.root, TAG_REPLY, size)
        if self.root_bell is not None:
            self.ringer.ring(self.root_bell)
        if in_flight and self.bell is not None:
            # Wake the main thread, which drives MPI's progress for the transfer.
            self.ringer.ring(self.bell.name)
        # Rank 0 answers results with more work: poll at the fastest for a while.
        self.poller.reset()

    def serve(self) -> None:
        from mpi4py import MPI

        self.pool.prestart()
        fine_timer()
        bell = None if self.bell is None else self.bell.name
        self.reply(("hello", self.rank, hostname(), self.workers, os.getpid(), bell))
        poller = self.poller
        outbox = self.outbox
        status = MPI.Status()
        while True:
            outbox.reap()
            found, message = receive(self.comm, self.root, TAG_CONTROL, status)
            if not found:
                poller.sleep(outbox.cap())
                continue
            if not self.handle(message):
                break
            poller.received()
            if poller.quiet():  # nothing else waits: no empty probe
                poller.sleep(outbox.cap())
        for session in list(self.sessions.values()):
            session.close(True)
        self.pool.shutdown(kill=True)
        outbox.drain(DRAIN_S)
        if self.bell is not None:
            self.bell.close()

    def receive_segment(self, size: int) -> Any:
        """The next raw buffer from rank 0, received straight into a shared-memory segment."""
        from mpi4py import MPI

        segment = _native.Segment.zeroed(size)
        mapping = _native.Mapping(segment.fd, size, shared=True)
        # Sent right after the "setup" message: a blocking receive spins only while it arrives.
        self.comm.Recv([mapping, MPI.BYTE], source=self.root, tag=TAG_DATA)
        del mapping
        return segment

    def failed(self, sid: int, what: str, exc: BaseException) -> None:
        """Session ``sid`` cannot go on because ``what`` raised ``exc``: tell rank 0 (its call
        fails with this message, naming this rank and host); if even that fails, end the job."""
        message = f"the relay's {what} failed: {type(exc).__name__}: {exc}"
        try:
            self.reply(("broken", sid, message))
        except BaseException as again:
            fatal(
                f"on rank {self.rank} (host {hostname()}), {message}; telling rank 0 failed "
                f"too: {again!r}"
            )

    def handle(self, message: tuple[Any, ...]) -> bool:
        """Act on one message from rank 0; ``False`` once told to stop."""
        try:
            return self._handle(message)
        except Exception as exc:
            if message[0] not in _SESSION_MESSAGES:
                raise  # the relay itself is broken: run_relay ends the job
            self.failed(message[1], f"handling of {message[0]!r}", exc)
            return True

    def _handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "task":
            _, sid, key, seq, n, payload, exclusive = message
            session = self.sessions.get(sid)
            if session is not None:
                try:
                    session.task(key, seq, n, payload, exclusive)
                except Exception as exc:
                    self.reply(("broken", sid, f"{type(exc).__name__}: {exc}"))
        elif kind == "open":
            self.sessions[message[1]] = _RelaySession(self, message[1], message[2:7])
            if len(message) > 7:  # the session's first message came with it
                return self._handle(message[7])
        elif kind == "setup":
            _, sid, key, body, sizes = message[:5]
            segments = [self.receive_segment(size) for size in sizes]
            session = self.sessions.get(sid)
            if session is not None:
                session.setup(key, body, segments)
            else:
                for seg in segments:
                    seg.close()
            if len(message) > 5:  # the first task of this spec here came with it
                return self._handle(message[5])
        elif kind == "drop":
            session = self.sessions.get(message[1])
            if session is not None:
                session.drop(message[2])
        elif kind == "cancel":
            session = self.sessions.get(message[1])
            if session is not None:
                session.cancel(message[2])
        elif kind == "close":
            session = self.sessions.pop(message[1], None)
            if session is not None:
                session.close(message[2])
        elif kind == "spmd":
            from ..spmd._mpi import serve_call

            serve_call(message[1])  # rank 0 gathers the results; errors reach every rank
        elif kind == "bell":
            _, root_bell, rings_mine = message
            if root_bell is not None and self.ringer.ring(root_bell):
                self.root_bell = root_bell
            if rings_mine and self.bell is not None:
                use_bell(self.poller)
        elif kind == "stop":
            return False
        return True


#: Messages about one session: a failure handling one fails that session's call only.
_SESSION_MESSAGES = frozenset({"task", "open", "setup", "drop", "cancel", "close"})

#: Seconds a relay told to stop waits for its last replies to be taken before it leaves.
DRAIN_S = 1.0

#: Seconds a relay told to terminate waits for rank 0's "stop" before it leaves by itself.
TERM_GRACE = 1.5


def run_relay(comm: Any, root: int, rank: int, workers: int) -> None:
    """Serve rank 0 until it says stop (then return); leave the process with a failure
    status if serving fails, which makes the MPI runtime end the job rather than leave rank 0
    waiting for this rank."""
    relay: Relay | None = None

    def on_term(signum: int, frame: Any) -> None:
        # mpiexec passes Ctrl-C on to every rank as SIGTERM. Stop the tasks at once, but let
        # rank 0 (which sees a KeyboardInterrupt) end first and say stop, so that the job ends
        # with its status; leave anyway after a grace period.
        if relay is not None:
            relay.pool.shutdown(kill=True)
        timer = threading.Timer(TERM_GRACE, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    signal.signal(signal.SIGTERM, on_term)
    try:
        relay = Relay(comm, root, rank, workers or cpu_count())
        relay.serve()
    except BaseException as exc:  # never hang the job: report and leave
        fatal(f"relay on rank {rank} (host {hostname()}) failed: {exc!r}")


def fatal(message: str) -> NoReturn:
    """Say why on stderr and leave at once, with a failure status and without MPI_Finalize
    (which could wait for ranks that wait for this one)."""
    with contextlib.suppress(BaseException):
        print(f"shoal.mpi: {message}", file=sys.stderr, flush=True)
    os._exit(1)
