"""SPMD under MPI: the ranks of the job, with collectives on duplicates of ``MPI.COMM_WORLD``.

Every wait is a non-blocking test with a back-off (Open MPI's blocking calls spin a core), and
between tests a rank checks an error channel and its deadline. So when ``fn`` raises on one
rank, that rank sends the exception to every other rank, and each of them raises it, with its
original type, from whatever collective it is waiting in: nothing hangs, and the script's own
``try``/``except`` behaves the same on every rank. Collectives go through the root (star), and
a NumPy array travels as a raw buffer (``Isend``/``Irecv``), never pickled.

In launch mode (``python -m shoal.mpi``) only rank 0 runs the script; its ``run`` asks each
serving rank to take part (:func:`serve_call`).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._comm import Comm, SpmdError, pickled

_TAG_ERROR = 1
_TAG_PRINTED = 2
_FIRST_TAG = 16
_TAG_SPAN = 30000

#: The communicator of the running ``run`` on this rank, if any.
current: MpiComm | None = None
_world: Comm | None = None
_exit_comm: Any = None


def _mpi() -> Any:
    from ..mpi import require_mpi

    return require_mpi()


class _Remote(Exception):  # noqa: N818 - internal carrier
    pass


class MpiComm(Comm):
    """One rank's communicator for one ``run`` (or for the world, outside ``run``)."""

    def __init__(
        self,
        world: Any,
        deadline: float | None = None,
        timeout: float | None = None,
        *,
        private: bool = True,
    ) -> None:
        from ..mpi._wire import Backoff

        self.mpi = _mpi()
        self.rank = world.Get_rank()
        self.size = world.Get_size()
        # A run's own communicators (a collective call on every rank) keep its messages apart
        # from the script's and from other runs'; the world's comm outside run uses the world.
        self.coll = world.Dup() if private else world
        self.p2p = world.Dup() if private else world
        self.err = world.Dup() if private else world
        self.deadline = deadline
        self.timeout = timeout
        self.k = 0
        self.backoff = Backoff(longest=0.005)
        self.status = self.mpi.Status()
        self._sent: list[Any] = []  # requests of error messages, kept alive until sent

    # -- waiting ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise another rank's error, or a timeout, if there is one."""
        if self.err.iprobe(source=self.mpi.ANY_SOURCE, tag=_TAG_ERROR):
            origin, blob, tb = self.err.recv(source=self.mpi.ANY_SOURCE, tag=_TAG_ERROR)
            exc = pickle.loads(blob)
            exc._shoal_spmd_rank = origin
            if tb:
                from .._errors import RemoteTraceback

                exc.__cause__ = RemoteTraceback(tb)
            raise exc
        if self.deadline is not None and time.monotonic() > self.deadline:
            from .._errors import TaskTimeoutError

            exc = TaskTimeoutError(None, "", os.getpid(), self.timeout or 0.0, "shoal.spmd.run")
            exc.add_note(f"shoal.spmd: timed out on rank {self.rank} of {self.size}")
            raise exc

    def _wait(self, requests: list[Any]) -> None:
        self.backoff.reset()
        while requests:
            if self.mpi.Request.Testall(requests):
                return
            self.check()
            self.backoff.sleep()

    def _probe(self, comm: Any, source: int, tag: int) -> Any:
        self.backoff.reset()
        while True:
            message = comm.improbe(source=source, tag=tag, status=self.status)
            if message is not None:
                return message
            self.check()
            self.backoff.sleep()

    # -- objects on the wire ---------------------------------------------------------------

    def _isend(self, obj: Any, dest: int, tag: int, comm: Any, what: str) -> list[Any]:
        import numpy as np

        if type(obj) is np.ndarray and obj.dtype.hasobject is False and obj.nbytes >= 1 << 16:
            arr = np.ascontiguousarray(obj)
            head = comm.isend(("array", arr.dtype.str, arr.shape), dest=dest, tag=tag)
            return [head, comm.Isend(arr, dest=dest, tag=tag)]
        return [comm.isend(("pickle", pickled(obj, what, self.rank)), dest=dest, tag=tag)]

    def _recv(self, source: int, tag: int, comm: Any) -> tuple[Any, int, int]:
        message = self._probe(comm, source, tag)
        src, got_tag = self.status.Get_source(), self.status.Get_tag()
        head = message.recv()
        if head[0] == "pickle":
            return pickle.loads(head[1]), src, got_tag
        if head[0] == "error":
            raise ValueError(head[1])
        import numpy as np

        arr = np.empty(head[2], dtype=np.dtype(head[1]))
        self._wait([comm.Irecv(arr, source=src, tag=got_tag)])
        return arr, src, got_tag

    def _tag(self) -> int:
        self.k += 1
        return _FIRST_TAG + self.k % _TAG_SPAN

    # -- the collectives -------------------------------------------------------------------

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        self._check_root(root, "bcast")
        tag = self._tag()
        if self.rank != root:
            return self._recv(root, tag, self.coll)[0]
        reqs: list[Any] = []
        for r in range(self.size):
            if r != root:
                reqs += self._isend(obj, r, tag, self.coll, "bcast")
        self._wait(reqs)
        return obj

    def scatter(self, seq: Sequence[Any] | None = None, root: int = 0) -> Any:
        self._check_root(root, "scatter")
        tag = self._tag()
        if self.rank != root:
            return self._recv(root, tag, self.coll)[0]
        if seq is None or not hasattr(seq, "__len__"):
            raise TypeError(
                f"scatter: the root must pass a sequence of {self.size} parts, "
                f"not {type(seq).__name__}"
            )
        if len(seq) != self.size:
            msg = f"scatter: the root (rank {root}) gave {len(seq)} parts for {self.size} ranks"
            reqs = [
                self.coll.isend(("error", msg), dest=r, tag=tag)
                for r in range(self.size)
                if r != root
            ]
            self._wait(reqs)
            raise ValueError(msg)
        reqs = []
        for r in range(self.size):
            if r != root:
                reqs += self._isend(seq[r], r, tag, self.coll, "scatter")
        self._wait(reqs)
        return seq[root]

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        self._check_root(root, "gather")
        tag = self._tag()
        if self.rank != root:
            self._wait(self._isend(obj, root, tag, self.coll, "gather"))
            return None
        out = [obj if r == root else self._recv(r, tag, self.coll)[0] for r in range(self.size)]
        return out

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._check_root(dest, "send")
        if isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
            raise TypeError(f"send: tag must be an int >= 0, not {tag!r}")
        self._wait(self._isend(obj, dest, tag, self.p2p, "send"))

    def recv(self, source: int | None = None, tag: int | None = None) -> Any:
        if source is not None:
            self._check_root(source, "recv")
        src = self.mpi.ANY_SOURCE if source is None else source
        return self._recv(src, self.mpi.ANY_TAG if tag is None else tag, self.p2p)[0]

    # -- failure ---------------------------------------------------------------------------

    def tell_others(self, exc: BaseException) -> None:
        """Send ``exc`` to every other rank, which raises it from its next wait."""
        from .._execute import format_remote_traceback
        from .._pickling import _portable_exception, dumps

        blob = dumps(_portable_exception(exc))
        tb = f"(on rank {self.rank})\n{format_remote_traceback(exc)}"
        for r in range(self.size):
            if r != self.rank:
                message = (self.rank, blob, tb)
                self._sent.append(self.err.isend(message, dest=r, tag=_TAG_ERROR))


