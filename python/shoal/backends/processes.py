"""The processes backend (the default): worker processes run by shoal's Rust engine.

Data flow for one chunk::

    driver: pickle(items) ──► Engine.submit ──► [Rust scheduler] ──► socket ──► worker
    driver: decode ◄── Engine.wait (GIL released) ◄── [ordering] ◄── socket ◄── pickle(results)

Functions and fixed arguments are cloudpickled once per call and sent to each worker once; a
chunk's items are pickled in one ``pickle.dumps`` call. Worker processes are started with
fork+exec (never a bare fork of this threaded process), on demand, and exit when idle.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import weakref
from typing import Any

from .. import _native
from .. import _shm as shm
from .._errors import PicklingError, ShoalError
from .._options import check_max_tasks, cpu_count
from .._pickling import (
    MAX_MESSAGE_BYTES,
    decode_outcome,
    dumps_items,
    dumps_spec,
    needs_by_value,
    plain_values,
)
from .._spec import NO_LIMITS, CallSpec, ChunkResult, Crash, ItemError, Limits
from ._base import Backend, Pool, Session
from ._cost_hints import CostHints, cost_key

_WORKER_ARGS = ["-c", "from shoal._worker import main; main()"]


def _crash(kind: int, pid: int | None, message: str) -> Crash:
    if kind == _native.OUTCOME_START_FAILED:
        return Crash(pid, message, "start_failed")
    if kind == _native.OUTCOME_TIMED_OUT:
        return Crash(pid, "timed out", "timed_out", limit=int(message) / 1e9)
    if kind == _native.OUTCOME_MEMORY_EXCEEDED:
        rss, limit = (int(x) for x in message.split())
        return Crash(pid, "memory limit", "memory", limit=limit, rss=rss)
    return Crash(pid, message, "crashed")


_LIVE_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


class ProcessSession(Session):
    """A session on the native engine; ordering is done by the Rust scheduler."""

    def __init__(self, pool: ProcessPool, *, ordered: bool, limits: Limits | None = None) -> None:
        self._pool = pool  # keeps the pool (and its workers) alive while the session runs
        self._closed = False
        self._segments = shm.SegmentCache(keep=True)
        self._engine = pool._engine
        lim = limits or NO_LIMITS
        self._id = self._engine.open_session(
            ordered,
            lim.timeout,
            lim.max_tasks_per_worker,
            lim.max_worker_memory,
            lim.max_load,
            lim.max_memory,
        )
        self.max_in_flight = in_flight_window(pool.workers)
        self._hints = pool._cost_hints
        self._cost_keys: dict[int, Any] = {}  # spec id -> its function's key in the hints

    def register(self, spec: CallSpec) -> int:
        spec_id = int(self._engine.add_setup(self._id, dumps_spec(spec, self._segments)))
        key = cost_key(spec.fn)
        self._cost_keys[spec_id] = key
        hint = self._hints.get(key)
        if hint is not None:
            self._engine.hint_setup(spec_id, hint)
        return spec_id

    def _remember_cost(self, spec_id: int) -> None:
        key = self._cost_keys.pop(spec_id, None)
        self._hints.put(key, self._engine.item_ns(spec_id))

    def unregister(self, spec_id: int) -> None:
        self._remember_cost(spec_id)
        self._engine.remove_setup(spec_id)

    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        # Plain data (numbers, strings, bytes) is packed by Rust; a range chunk is already a
        # few bytes; anything else is pickled.
        packed = _native.pack_plain(start, items) if type(items) is list else None
        return self._submit(spec_id, len(items), start, exclusive, packed, items)

    def submit_slice(self, spec_id: int, source: list[Any], lo: int, hi: int) -> int:
        packed = _native.pack_plain(lo, source, lo, hi)
        # Only a chunk that must be pickled is sliced.
        items = source[lo:hi] if packed is None else None
        return self._submit(spec_id, hi - lo, lo, False, packed, items)

    def _submit(
        self,
        spec_id: int,
        count: int,
        start: int,
        exclusive: bool,
        packed: bytes | None,
        items: Any,
    ) -> int:
        """Queue ``count`` items from input index ``start``: ``packed`` if plain values were
        packed, else ``items`` pickled."""
        made_before = self._segments.made_bytes
        if packed is not None:
            payload = packed
        else:
            try:
                # The fast path, inlined: hot for futures. The start index lets the worker give
                # each item its own random stream (seed=); large buffers go to shared memory.
                payload = shm.dumps((start, items), self._segments)
                if needs_by_value(payload):  # e.g. instances of a class defined in __main__
                    payload = dumps_items(items, start, self._segments)
            except Exception:
                # cloudpickle, or an error naming the item
                payload = dumps_items(items, start, self._segments)
        if len(payload) > MAX_MESSAGE_BYTES:
            raise PicklingError(
                f"the arguments of items {start}..{start + count - 1} pickle to "
                f"{len(payload)} bytes, over the channel limit of {MAX_MESSAGE_BYTES} bytes "
                f"(SHOAL_MAX_MESSAGE_BYTES)"
            )
        # What this chunk holds while in flight: its pickle, and buffers newly copied to
        # shared memory for it.
        self.last_submit_nbytes = len(payload) + self._segments.made_bytes - made_before
        return int(self._engine.submit(spec_id, count, payload, exclusive))

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        return int(self._engine.chunk_size(spec_id, remaining))

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        out = []
        done, partial = _native.OUTCOME_DONE, _native.OUTCOME_PARTIAL
        try:
            outcomes = self._engine.wait(self._id, timeout)
        except _native.EngineError as exc:
            if self._closed:
                raise ShoalError("this call was closed while a thread waited for it") from None
            raise ShoalError(f"the pool stopped while this call was running: {exc}") from exc
        plain = shm.PLAIN
        for seq, kind, payload, elapsed, pid, message, segments in outcomes:
            if kind == done and not segments and payload.startswith(plain):
                # Plain values with no errors: the driver unpacks them once it has sent the
                # next chunks (see ChunkResult.packed).
                unpack = functools.partial(plain_values, payload)
                out.append(ChunkResult(seq, None, None, None, elapsed, len(payload), False, unpack))
            elif kind in (done, partial):
                try:
                    values, errors = decode_outcome(payload, segments)
                except Exception as exc:
                    err = PicklingError(f"a result could not be unpickled in the driver: {exc!r}")
                    count = int(message) if kind == partial else 1
                    values = [None] * count
                    errors = [ItemError(i, err, "", "") for i in range(count)]
                nbytes = len(payload) + sum(s.size for s in segments)
                is_partial = kind == partial
                out.append(ChunkResult(seq, values, errors, None, elapsed, nbytes, is_partial))
            else:
                out.append(ChunkResult(seq, [], crash=_crash(kind, pid, message)))
        return out

    #: Registered specs live in the engine as bytes only.
    holds_specs = False

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        return list(self._engine.cancel(self._id, seqs))

    def wake(self) -> None:
        self._engine.wake(self._id)

    def close(self, *, abort: bool = False) -> None:
        self._closed = True
        for spec_id in list(self._cost_keys):
            self._remember_cost(spec_id)
        self._engine.close_session(self._id, abort)
        # Workers that still run tasks of this call keep their own mappings.
        self._segments.close()


def in_flight_window(workers: int) -> int:
    """Chunks a call keeps submitted and not yet consumed on a pool of ``workers``.

    The engine, not the driver, hands queued chunks to workers (from its own threads, as results
    come back), so a deep window lets the workers go on while the driver's thread waits for a
    core: with as many busy workers as cores, it may wait a millisecond, and a shallow window
    ran dry meanwhile (100,000 no-op calls took a quarter longer). Memory stays bounded by this
    count and by the driver's bytes bound (``READ_AHEAD_BYTES``).
    """
    return 4 * workers + 8


#: Open descriptors the driver may need: results waiting to be read hold one per large buffer.
WANTED_DESCRIPTORS = 16384


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open files towards the hard one (as Ray and Dask do).

    Each large buffer of a result arrives as a descriptor that lives until the result is
    unpickled, and results of many workers can be waiting at once; the usual soft limit of 1024
    would then be the first thing to break. Only the soft limit moves, never above the hard one.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = (
            WANTED_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, WANTED_DESCRIPTORS)
        )
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass  # not fatal: only many large results at once would need more


class ProcessPool(Pool):
    """A pool of worker processes.

    Parameters
    ----------
    workers : int
        Pool size.
    idle_timeout : float or None
        Seconds after which an idle worker exits (``None``: never). Workers come back on demand.
    python : str
        Interpreter for the workers (default: this one).
    env : dict
        Extra environment variables for the workers.
    threads_per_worker : int or None
        Threads each worker's numeric libraries may use (see :func:`thread_limits`); default:
        usable CPUs divided by workers, at least 1.
    queue_any : bool
        Queue any task behind a busy worker's running one, not only cheap ones: for a client
        that bounds the work it hands over itself (an MPI relay with one worker).
    """

    def __init__(
        self,
        workers: int,
        *,
        idle_timeout: float | None = 60.0,
        python: str | None = None,
        env: dict[str, str] | None = None,
        threads_per_worker: int | None = None,
        load_check_interval: float = 0.5,
        queue_any: bool = False,
    ) -> None:
        self.workers = workers
        self.threads_per_worker = threads_per_worker or max(1, cpu_count() // workers)
        _raise_descriptor_limit()
        worker_env = {
            **thread_limits(self.threads_per_worker),
            # So that functions pickled by reference import in the worker as in the driver.
            "SHOAL_SYS_PATH": os.pathsep.join(p for p in sys.path if p),
            "SHOAL_WORKER": "1",
            **(env or {}),
        }
        self._engine = _native.Engine(
            python or sys.executable,
            _WORKER_ARGS,
            list(worker_env.items()),
            workers,
            idle_timeout,
            machine_interval=load_check_interval,
            queue_any=queue_any,
        )
        self._lock = threading.Lock()
        self._cost_hints = CostHints()
        _LIVE_POOLS.add(self)

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> ProcessSession:
        return ProcessSession(self, ordered=ordered, limits=limits)

    def prestart(self) -> None:
        """Start all workers now rather than at first use."""
        self._engine.prestart(self.workers)

    def pids(self) -> list[int]:
        """Pids of the live worker processes."""
        return list(self._engine.pids())

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        self._engine.shutdown(kill or not wait)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown(True)


#: Variables through which BLAS, OpenMP, numexpr and numba size their thread pools.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def thread_limits(threads: int) -> dict[str, str]:
    """Environment that caps numeric libraries at ``threads`` threads in a worker.

    Without it, each of N workers starts a BLAS pool as large as the machine, and N x cores
    threads fight for cores. Set in the worker's environment at exec time, it applies before any
    import. A variable the user set explicitly in this process wins: it is left as inherited.
    """
    return {name: str(threads) for name in THREAD_VARIABLES if name not in os.environ}


class ProcessBackend(Backend):
    """Run tasks in worker processes managed by shoal's Rust engine (the default backend).

    Parameters
    ----------
    workers : int, float or None
        Pool size (see :func:`shoal.map`).
    idle_timeout : float or None
        Seconds after which idle workers exit; they restart on demand.
    python : str or None
        Interpreter for the workers (default: :data:`sys.executable`).
    env : dict or None
        Extra environment variables for the workers.
    threads_per_worker : int or None
        Threads for BLAS/OpenMP/numexpr/numba in each worker (``OMP_NUM_THREADS`` and friends,
        set before any import). Default: usable CPUs divided by workers, at least 1, so numpy in
        workers does not oversubscribe the machine. Variables you set yourself win.
    load_check_interval : float
        Seconds between the engine's readings of machine load and memory, for calls with
        ``max_load=`` or ``max_memory=``.
    """

    name = "processes"
    pool_options = frozenset({"threads_per_worker"})

    def __init__(
        self,
        workers: int | float | None = None,
        *,
        idle_timeout: float | None = 60.0,
        python: str | None = None,
        env: dict[str, str] | None = None,
        threads_per_worker: int | None = None,
        load_check_interval: float = 0.5,
    ) -> None:
        super().__init__(workers)
        if not load_check_interval > 0:
            raise ValueError(f"load_check_interval must be positive, got {load_check_interval}")
        self.load_check_interval = float(load_check_interval)
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        self.idle_timeout = idle_timeout
        self.python = python
        self.env = dict(env or {})
        self.threads_per_worker = check_max_tasks(threads_per_worker, "threads_per_worker")

    def create_pool(
        self, workers: int, *, threads_per_worker: int | None = None, **options: Any
    ) -> ProcessPool:
        self.check_pool_options(options)
        return ProcessPool(
            workers,
            idle_timeout=self.idle_timeout,
            python=self.python,
            env=self.env,
            threads_per_worker=check_max_tasks(threads_per_worker, "threads_per_worker")
            or self.threads_per_worker,
            load_check_interval=self.load_check_interval,
        )


@atexit.register
def _shutdown_all() -> None:
    # Threads still waiting in the engine must not take the GIL back during finalization.
    _native.at_exit()
    # Nothing may outlive the interpreter: kill workers of every pool still alive.
    for pool in list(_LIVE_POOLS):
        pool.shutdown(kill=True)
