"""The threads backend: a pool of threads in this process.

For functions that release the GIL (numpy, I/O, compiled extensions). Nothing is pickled, so
any callable and any argument works. What it can honour: ``retries``/``retry_on``, ``on_error``,
progress and callbacks. What it cannot: threads cannot be killed, so ``timeout``,
``max_tasks_per_worker`` and ``max_worker_memory`` are refused with a ``ValueError``, a crash of
the interpreter takes everything down, and aborting a session only drops its queued chunks
(a running chunk finishes in the background).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from .._spec import Limits
from ._base import Backend, LocalSession, Pool, refuse_engine_limits


class ThreadSession(LocalSession):
    """A session whose chunks run on a :class:`ThreadPool`."""

    def __init__(self, pool: ThreadPool, *, ordered: bool) -> None:
        super().__init__(ordered=ordered, workers=pool.workers)
        self._pool = pool

    # Seeded items set the process-wide random state, which threads share: one at a time.
    _seed_lock = threading.Lock()

    def _enqueue(self, seq: int, spec_id: int, items: list[Any], start: int) -> None:
        self._pool._put(self, seq, spec_id, items, start)


class ThreadPool(Pool):
    """Up to ``workers`` threads, started on demand, exiting after ``idle_timeout`` seconds."""

    def __init__(self, workers: int, idle_timeout: float = 60.0) -> None:
        self.workers = workers
        self._idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._closed = False

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> ThreadSession:
        refuse_engine_limits("threads", limits)
        if self._closed:
            raise RuntimeError("this thread pool has been shut down")
        return ThreadSession(self, ordered=ordered)

    def _put(
        self, session: ThreadSession, seq: int, spec_id: int, items: list[Any], start: int
    ) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this thread pool has been shut down")
            self._jobs.put((session, seq, spec_id, items, start))
            if self._idle == 0 and len(self._threads) < self.workers:
                t = threading.Thread(target=self._serve, name="shoal-thread", daemon=True)
                self._threads.add(t)
                t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                job = None
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads.discard(me)
                    return
            session, seq, spec_id, items, start = job
            session._run(seq, spec_id, items, start)
            # An idle thread must not keep the last task's arguments (or session) alive.
            del job, session, items

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
            for _ in threads:
                self._jobs.put(None)
        if wait and not kill:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()


class ThreadBackend(Backend):
    """Run tasks on threads of this process.

    Parameters
    ----------
    workers : int, float or None
        Number of threads (see :func:`shoal.map`).
    idle_timeout : float
        Seconds after which an idle thread exits.
    """

    name = "threads"

    def __init__(self, workers: int | float | None = None, *, idle_timeout: float = 60.0) -> None:
        super().__init__(workers)
        self.idle_timeout = idle_timeout

    def create_pool(self, workers: int, **options: Any) -> ThreadPool:
        self.check_pool_options(options)
        return ThreadPool(workers, self.idle_timeout)