def _check_size(ranks: int | None, size: int) -> None:
    if ranks is not None and ranks != size:
        raise ValueError(
            f"under MPI, shoal.spmd.run runs on every rank of the job: ranks must be None or "
            f"{size} (the job's size), not {ranks}"
        )


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ranks: int | None,
    timeout: float | None,
) -> list[Any]:
    """Run ``fn`` on every rank of the MPI job; see :func:`shoal.spmd.run`."""
    from .. import mpi as shoal_mpi

    if shoal_mpi._launch is None and not shoal_mpi.in_mpi_job():
        raise SpmdError(
            "shoal.spmd.run(backend='mpi') needs an MPI job: start the script with "
            "`mpiexec -n N python script.py` (or `python -m shoal.mpi script.py`)"
        )
    mpi = _mpi()
    world = mpi.COMM_WORLD
    _check_size(ranks, world.Get_size())
    link = shoal_mpi._launch
    if link is not None:
        from ..mpi._wire import WithPath

        call = pickled((fn, args, kwargs, timeout), "shoal.spmd.run", 0)
        # Rank 0's path travels along, so functions pickled by reference import on the relays.
        link.send_all(("spmd", pickle.dumps(WithPath(list(sys.path), call), 5)))
    return _run_rank(fn, args, kwargs, timeout)


