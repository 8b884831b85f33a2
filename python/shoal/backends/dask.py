"""The dask backend: shoal calls on a Dask ``distributed`` cluster.

Which cluster, in this order: the ``client=`` or ``address=`` given to the backend; else the
current ``distributed`` client (the one ``Client(...)`` made, as Dask's own ``compute`` would
use); else a ``LocalCluster`` of worker processes on 127.0.0.1 (one thread each, dashboard
off), started at first use and closed at interpreter exit.

Per call, the spec is scattered to every worker once (``scatter(..., broadcast=True)``); each
chunk is one Dask task that runs :func:`shoal.backends._remote.run_remote`. Chunks are sized by
shoal's adaptive policy, so 20,000 tiny items are a few dozen tasks. Retries, errors and crash
isolation are the driver's, as on every backend: a chunk whose worker died comes back as a
crash (Dask's ``KilledWorker``), and the driver runs its items again one by one. ``timeout=``
runs one item per task under a watchdog (:func:`run_timed`) that ends the worker process past
the limit, since a task in a worker thread cannot be stopped; the nanny starts a new worker.

Requires ``pip install 'shoal[dask]'``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
from collections import deque
from typing import Any

from .._errors import WorkerStartError
from .._options import check_max_tasks, resolve_workers
from .._spec import ChunkResult, Crash, Limits
from ._cluster import NOT_ON_A_CLUSTER, ClusterBackend, ClusterPool, ClusterSession, refuse
from ._remote import forget_soon, run_remote


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the dask backend needs dask.distributed, which cannot be imported ({exc}): "
            "pip install 'shoal[dask]'"
        ) from exc
    return distributed


#: Times a chunk is sent again after the scheduler dropped it with its lost spec.
MAX_RESENDS = 3

_REFUSED = {
    "max_tasks_per_worker": (
        "Dask does not replace a worker after a number of tasks; restart workers with "
        "client.restart() between calls instead"
    ),
    "max_worker_memory": (
        "Dask enforces memory per worker with its nanny: pass "
        "get_backend('dask', memory_limit=...) for a cluster shoal starts, or start your "
        "workers with --memory-limit (a worker over it is restarted, and its items fail with "
        "WorkerCrashedError or run again with retries=)"
    ),
    "max_load": NOT_ON_A_CLUSTER,
    "max_memory": NOT_ON_A_CLUSTER,
}


#: Future states after which a task no longer holds a worker thread.
_ENDED = frozenset({"finished", "error", "cancelled"})


class DaskSession(ClusterSession):
    """One call on a Dask cluster: chunks are futures, completions arrive by callback."""

    engine = "dask"

    def __init__(
        self,
        client: Any,
        *,
        ordered: bool,
        slots: int,
        target_chunk_s: float,
        timeout: float | None = None,
    ) -> None:
        super().__init__(ordered=ordered, slots=slots, target_chunk_s=target_chunk_s)
        self._client = client
        self._timeout = timeout
        # Each worker thread gets a second chunk queued behind the one it runs, so it never
        # idles for a round trip (5-10 ms on Dask: the client and the scheduler batch their
        # messages). When a worker dies, Dask fails every task it held, the queued one too, so
        # a chunk that failed that way is not blamed yet: it is a *suspect*, sent again to run
        # alone (no chunk is queued anywhere while suspects run), and only a second death
        # blames it. With a per-item timeout, nothing is queued (its watchdog ends the worker).
        self._prefetch = timeout is None
        self.max_in_flight = (3 if self._prefetch else 2) * self.slots
        #: Chunks sent again to run alone after their worker died with them in it.
        self._suspects: set[int] = set()
        # (seq, future) of tasks that ended, pushed by Dask's callback thread.
        self._done: deque[tuple[int, Any]] = deque()
        #: seq -> (token, spec handle, payload, times resent): what a lost chunk needs again.
        self._sent: dict[int, tuple[str, Any, bytes, int]] = {}
        #: Chunks not yet sent: they wait for a free worker thread.
        self._held: deque[int] = deque()
        #: A worker died in this call: check how many threads are left before sending.
        self._short = False

    def _put_spec(self, blob: bytes) -> Any:
        # The blob is kept to scatter again if every worker holding the spec dies.
        [future] = self._client.scatter([blob], broadcast=True, hash=False)
        return [future, blob]

    def _drop_spec(self, handle: Any) -> None:
        handle[0].release()

    def _start(self, seq: int, spec_id: int, token: str, spec: Any, payload: bytes) -> Any:
        self._sent[seq] = (token, spec, payload, 0)
        self._held.append(seq)
        self._pump()
        return None  # set by _pump

    def _capacity(self) -> int:
        """Chunks to keep on the cluster: two per worker thread (one running, one queued),
        one per thread while suspects run alone, and after a worker died only as many as
        there are threads until it is back (chunks sent meanwhile would queue on the
        survivors)."""
        if self._suspects:
            self._suspects &= self._live.keys()  # forget cancelled ones
        if not self._short:
            return self.slots * (2 if self._prefetch and not self._suspects else 1)
        try:
            threads = int(sum(self._client.nthreads().values()))
        except Exception:
            return 0
        if threads >= self.slots:
            self._short = False
        return min(threads, self.slots)

    def _pump(self) -> None:
        """Send held chunks to the cluster while a worker thread is free for each."""
        if not self._held:
            return
        running = sum(
            1
            for entry in self._live.values()
            if entry[2] is not None and entry[2].status not in _ENDED
        )
        room = self._capacity() - running
        while self._held and room > 0:
            seq = self._held.popleft()
            entry = self._live.get(seq)
            if entry is None:
                continue  # cancelled while held
            token, spec, payload, tries = self._sent[seq]
            if spec[0].status != "finished":
                # Scattered data dies with the last worker holding it: send it again.
                spec[0].release()
                spec[0] = self._put_spec(spec[1])[0]
            key = f"{token}-{seq}-{tries}"
            if self._timeout is None:
                future = self._client.submit(run_remote, token, spec[0], payload, key=key)
            else:
                future = self._client.submit(
                    run_timed, token, spec[0], payload, self._timeout, key, key=key
                )
            future.add_done_callback(lambda fut, seq=seq: self._on_done(seq, fut))
            self._live[seq] = (entry[0], entry[1], future)
            room -= 1

    def _resend(self, seq: int) -> bool:
        """Send a chunk again whose spec died with every worker holding it (not its fault)."""
        entry = self._sent.get(seq)
        live = self._live.get(seq)
        if entry is None or live is None or entry[3] >= MAX_RESENDS:
            return False
        token, spec, payload, tries = entry
        self._sent[seq] = (token, spec, payload, tries + 1)
        self._live[seq] = (live[0], live[1], None)
        self._held.appendleft(seq)
        return True

    def _on_done(self, seq: int, future: Any) -> None:
        with self._cond:
            self._done.append((seq, future))
            self._cond.notify_all()
        # The thread this chunk ran on is free: hand it the next held chunk now rather than
        # after the driver has woken up and fetched this result (a round trip saved per chunk).
        # If the driver holds the lock, it pumps itself when it is done.
        if self._held and self._lock.acquire(blocking=False):
            try:
                self._pump()
            finally:
                self._lock.release()

    def _collect(self, timeout: float) -> list[ChunkResult]:
        with self._cond:
            if not self._done and not self._woken and timeout > 0:
                self._cond.wait(timeout)
            done = list(self._done)
            self._done.clear()
        with self._lock:
            return self._handle(done)

    def _handle(self, done: list[tuple[int, Any]]) -> list[ChunkResult]:
        out: list[ChunkResult] = []
        finished = []
        for seq, future in done:
            entry = self._live.get(seq)
            if entry is None or entry[2] is not future:
                continue  # cancelled, dropped or sent again: this result is not wanted
            status = future.status  # read once: a lost result changes it (see module docs)
            if status in _ENDED:
                was_suspect = seq in self._suspects
                self._suspects.discard(seq)
                if status == "error" and not was_suspect and self._suspect(seq, future):
                    continue  # its worker died: sent again, alone
            if status == "finished":
                finished.append((seq, future))
            elif status == "error":
                self._failed(seq, future.exception(), out)
            elif status == "cancelled":
                # Not by us (we forget what we cancel): its spec died with every worker that
                # held it, and the scheduler dropped the tasks that needed it.
                self._failed(seq, None, out)
            # "pending"/"lost": it runs again on another worker; its callback fires again.
        if finished:
            try:
                outcomes = self._client.gather([f for _, f in finished])
            except Exception:
                outcomes = [_result_or_exception(f) for _, f in finished]
            for (seq, _), outcome in zip(finished, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    self._failed(seq, outcome, out)
                    continue
                self._sent.pop(seq, None)
                res = self._finished(seq, outcome)
                if res is not None:
                    out.append(res)
        self._pump()
        return out

    def _suspect(self, seq: int, future: Any) -> bool:
        """Send a chunk that died with its worker again, alone, if another chunk may have been
        running there (it was queued, or running with one queued behind it); ``False`` if
        it is blamed now."""
        if not self._prefetch:
            return False
        exc = _result_or_exception(future)
        if type(exc).__name__ != "KilledWorker" or not self._resend(seq):
            return False
        self._suspects.add(seq)
        self._short = True  # a worker is gone: wait for it before filling up again
        return True

    def _failed(self, seq: int, exc: BaseException | None, out: list[ChunkResult]) -> None:
        if (exc is None or "Cancelled" in type(exc).__name__) and self._resend(seq):
            self._short = True
            return
        if self._timeout is not None and exc is not None and type(exc).__name__ == "KilledWorker":
            verdict = self._timed_out(seq, exc)
            if verdict == "resend" and self._resend(seq):
                self._short = True
                return
            if isinstance(verdict, Crash):
                self._sent.pop(seq, None)
                self._short = True
                res = self._crashed(seq, verdict)
                if res is not None:
                    out.append(res)
                return
        self._sent.pop(seq, None)
        self._short = True
        crash = Crash(None, "its task was cancelled by the scheduler") if exc is None else None
        res = self._crashed(seq, crash or _crash_of(exc))
        if res is not None:
            out.append(res)

    def _stop(self, handles: list[Any]) -> None:
        for seq in [s for s in self._sent if s not in self._live]:
            del self._sent[seq]
        self._cancel(handles)

    def _timed_out(self, seq: int, exc: BaseException) -> Crash | str | None:
        """Whether a chunk's worker was killed by a timeout: this chunk's (a crash of kind
        ``timed_out``), another chunk's on the same worker (``"resend"``), or none."""
        entry = self._live.get(seq)
        future = entry[2] if entry is not None else None
        key = getattr(future, "key", None)
        last = getattr(exc, "last_worker", None)
        address = getattr(last, "address", last)
        try:
            events = self._client.get_events(TIMEOUT_TOPIC)
        except Exception:
            return None
        for _, event in reversed(events):
            if event.get("key") == key:
                return Crash(event.get("pid"), "timed out", "timed_out", limit=event["limit"])
        for _, event in reversed(events):
            if address is not None and event.get("worker") == address:
                return "resend"  # killed with a worker that another chunk's timeout ended
        return None

    def _cancel(self, handles: list[Any]) -> None:
        # A closed client: nothing runs any more anyway.
        with contextlib.suppress(Exception):
            self._client.cancel(handles)

    def _forget(self, prefix: str) -> None:
        with contextlib.suppress(Exception):
            self._client.run(forget_soon, prefix, wait=False)


