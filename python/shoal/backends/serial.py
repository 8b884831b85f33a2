"""The serial backend: everything runs in the calling thread, one chunk at a time.

For debugging (breakpoints and profilers work) and as the reference every other backend must
match. Chunks run lazily, when the driver waits for them, so inputs are still read as needed.
Like threads, it honours ``retries``/``retry_on`` but refuses ``timeout``,
``max_tasks_per_worker`` and ``max_worker_memory``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .._spec import ChunkResult, Limits
from ._base import Backend, LocalSession, Pool, refuse_engine_limits


class SerialSession(LocalSession):
    """Runs each chunk when the driver asks for results."""

    def __init__(self, *, ordered: bool) -> None:
        super().__init__(ordered=ordered, workers=1)
        self.max_in_flight = 1
        self._pending: deque[tuple[int, int, list[Any], int]] = deque()

    def _enqueue(self, seq: int, spec_id: int, items: list[Any], start: int) -> None:
        self._pending.append((seq, spec_id, items, start))
        # An Executor's pump may be blocked in wait() with nothing to run: let it come back.
        self.wake()

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        while self._pending and not self._ready:
            self._run(*self._pending.popleft())
        if self._ready or self._pending:
            return super().wait(0)
        # Nothing to run: block like any session (until a submit or wake), instead of
        # returning at once to a caller that would spin on it.
        return super().wait(timeout)

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        dropped = super().cancel(seqs)
        self._pending = deque(job for job in self._pending if not self._skipped(job[0]))
        return dropped


class SerialPool(Pool):
    """A pool of one: the calling thread."""

    def __init__(self) -> None:
        self.workers = 1

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> SerialSession:
        refuse_engine_limits("serial", limits)
        return SerialSession(ordered=ordered)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        pass


class SerialBackend(Backend):
    """Run tasks one after another in the calling thread (``workers`` is ignored)."""

    name = "serial"

    def __init__(self, workers: int | float | None = None) -> None:
        super().__init__(workers)

    def pool(self, workers: int | float | None = None, **options: Any) -> SerialPool:
        self.check_pool_options(options)
        return SerialPool()

    def create_pool(self, workers: int, **options: Any) -> SerialPool:
        self.check_pool_options(options)
        return SerialPool()
