"""The ray backend: shoal calls on a Ray cluster.

Which cluster: the one Ray is already initialised with in this process (``ray.init()``); else
``address=`` (``"auto"`` for a cluster started with ``ray start`` on this machine, or
``"host:port"``); else a local Ray started at first use on 127.0.0.1 (node address, GCS,
raylet, workers and the runtime-env agent all listen on loopback only), with ``workers`` CPUs
and no dashboard, which Ray stops at interpreter exit.

Per call, the spec goes through the object store once (``ray.put``); each chunk is one remote
task running :func:`shoal.backends._remote.run_remote`. Ray's own retries are off
(``max_retries=0``): a chunk whose worker died comes back as a crash, and the driver runs its
items again one by one, so only the item that kills its worker is blamed and ``retries=``
counts per item, as on every backend. ``timeout=`` runs one item per task, as a streaming task
that first sends its worker's pid when it starts, and cancels it once past its limit from that
moment with ``ray.cancel(force=True)``, which kills its worker.

Requires ``pip install 'shoal[ray]'``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from .._options import check_max_tasks, resolve_workers
from .._spec import ChunkResult, Crash, Limits
from ._cluster import NOT_ON_A_CLUSTER, ClusterBackend, ClusterPool, ClusterSession, refuse
from ._remote import run_remote, run_remote_streaming


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the ray backend needs Ray, which cannot be imported ({exc}): pip install 'shoal[ray]'"
        ) from exc
    return ray


def _on_loopback(address: str) -> bool:
    """Whether a Ray address (``"host:port"``, ``"ray://host:port"``) is on loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _loopback_node(ray: Any) -> Iterator[None]:
    """While a local Ray starts: its node address is 127.0.0.1, so that its servers listen on
    loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback
    address by the machine's first interface unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    was set before ``ray`` was imported (it is read once, at import), and then its GCS,
    raylet and workers listen on every interface. Ray reads the value it took at import from
    ``ray._private.ray_constants`` each time: it is switched off here for the start only, so
    that a later ``ray.init(address=...)`` in this process still finds a multi-node cluster.
    """
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is None or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        # Another Ray layout: the environment variable still works if read after this.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        yield
        return
    previous = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = previous
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":
        warnings.warn(
            f"Ray's node address in this process is {node}, not 127.0.0.1: a Ray that shoal "
            f"starts may listen on every interface",
            RuntimeWarning,
            stacklevel=4,
        )


_REFUSED = {
    "max_worker_memory": (
        "Ray watches memory per node, not per worker (its memory monitor kills tasks when a "
        "node's memory use passes RAY_memory_usage_threshold); use that, or the processes backend"
    ),
    "max_load": NOT_ON_A_CLUSTER,
    "max_memory": NOT_ON_A_CLUSTER,
}

_remote_fns: dict[tuple[bool, int | None], Any] = {}
_remote_lock = threading.Lock()


def _task(ray: Any, max_calls: int | None, streaming: bool) -> Any:
    """The remote task (one per ``max_calls`` and kind, which Ray takes only at definition)."""
    with _remote_lock:
        fn = _remote_fns.get((streaming, max_calls))
        if fn is None:
            extra: dict[str, Any] = {"max_retries": 0}
            if max_calls is not None:
                extra["max_calls"] = max_calls
            body: Any = run_remote
            if streaming:
                extra["num_returns"] = "streaming"
                body = run_remote_streaming
            fn = _remote_fns[(streaming, max_calls)] = ray.remote(**extra)(body)
        return fn


class RaySession(ClusterSession):
    """One call on Ray: chunks are remote tasks, polled with ``ray.wait`` in short slices."""

    engine = "ray"
    # ray.wait cannot be woken: short slices, so chunks submitted meanwhile (an Executor's)
    # are waited for soon.
    slice_s = 0.01

    def __init__(
        self,
        ray: Any,
        *,
        ordered: bool,
        slots: int,
        target_chunk_s: float,
        limits: Limits | None,
        env: dict[str, str],
    ) -> None:
        super().__init__(ordered=ordered, slots=slots, target_chunk_s=target_chunk_s)
        self._ray = ray
        self._timeout = None if limits is None else limits.timeout
        self._max_calls = None if limits is None else limits.max_tasks_per_worker
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0, "retry_exceptions": False}
        if env:
            options["runtime_env"] = {"env_vars": env}
        # With max_calls, Ray ends a worker after that many calls of the task; one item per
        # task (see chunk_size) makes calls and items the same. With a timeout, the task
        # streams its worker's pid when it starts, and its clock starts then.
        streaming = self._timeout is not None
        self._fn = _task(ray, self._max_calls, streaming).options(**options)
        #: seq -> (when it was seen to start, its worker's pid); timed tasks only.
        self._began: dict[int, tuple[float, int]] = {}

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        if self._max_calls is not None:
            return 1
        return super().chunk_size(spec_id, remaining)

    def _put_spec(self, blob: bytes) -> Any:
        return self._ray.put(blob)

    def _start(self, seq: int, spec_id: int, token: str, spec: Any, payload: bytes) -> Any:
        return self._fn.remote(token, spec, payload)

    def _collect(self, timeout: float) -> list[ChunkResult]:
        ray = self._ray
        with self._lock:
            by_ref = {entry[2]: seq for seq, entry in self._live.items() if entry[2] is not None}
            began = [self._began[s][0] for s in by_ref.values() if s in self._began]
        out: list[ChunkResult] = []
        if not by_ref:
            with self._cond:
                if not self._woken and timeout > 0:
                    self._cond.wait(timeout)
            return out
        wait_s = timeout
        if self._timeout is not None and began:
            wait_s = max(0.0, min(wait_s, min(began) + self._timeout - time.monotonic()))
        refs = list(by_ref)
        ready, rest = ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        with self._lock:
            for ref in ready:
                self._take(ref, by_ref[ref], out)
            if self._timeout is not None:
                self._time_out(by_ref, out)
        return out

    def _take(self, ref: Any, seq: int, out: list[ChunkResult]) -> None:
        """Read what a ready task (or the next value of a streaming one) brought."""
        if seq not in self._live:
            return
        pid = self._began.get(seq, (0.0, None))[1]
        try:
            if self._timeout is None:
                outcome = self._ray.get(ref)
            else:
                value = self._ray.get(next(ref))
                if seq not in self._began:  # the first value: the chunk started
                    self._began[seq] = (time.monotonic(), value)
                    return
                outcome = value
        except StopIteration:
            res = self._crashed(seq, Crash(pid, "its task ended without a result"))
        except Exception as exc:
            res = self._crashed(seq, _crash_of(exc, pid))
        else:
            res = self._finished(seq, outcome)
        self._began.pop(seq, None)
        if res is not None:
            out.append(res)

    def _time_out(self, by_ref: dict[Any, int], out: list[ChunkResult]) -> None:
        assert self._timeout is not None
        now = time.monotonic()
        for ref, seq in by_ref.items():
            began = self._began.get(seq)
            if seq not in self._live:
                self._began.pop(seq, None)  # cancelled meanwhile
            elif began is not None and now - began[0] >= self._timeout:
                self._ray.cancel(ref, force=True)  # kills its worker: the only way to stop it
                del self._began[seq]
                crash = Crash(began[1], "timed out", "timed_out", limit=self._timeout)
                res = self._crashed(seq, crash)
                if res is not None:
                    out.append(res)

    def _stop(self, handles: list[Any]) -> None:
        for ref in handles:
            # A queued task is dropped; a running one gets KeyboardInterrupt in its thread.
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=False)