def _run_rank(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
) -> list[Any]:
    global current
    mpi = _mpi()
    world = mpi.COMM_WORLD
    _install_exit_hook(world)
    deadline = None if timeout is None else time.monotonic() + timeout
    comm = MpiComm(world, deadline, timeout)
    current = comm
    try:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            if getattr(exc, "_shoal_spmd_rank", None) is None:
                exc._shoal_spmd_rank = comm.rank  # type: ignore[attr-defined]
                exc.add_note(f"shoal.spmd: raised on rank {comm.rank} of {comm.size}")
                comm.tell_others(exc)
            raise
        try:
            return comm.allgather(value)
        except BaseException as exc:
            if getattr(exc, "_shoal_spmd_rank", None) is None:
                exc._shoal_spmd_rank = comm.rank  # type: ignore[attr-defined]
                comm.tell_others(exc)
            raise
    finally:
        current = None


def serve_call(blob: bytes) -> tuple[bool, Any]:
    """A serving rank's part in rank 0's ``shoal.spmd.run`` (launch mode)."""
    try:
        fn, args, kwargs, timeout = pickle.loads(blob)
    except Exception as exc:
        # Still take part, so that rank 0 hears of the failure instead of waiting for us.
        failure = exc

        def fn() -> None:
            raise SpmdError(f"the function could not be loaded on this rank: {failure!r}")

        args, kwargs, timeout = (), {}, None
    try:
        _run_rank(fn, args, kwargs, timeout)
    except BaseException:  # rank 0 raises it (every rank has it); the relay goes on serving
        return False, None
    return True, None


def comm() -> Comm:
    """The running ``run``'s communicator, or the world's."""
    global _world
    if current is not None:
        return current
    if _world is None:
        _world = MpiComm(_mpi().COMM_WORLD, private=False)
    return _world


def _install_exit_hook(world: Any) -> None:
    """Print an error that every rank raised once, from rank 0 (see the module docs)."""
    global _exit_comm
    if _exit_comm is not None:
        return
    from .. import mpi as shoal_mpi

    _exit_comm = world.Dup()
    if shoal_mpi._launch is not None:
        return  # launch mode: rank 0's launcher prints, the relays never raise to the top
    previous = sys.excepthook
    rank, size = world.Get_rank(), world.Get_size()

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        shared = getattr(exc, "_shoal_spmd_rank", None) is not None
        if not shared:
            previous(kind, exc, tb)
            return
        if rank == 0:
            previous(kind, exc, tb)
            sys.stderr.flush()
            for r in range(1, size):
                _exit_comm.isend(None, dest=r, tag=_TAG_PRINTED)
            time.sleep(0.2)  # let the small messages leave before MPI is finalised
            return
        # Wait (a little) for rank 0 to have printed: the job ends when this rank exits.
        end = time.monotonic() + 5.0
        while time.monotonic() < end and not _exit_comm.iprobe(source=0, tag=_TAG_PRINTED):
            time.sleep(0.01)

    sys.excepthook = hook
