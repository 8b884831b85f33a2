"""The driver: runs one call on any backend's session with the same semantics everywhere.

It reads the input lazily, sizes chunks (the backend's adaptive policy, or ``chunksize``),
keeps at most ``session.max_in_flight`` chunks submitted and not yet consumed (memory stays
bounded on the input side *and* for results waiting on a slow consumer; an infinite generator
works), and turns each finished chunk into values or errors according to ``on_error``.

Results travel as *batches* (``(start_index, values)`` per chunk) so that ``map`` can extend a
list per chunk instead of paying a generator step per item.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from ._errors import (
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerMemoryError,
    WorkerStartError,
    annotate,
    note_attempts,
)
from ._spec import CallSpec, ChunkResult, Crash, Limits, describe_item
from .backends._base import Session

#: What :meth:`Run.loop` yields: a batch, and whether it may be handed over in place (see
#: :func:`_handed_over`): its values are plain (numbers, strings, bytes, None, as packed by
#: Rust), which have no lifetime a caller could observe (no weak references, no ``__del__``),
#: and together at most :data:`SMALL_BATCH_BYTES`.
Yielded = tuple[int, list[Any], bool]

#: Bytes of plain values under which a batch is handed over in place, not popped: holding its
#: consumed values until the batch is done costs little, and popping ~10 ns per value.
SMALL_BATCH_BYTES = 1 << 20

#: Bytes of input and results a call may hold ahead of its consumer (besides the chunk count
#: bound): a few tens of MiB, so cheap items of some size cannot pile up by the hundred
#: thousand. ``SHOAL_READ_AHEAD_BYTES`` changes it.
READ_AHEAD_BYTES = int(os.environ.get("SHOAL_READ_AHEAD_BYTES", str(32 * 2**20)))

#: An ordered call (``imap``, ``Executor.map``) parks results that finish before an earlier,
#: slower chunk. Up to this many windows of chunks may wait so (within the bytes bound above):
#: with one window, a single long item at the head stalled every other worker as soon as a
#: window of later chunks had finished (heavy-tailed tasks ran at about half speed on 16
#: workers). Chunks in flight, and results waiting for a slow consumer, keep one window.
PARKED_WINDOWS = 16

#: With ``store=``, chunks aim at this many times the engine's chunk length (see next_size).
STORE_CHUNK_FACTOR = 3


def approx_size(obj: Any) -> int:
    """A cheap estimate of the memory an object holds, for backends that do not pickle.

    Exact for bytes, str and arrays (``sys.getsizeof`` counts the data an object owns); for a
    container, its own size plus a sample of its elements scaled up. It never raises.
    """
    try:
        size = sys.getsizeof(obj)
        if isinstance(obj, memoryview):
            return size + obj.nbytes
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)) and obj:
            step = max(1, len(obj) // 8)
            sample = obj[::step][:8]
            size += sum(sys.getsizeof(x) for x in sample) * len(obj) // len(sample)
        return size
    except Exception:
        return 64


def _crash_error(crash: Crash, index: int, arguments: str, spec: CallSpec) -> BaseException:
    exc = _crash_exception(crash, index, arguments, spec)
    if crash.note:
        exc.add_note(crash.note)
    crash.locate(exc)
    return exc


def _crash_exception(crash: Crash, index: int, arguments: str, spec: CallSpec) -> BaseException:
    if crash.kind == "start_failed":
        return WorkerStartError(f"could not start worker processes: {crash.exit}")
    if crash.kind == "timed_out":
        return TaskTimeoutError(index, arguments, crash.pid, crash.limit, spec.name)
    if crash.kind == "memory":
        return WorkerMemoryError(
            index, arguments, crash.pid, crash.rss, int(crash.limit), spec.name
        )
    return WorkerCrashedError(index, arguments, crash.pid, crash.exit, spec.name)


def _describe_crash(crash: Crash) -> str:
    if crash.kind == "timed_out":
        return f"timed out after {crash.limit:g} s"
    if crash.kind == "memory":
        return f"worker memory {crash.rss / 2**20:.0f} MiB over the limit"
    return f"worker (pid {crash.pid}) died: {crash.exit}"


class _Pending:
    """A submitted chunk: where it starts in the input, its items, earlier failed attempts,
    and the bytes it holds while in flight.

    A chunk sent as a range of the input list (``source``) is sliced from it only if its items
    are needed again (an error to describe, a crash to re-run): usually they never are.
    """

    __slots__ = ("_chunk", "attempts", "nbytes", "source", "start", "stop")

    def __init__(
        self,
        start: int,
        chunk: list[Any] | None,
        attempts: list[str],
        nbytes: int,
        source: list[Any] | None = None,
        stop: int = 0,
    ) -> None:
        self.start = start
        self._chunk = chunk
        self.attempts = attempts
        self.nbytes = nbytes
        self.source = source
        self.stop = stop

    @property
    def chunk(self) -> Any:
        if self._chunk is None:
            assert self.source is not None
            self._chunk, self.source = self.source[self.start : self.stop], None
        return self._chunk

    @chunk.setter
    def chunk(self, items: Any) -> None:
        self._chunk, self.source = items, None


class Run:
    """One call on an open session; :meth:`loop` yields ``(start_index, values)`` batches.

    Batches come in input order if ``ordered``, else in completion order. With
    ``on_error="raise"`` the call stops at a failure: chunks after it are dropped, no more input
    is read, and its running tasks are stopped. If ``ordered`` or
    ``first_error_in_input_order``, the chunks before the failing item still finish, so the
    exception raised is that of the failing item with the lowest index, whatever the timing.

    A chunk whose worker died is split: each of its items runs again, alone, so that only the
    culprit is blamed. An item that crashed, timed out, ran out of memory, or raised one of
    ``limits.retry_on`` runs again up to ``limits.retries`` times; the final error lists the
    attempts.

    With ``range_source`` (the input is one ``range``, list or tuple), chunks are slices of it:
    sub-ranges pickle to a few bytes and the worker makes the integers itself; slices of a
    list are cut in C instead of item by item.

    The session is closed when the generator ends or fails; on Ctrl-C, or when the generator is
    closed before its end, it is aborted (its running tasks are stopped where the engine can).
    """

    def __init__(
        self,
        session: Session,
        spec_id: int,
        spec: CallSpec,
        items: Iterator[Any],
        total: int | None,
        *,
        on_error: str,
        chunksize: int | None,
        deadline: float | None,
        ordered: bool,
        first_error_in_input_order: bool,
        limits: Limits,
        progress: Any,
        callback: Callable[[Any], Any] | None,
        range_source: range | list[Any] | tuple[Any, ...] | None = None,
        store: Any = None,
    ) -> None:
        self.session = session
        #: ``store=``/``capture=``: a :class:`shoal.store._recorder.CallRecorder` that reads the
        #: input (skipping stored items) and records results; ``None`` otherwise.
        self.store = store
        self.range_source = range_source
        self.spec_id = spec_id
        self.spec = spec
        self.items = items
        self.remaining = total
        self.raise_first = on_error == "raise"
        # A per-item timeout needs single-item tasks: the engine times tasks, not items
        # (unless the session times each item itself, as the slurm backend's tasks do).
        per_task = limits.timeout is not None and not session.times_items
        self.chunksize = 1 if per_task else chunksize
        self.deadline = deadline
        self.ordered = ordered
        self.errors_in_input_order = first_error_in_input_order or ordered
        self.retries = limits.retries
        self.retry_on = limits.retry_on
        self.progress = progress
        self.callback = callback
        self.window = max(1, session.max_in_flight)  # read again as it may grow (mpi)
        # Bytes bound: what in-flight chunks hold, plus results not yet handed over (counted
        # per value at the last measured size of a result).
        self.max_bytes = READ_AHEAD_BYTES
        self.in_flight_bytes = 0
        self.item_bytes = 0.0  # measured input bytes per item (0: not yet known)
        self.result_bytes = 0.0  # measured result bytes per value
        self.values_held = 0  # values in ``ready`` and ``parked``
        self.in_flight: dict[int, _Pending] = {}
        self.released: dict[int, _Pending] = {}  # finished, values not yet handled
        self.released_bytes = 0  # what those values travelled as
        self.next_index = 0
        self.exhausted = False
        self.input_error: BaseException | None = None
        self.ready: deque[Yielded] = deque()
        self.expected = 0  # ordered: the next input index to hand out
        self.parked: dict[int, tuple[list[Any], bool]] = {}  # start -> (values, plain)
        self.failure: tuple[int, BaseException] | None = None
        self.raise_now = False
        self.done = 0
        self.failed = 0

    # -- input side ------------------------------------------------------------------------

    def held(self) -> int:
        """Chunks this call holds: submitted, or finished but not yet handed to the consumer.

        Bounding this (not just what is in flight) bounds memory when the consumer is slow or
        an early item is: results parked out of order count too.
        """
        return len(self.in_flight) + len(self.released) + len(self.parked) + len(self.ready)

    def held_bytes(self) -> float:
        """Bytes this call holds ahead of the consumer (inputs in flight, results waiting)."""
        held = self.in_flight_bytes + self.released_bytes
        return held + self.values_held * (self.result_bytes or self.item_bytes)

    def has_room(self) -> bool:
        self.window = max(1, self.session.max_in_flight)
        if len(self.in_flight) + len(self.ready) >= self.window:
            return False
        if self.held() >= self.window * PARKED_WINDOWS:
            return False
        # At least one chunk may always be in flight, however large.
        return not self.in_flight or self.held_bytes() < self.max_bytes

    def next_size(self) -> int:
        if self.chunksize:
            return self.chunksize
        size = int(self.session.chunk_size(self.spec_id, self.remaining))
        if self.store is not None:
            # A stored item costs the driver a few µs more (its identity, its row), much of it
            # per chunk (taking input, recording rows): longer chunks spread that. Not in the
            # tail, where the engine's sizes balance the end of the call.
            longer = size * STORE_CHUNK_FACTOR
            if self.remaining is not None:
                longer = min(longer, max(size, self.remaining // self.window))
            size = longer
        if self.item_bytes:
            # Cheap items of some size: keep one chunk to a share of the bytes bound.
            size = min(size, max(1, int(self.max_bytes / self.window / self.item_bytes)))
        return size

    def submit(self, chunk: Any, start: int, attempts: list[str], exclusive: bool = False) -> None:
        seq = self.session.submit(self.spec_id, chunk, start, exclusive)
        nbytes = self._sent_bytes(chunk, 0, len(chunk))
        if not exclusive:  # resubmitted single items would skew the per-item estimate
            self.item_bytes = nbytes / len(chunk)
        self.in_flight[seq] = _Pending(start, chunk, attempts, nbytes)
        self.in_flight_bytes += nbytes

    def submit_slice(self, source: list[Any], lo: int, hi: int) -> None:
        """Submit ``source[lo:hi]`` (the input is the list ``source``) without slicing it."""
        seq = self.session.submit_slice(self.spec_id, source, lo, hi)
        nbytes = self._sent_bytes(source, lo, hi)
        self.item_bytes = nbytes / (hi - lo)
        self.in_flight[seq] = _Pending(lo, None, [], nbytes, source, hi)
        self.in_flight_bytes += nbytes

    def _sent_bytes(self, items: Any, lo: int, hi: int) -> int:
        """Bytes of the chunk ``items[lo:hi]`` just submitted: the session's count, or an
        estimate from a sample of the items."""
        nbytes = self.session.last_submit_nbytes
        if nbytes is not None:
            return nbytes
        if type(items) is range:
            return 64  # a sub-range travels as a few bytes
        step = max(1, (hi - lo) // 3)
        sample = items[lo:hi:step][:3]
        return sum(approx_size(x) for x in sample) * (hi - lo) // len(sample)

    def feed(self) -> None:
        while not self.exhausted and self.has_room():
            size = self.next_size()
            chunk: Any
            if self.store is not None:
                start, chunk, ended = self.store.take(size, self.replay)
                if chunk:
                    self.submit(chunk, start, [])
                    if self.remaining is not None:
                        self.remaining = max(0, self.remaining - len(chunk))
                if ended:
                    self.exhausted = True
                    self.input_error = self.input_error or self.store.input_error
                continue
            source = self.range_source
            if type(source) is list:
                lo = self.next_index
                hi = min(lo + size, len(source))
                if hi > lo:
                    self.submit_slice(source, lo, hi)
                    self.next_index = hi
                    if self.remaining is not None:
                        self.remaining = max(0, self.remaining - (hi - lo))
                if hi - lo < size:
                    self.exhausted = True
                continue
            if source is not None:
                chunk = source[self.next_index : self.next_index + size]
                if type(chunk) is tuple:
                    chunk = list(chunk)
            else:
                chunk = []
                try:
                    # extend() keeps what it read even if the input raises midway.
                    chunk.extend(itertools.islice(self.items, size))
                except Exception as exc:
                    self.input_error, self.exhausted = exc, True
            if chunk:
                self.submit(chunk, self.next_index, [])
                self.next_index += len(chunk)
                if self.remaining is not None:
                    self.remaining = max(0, self.remaining - len(chunk))
            if len(chunk) < size:
                self.exhausted = True

    def replay(self, index: int, values: list[Any], failed: int) -> bool:
        """Results read back from the store instead of run; whether to read on."""
        if failed and self.raise_first:
            self.fail(index, values[0], stored=True)
            return False
        self.emit(index, values, failed, stored=True)
        return True

    def resubmit(self, index: int, item: Any, attempts: list[str]) -> None:
        """Run one item again, alone on its worker, so a crash is attributable."""
        self.submit([item], index, attempts, exclusive=True)

    # -- output side -----------------------------------------------------------------------

    def emit(
        self,
        start: int,
        values: list[Any],
        failed: int = 0,
        attempts: int = 1,
        stored: bool = False,
        plain: bool = False,
    ) -> None:
        if not values:
            return
        if self.store is not None and not stored:
            for index, same, same_failed in self.store.record(start, values, failed, attempts):
                self.emit(index, same, same_failed, stored=True)
        self.done += len(values) - failed
        self.failed += failed
        if self.progress is not None:
            self.progress.update(self.done, self.failed)
        if self.callback is not None:
            for value in values:
                self.callback(value)
        self.values_held += len(values)
        if not self.ordered:
            self.ready.append((start, values, plain))
            return
        if start != self.expected:
            self.parked[start] = (values, plain)
            return
        self.ready.append((start, values, plain))
        self.expected += len(values)
        while self.expected in self.parked:
            vals, plain = self.parked.pop(self.expected)
            self.ready.append((self.expected, vals, plain))
            self.expected += len(vals)

    def fail(self, index: int, exc: BaseException, stored: bool = False) -> None:
        """A final failure with ``on_error="raise"``: stop the call at ``index``."""
        if self.store is not None and not stored:
            self.store.record(index, [exc], 1)
        self.failed += 1
        if self.progress is not None:
            self.progress.update(self.done, self.failed)
        if self.failure is None or index < self.failure[0]:
            self.failure = (index, exc)
        self.exhausted = True
        if not self.errors_in_input_order:
            self.raise_now = True
            return
        later = [seq for seq, p in self.in_flight.items() if p.start > index]
        if later:
            self.session.cancel(later)
            for seq in later:
                self.in_flight_bytes -= self.in_flight.pop(seq).nbytes

    def failure_due(self) -> bool:
        if self.failure is None:
            return False
        if self.raise_now:
            return True
        index = self.failure[0]
        if any(p.start < index for p in self.in_flight.values()):
            return False
        return not self.ordered or self.expected >= index

    # -- results ---------------------------------------------------------------------------

    def release(self, results: list[ChunkResult]) -> None:
        """Take finished chunks out of flight before their values are handled."""
        for res in results:
            p = self.in_flight.pop(res.seq, None)
            if p is not None:
                self.in_flight_bytes -= p.nbytes
                self.released_bytes += res.nbytes or p.nbytes
                self.released[res.seq] = p

    def handle(self, res: ChunkResult) -> None:
        if res.partial:
            self.handle_partial(res)
            return
        # Packed values are plain, known to be small before they are unpacked.
        plain = res.packed and res.nbytes is not None and res.nbytes <= SMALL_BATCH_BYTES
        p = self.released.pop(res.seq, None) if self.released else None
        if p is not None:
            self.released_bytes -= res.nbytes or p.nbytes
        else:
            p = self.in_flight.pop(res.seq, None)
            if p is None:
                return
            self.in_flight_bytes -= p.nbytes
        if res.nbytes is not None and res.values:
            self.result_bytes = res.nbytes / len(res.values)
        if res.crash is not None:
            self.handle_crash(p, res.crash)
            return
        self.handle_values(p, res, plain)

    def handle_partial(self, res: ChunkResult) -> None:
        """A long chunk reported its first items: take them, and keep only the rest pending,
        so that a later crash re-runs (or blames) only items that did not finish."""
        p = self.in_flight.get(res.seq)
        n = len(res.values)
        if p is None or not 0 < n < len(p.chunk):
            return
        done = _Pending(p.start, p.chunk[:n], p.attempts, p.nbytes * n // len(p.chunk))
        p.start, p.chunk, p.nbytes = p.start + n, p.chunk[n:], p.nbytes - done.nbytes
        self.in_flight_bytes -= done.nbytes
        self.handle_values(done, res)

    def handle_values(self, p: _Pending, res: ChunkResult, plain: bool = False) -> None:
        """The values and errors of chunk ``p`` (or of its first items); ``plain``: see
        :data:`Yielded`."""
        if not res.errors:
            self.emit(p.start, res.values, attempts=len(p.attempts) + 1, plain=plain)
            return
        values = list(res.values)
        spec = self.spec
        segment_start = 0
        for err in res.errors:
            index = p.start + err.offset
            arguments = err.arguments or describe_item(spec, p.chunk[err.offset])
            exc = err.exc
            # Values before this error form a segment that is complete.
            self.emit(p.start + segment_start, values[segment_start : err.offset])
            segment_start = err.offset + 1
            if self.retry_on and isinstance(exc, self.retry_on) and len(p.attempts) < self.retries:
                self.resubmit(
                    index, p.chunk[err.offset], [*p.attempts, f"{type(exc).__name__}: {exc}"]
                )
                continue
            exc = annotate(
                exc, index=index, tb=err.traceback, function=spec.name, arguments=arguments
            )
            exc = note_attempts(exc, p.attempts)
            if self.raise_first:
                self.fail(index, exc)
                return
            self.emit(index, [exc], failed=1)
        self.emit(p.start + segment_start, values[segment_start:])

    def handle_crash(self, p: _Pending, crash: Crash) -> None:
        if crash.kind != "start_failed" and len(p.chunk) > 1:
            # Several items were in the dead worker's hands: run each alone to find the culprit.
            for offset, item in enumerate(p.chunk):
                self.resubmit(p.start + offset, item, list(p.attempts))
            return
        retryable = crash.kind != "start_failed"
        for offset, item in enumerate(p.chunk):
            index = p.start + offset
            if retryable and len(p.attempts) < self.retries:
                self.resubmit(index, item, [*p.attempts, _describe_crash(crash)])
                continue
            arguments = describe_item(self.spec, item)
            exc = _crash_error(crash, index, arguments, self.spec)
            exc = annotate(exc, index=index, tb="", function=self.spec.name, arguments=arguments)
            exc = note_attempts(exc, p.attempts)
            if self.raise_first:
                self.fail(index, exc)
                return
            self.emit(index, [exc], failed=1)

    # -- the loop --------------------------------------------------------------------------

    def hand_over(self) -> Yielded:
        batch = self.ready.popleft()
        self.values_held -= len(batch[1])
        return batch

    def loop(self) -> Iterator[Yielded]:
        abort = False
        status = "failed"
        try:
            while True:
                self.feed()
                if self.failure_due():
                    assert self.failure is not None
                    abort = True  # stop this call's running tasks; the pool stays usable
                    raise self.failure[1]
                if not self.in_flight:
                    if self.ready:  # results read back from a store
                        while self.ready:
                            yield self.hand_over()
                        continue
                    break
                timeout = None
                if self.deadline is not None:
                    timeout = max(0.0, self.deadline - time.monotonic())
                results = self.session.wait(timeout)
                late = self.deadline is not None and time.monotonic() >= self.deadline
                if not results and late:
                    raise TimeoutError(
                        f"results not ready in time ({len(self.in_flight)} chunks pending)"
                    )
                if len(results) > 0 and all(res.packed for res in results):
                    # Whole chunks of values, no errors: their slots are free now, so the next
                    # chunks go out before this thread spends its time unpacking (on a busy
                    # machine the workers would otherwise sit idle meanwhile).
                    self.release(results)
                    self.feed()
                for res in results:
                    self.handle(res)
                while self.ready:
                    yield self.hand_over()
            if self.input_error is not None:
                raise self.input_error
            status = "finished"
        except KeyboardInterrupt:
            abort = True
            status = "interrupted"
            raise
        except GeneratorExit:
            # The consumer stopped iterating (closed the stream, left its loop by break or by
            # an exception of its own, dropped it): nobody wants what still runs.
            abort = True
            status = "closed"
            raise
        finally:
            self.session.close(abort=abort)
            if self.progress is not None:
                self.progress.close()
            if self.store is not None:
                self.store.finish(status)  # may raise StoreError: the last commit failed


def _handed_over(batches: Iterator[Yielded], with_index: bool) -> Iterator[Iterator[Any]]:
    """Per batch, an iterator over its values in order (``(index, value)`` pairs with
    ``with_index``), built of C iterators, so no Python code runs per value.

    Values are handed over by popping (``map`` of ``list.pop`` over a ``repeat``): a value
    handed over is no longer referenced here, so the consumer alone decides how long it lives.
    A batch of small plain values (see :data:`Yielded`) is iterated in place instead, about
    10 ns per value cheaper: nobody can tell when such values are freed."""
    for start, values, plain in batches:
        if plain:
            it: Iterator[Any] = iter(values)
        else:
            values.reverse()
            it = map(values.pop, itertools.repeat(-1, len(values)))
        yield zip(itertools.count(start), it) if with_index else it


def collect(gen: Iterable[Yielded]) -> list[Any]:
    """All values of a call, in input order, from batches in any order.

    A batch that continues the list is appended as it arrives, while workers still compute the
    next ones, rather than all at the end; one that arrived early waits for its turn.
    """
    out: list[Any] = []
    early: dict[int, list[Any]] = {}
    for start, values, _ in gen:
        if start != len(out):
            early[start] = values
            continue
        out += values
        while early and len(out) in early:
            out += early.pop(len(out))
    for start in sorted(early):  # only if the batches left a gap (they do not)
        out += early[start]
    return out


class ResultStream(itertools.chain[Any]):
    """The lazy iterator returned by ``imap`` and ``as_completed``.

    The session is opened (and the function checked for picklability) when the stream is made,
    so bad input fails at the call, not at the first ``next()``. Closing the stream, or dropping
    it, ends the session: queued work is dropped.

    It is an :class:`itertools.chain` over the batches, so handing over a value runs no Python
    code: only a new batch does (a Python-level ``__next__`` per value cost about as much as
    the whole map of no-op items).
    """

    _session: Session
    _batches: Iterator[Yielded]
    _store: Any
    _closed: bool

    def __new__(
        cls,
        session: Session,
        batches: Iterator[Yielded],
        store: Any = None,
        with_index: bool = False,
    ) -> ResultStream:
        parts = _handed_over(batches, with_index)
        # ``from_iterable`` allocates an instance of ``cls`` (a chain subclass).
        self = cast(ResultStream, cls.from_iterable(parts))
        self._session = session
        self._batches = batches
        self._store = store  # finished here too: a stream closed before its first next()
        self._closed = False
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # all done in __new__ (``chain`` is built there)

    def close(self) -> None:
        """Stop the call: queued items are dropped and running ones are stopped (where the
        backend can stop them: worker processes are killed and replaced)."""
        if not self._closed:
            self._closed = True
            close = getattr(self._batches, "close", None)
            if close is not None:
                # Being iterated in another thread: ending the session below stops it.
                with contextlib.suppress(ValueError):
                    close()
            self._session.close(abort=True)
            if self._store is not None:
                self._store.finish("closed")

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
