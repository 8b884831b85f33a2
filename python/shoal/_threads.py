"""Daemon threads kept for the next job once theirs ends.

Starting a thread costs 50-500 us on a busy machine (``Thread.start`` waits until the new thread
runs), and some threads sit on the path of a first result: an Executor's pump, which a fresh
Executor starts at its first ``submit``, and an MPI relay's reply thread for a new call. A
thread that waits for work takes a new job in microseconds.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

#: Seconds an idle thread waits for a job before it ends.
IDLE_TIMEOUT = 60.0


class Reused:
    """Runs jobs (callables of no argument) on daemon threads named ``name-N``, each thread
    taking the next job once its own ends.

    At most ``keep`` threads wait idle; one more than that ends after its job, and any but the
    last idle one ends after :data:`IDLE_TIMEOUT` seconds without a job. With ``prestart``, one
    waits from the start.
    A job that raises has its exception reported like that of a plain thread
    (:func:`threading.excepthook`), and the thread goes on.
    """

    def __init__(self, name: str, *, keep: int = 4, prestart: bool = False) -> None:
        self._name = name
        self._keep = keep
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0
        if prestart:
            with self._lock:
                self._spawn()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on an idle thread, or on a new one if none is idle."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            else:
                self._spawn()
                self._idle -= 1
        self._jobs.put(job)

    def _spawn(self) -> None:
        """Start one more thread, counted idle (lock held)."""
        self._count += 1
        self._idle += 1
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{self._count}")
        thread.daemon = True
        thread.start()

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    # The last idle thread stays (it costs no CPU): the next job is quick.
                    if self._idle > 1 and self._jobs.empty():
                        self._idle -= 1
                        return
                continue
            if job is None:
                return
            try:
                job()
            except BaseException:
                args = (*sys.exc_info(), threading.current_thread())
                threading.excepthook(threading.ExceptHookArgs(args))
            job = None  # hold nothing of the job while idle
            with self._lock:
                if self._idle >= self._keep:
                    return
                self._idle += 1