#: Where a worker records that it is ending itself for a timed-out item (scheduler events).
TIMEOUT_TOPIC = "shoal-timeout"


def run_timed(token: str, spec: bytes, payload: bytes, limit: float, key: str) -> Any:
    """:func:`run_remote` with a time limit, in a Dask worker.

    A task in a worker thread cannot be stopped, so past ``limit`` seconds its whole worker
    process ends (its nanny starts a new one), after recording why in the scheduler's events,
    where the driver finds it and reports :class:`~shoal.TaskTimeoutError`.
    """
    import distributed

    done = threading.Event()
    worker = distributed.get_worker()  # known in the task's thread only

    def watchdog() -> None:
        if done.wait(limit):
            return
        with contextlib.suppress(Exception):
            event = {"key": key, "pid": os.getpid(), "limit": limit, "worker": worker.address}
            worker.log_event(TIMEOUT_TOPIC, event)
        time.sleep(0.3)  # the event reaches the scheduler before the worker's death does
        os._exit(70)

    threading.Thread(target=watchdog, name="shoal-timeout", daemon=True).start()
    try:
        return run_remote(token, spec, payload)
    finally:
        done.set()


def _result_or_exception(future: Any) -> Any:
    try:
        return future.result()
    except BaseException as exc:
        return exc