def _crash_of(exc: BaseException, pid: int | None = None) -> Crash:
    """A Ray task error as shoal's crash (``run_remote`` itself never raises a task error)."""
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return Crash(pid, f"Ray's memory monitor killed its worker ({name})")
    if name in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError"):
        return Crash(pid, f"its Ray worker died ({name})")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return Crash(pid, f"the Ray task failed: {name}: {first}")


class RayPool(ClusterPool):
    """The CPUs of a Ray cluster; see :class:`ClusterPool`."""

    backend: RayBackend

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> RaySession:
        refuse("ray", limits, ("timeout", "max_tasks_per_worker"), _REFUSED)
        ray = self.backend.connect()
        return RaySession(
            ray,
            ordered=ordered,
            slots=self.workers,
            target_chunk_s=self.backend.target_chunk_s,
            limits=limits,
            env=self.backend.worker_env(),
        )


class RayBackend(ClusterBackend):
    """Run tasks on a Ray cluster (see the module docs).

    Parameters
    ----------
    workers : int, float or None
        Most chunks running at once (default: every CPU of the cluster). For a Ray that shoal
        starts, also its number of CPUs (default: usable CPUs).
    address : str or None
        Cluster to connect to (``"auto"``, ``"host:port"`` or ``"ray://host:10001"``), when
        Ray is not initialised yet in this process.
    threads_per_worker : int or None
        Threads for BLAS/OpenMP in the tasks' workers (``OMP_NUM_THREADS`` and friends, through
        the task's ``runtime_env``; Ray's own default is one per task CPU).
    target_chunk_s : float
        Wanted compute time of one chunk (one Ray task).
    """

    name = "ray"

    def __init__(
        self,
        workers: int | float | None = None,
        *,
        address: str | None = None,
        threads_per_worker: int | None = None,
        target_chunk_s: float = 0.05,
    ) -> None:
        super().__init__(workers)
        _ray()
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string, not {type(address).__name__}")
        if not target_chunk_s > 0:
            raise ValueError(f"target_chunk_s must be positive, got {target_chunk_s}")
        self.address = address
        self.threads_per_worker = check_max_tasks(threads_per_worker, "threads_per_worker")
        self.target_chunk_s = float(target_chunk_s)
        self._started = False
        self._lock_init = threading.Lock()

    def connect(self) -> Any:
        """The ``ray`` module, initialised (connecting or starting a local Ray on first use)."""
        ray = _ray()
        with self._lock_init:
            if not ray.is_initialized():
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                if self.address is not None:
                    # A driver that joins a Ray on loopback must itself have node address
                    # 127.0.0.1, or Ray looks for a raylet at this machine's first interface.
                    joining = (
                        _loopback_node(ray)
                        if _on_loopback(self.address)
                        else contextlib.nullcontext()
                    )
                    with joining:
                        ray.init(address=self.address, log_to_driver=True)
                else:
                    with _loopback_node(ray):
                        ray.init(
                            num_cpus=resolve_workers(self.workers),
                            include_dashboard=False,
                            _node_ip_address="127.0.0.1",
                        )
                    self._started = True
        return ray

    def worker_env(self) -> dict[str, str]:
        """Environment variables for the tasks' workers."""
        if self.threads_per_worker is None:
            return {}
        from .processes import THREAD_VARIABLES

        return {name: str(self.threads_per_worker) for name in THREAD_VARIABLES}

    def cluster_slots(self) -> int:
        ray = self.connect()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def create_pool(self, workers: int, **options: Any) -> RayPool:
        self.check_pool_options(options)
        return RayPool(self, workers)

    def shutdown(self, *, kill: bool = False) -> None:
        """Forget the pools; stop Ray if this backend started it."""
        super().shutdown(kill=kill)
        with self._lock_init:
            started, self._started = self._started, False
        if started:
            _ray().shutdown()