def _crash_of(exc: BaseException | None) -> Crash:
    """A Dask task error as shoal's crash (``run_remote`` itself never raises a task error)."""
    name = type(exc).__name__
    if name == "KilledWorker":
        last = getattr(exc, "last_worker", None)
        where = getattr(last, "address", last)
        return Crash(None, f"its Dask worker{f' {where}' if where else ''} died (KilledWorker)")
    return Crash(None, f"the Dask task failed: {name}: {exc}")


class DaskPool(ClusterPool):
    """The workers of a Dask cluster; see :class:`ClusterPool`."""

    backend: DaskBackend

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> DaskSession:
        refuse("dask", limits, ("timeout",), _REFUSED)
        client = self.backend.client()
        return DaskSession(
            client,
            ordered=ordered,
            slots=self.workers,
            target_chunk_s=self.backend.target_chunk_s,
            timeout=None if limits is None else limits.timeout,
        )


class DaskBackend(ClusterBackend):
    """Run tasks on a Dask ``distributed`` cluster (see the module docs).

    Parameters
    ----------
    workers : int, float or None
        Most chunks running at once (default: every thread of the cluster). For a cluster that
        shoal starts, also its number of worker processes (default: usable CPUs).
    address : str or None
        Scheduler to connect to, e.g. ``"tcp://10.0.0.5:8786"``.
    client : distributed.Client or None
        A client to use as is.
    threads_per_worker : int or None
        Threads for BLAS/OpenMP in each worker of a cluster shoal starts (``OMP_NUM_THREADS``
        and friends). Refused with ``address=`` or ``client=``: set it where the workers start.
    memory_limit : int, str or None
        Memory limit per worker of a cluster shoal starts (Dask's nanny restarts a worker over
        it). Refused with ``address=`` or ``client=``.
    target_chunk_s : float
        Wanted compute time of one chunk (one Dask task). The default, 0.1 s, is twice the Ray
        backend's: a Dask task's round trip costs 5-10 ms (the client and the scheduler batch
        their messages, 10 ms and 5 ms apart), and fewer, longer chunks also cost the
        scheduler (in the driver's process, for a local cluster) less.
    """

    name = "dask"

    def __init__(
        self,
        workers: int | float | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        threads_per_worker: int | None = None,
        memory_limit: int | str | None = None,
        target_chunk_s: float = 0.1,
    ) -> None:
        super().__init__(workers)
        _distributed()
        if address is not None and client is not None:
            raise TypeError("give address= or client=, not both")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string, not {type(address).__name__}")
        self.threads_per_worker = check_max_tasks(threads_per_worker, "threads_per_worker")
        external = address is not None or client is not None
        for option, value in (
            ("threads_per_worker", threads_per_worker),
            ("memory_limit", memory_limit),
        ):
            if external and value is not None:
                raise ValueError(
                    f"{option}= applies to a Dask cluster that shoal starts; for a cluster at "
                    f"an address or behind a client, set it where its workers are started"
                )
        if not target_chunk_s > 0:
            raise ValueError(f"target_chunk_s must be positive, got {target_chunk_s}")
        self.address = address
        self.memory_limit = memory_limit
        self.target_chunk_s = float(target_chunk_s)
        self._given = client
        self._client: Any = None
        self._cluster: Any = None
        self._start_lock = threading.Lock()

    def client(self) -> Any:
        """The ``distributed.Client`` this backend uses (connecting or starting on first use)."""
        distributed = _distributed()
        if self._given is not None:
            return self._given
        with self._start_lock:
            if self._client is not None and self._client.status == "running":
                return self._client
            if self.address is not None:
                self._client = distributed.Client(self.address, set_as_default=False)
                return self._client
            try:
                current = distributed.default_client()
            except ValueError:
                current = None
            if current is not None and current.status == "running":
                if self.threads_per_worker is not None or self.memory_limit is not None:
                    raise ValueError(
                        "threads_per_worker= and memory_limit= apply to a Dask cluster that "
                        "shoal starts, but a distributed client is current: set them where "
                        "its workers are started"
                    )
                return current
            self._client = self._start_local(distributed)
            return self._client

    def _start_local(self, distributed: Any) -> Any:
        import dask

        from .processes import thread_limits

        n = resolve_workers(self.workers)
        env = thread_limits(self.threads_per_worker or 1)
        options: dict[str, Any] = {}
        if self.memory_limit is not None:
            options["memory_limit"] = self.memory_limit
        # A task on a worker that died fails at once (KilledWorker) instead of being run again
        # by Dask, so the driver can split its chunk and blame only the item that kills.
        try:
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    # Dask serves HTTP (health, metrics; the dashboard if bokeh is installed)
                    # even with the dashboard "off": a free port on loopback, never 8787.
                    dashboard_address="127.0.0.1:0",
                    env=env,
                    **options,
                )
        except Exception as exc:
            raise WorkerStartError(
                f"could not start a local Dask cluster ({type(exc).__name__}: {exc}). Dask "
                "starts its worker processes by spawning, which imports your script again: "
                "put the code that calls shoal under `if __name__ == '__main__':`, or start a "
                "cluster yourself and pass get_backend('dask', address=...)"
            ) from exc
        _keep_restarting(self._cluster)
        _LOCAL.append(self)
        # Results come straight from the workers, all on this machine: one hop less.
        return distributed.Client(self._cluster, set_as_default=False, direct_to_workers=True)

    @property
    def scheduler_address(self) -> str:
        """Address of the scheduler in use."""
        return str(self.client().scheduler.address)

    def cluster_slots(self) -> int:
        return sum(self.client().nthreads().values())

    def create_pool(self, workers: int, **options: Any) -> DaskPool:
        self.check_pool_options(options)
        return DaskPool(self, workers)

    def shutdown(self, *, kill: bool = False) -> None:
        """Forget the pools; close the client and the cluster if this backend made them."""
        super().shutdown(kill=kill)
        with self._start_lock:
            client, cluster = self._client, self._cluster
            self._client = self._cluster = None
        if client is not None:
            client.close(timeout=5)
        if cluster is not None:
            cluster.close(timeout=5)


def _keep_restarting(cluster: Any) -> None:
    """Keep every worker of a cluster shoal started, however often it dies.

    A ``LocalCluster`` closes the nanny of a worker that left the scheduler if no worker of that
    name is back ``lost-worker-timeout`` later. A worker that dies twice within that time (two
    items timed out on it) is then mid-restart at the check, and the cluster loses it for good.
    Here workers only leave by dying, and their nannies bring them back: skip that check.
    """
    from distributed.deploy.cluster import Cluster

    with contextlib.suppress(Exception):
        cluster._update_worker_status = functools.partial(Cluster._update_worker_status, cluster)


_LOCAL: list[DaskBackend] = []


@atexit.register
def _close_local_clusters() -> None:
    for backend in list(_LOCAL):
        with contextlib.suppress(Exception):
            backend.shutdown(kill=True)
