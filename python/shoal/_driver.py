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
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ._errors import WorkerCrashedError, WorkerStartError, annotate
from ._spec import CallSpec, ChunkResult, ItemError, describe_item
from .backends._base import Session

Batch = tuple[int, list[Any]]


def _crash_errors(
    res: ChunkResult, chunk: list[Any], start: int, spec: CallSpec
) -> list[ItemError]:
    crash = res.crash
    assert crash is not None
    errors = []
    for offset, item in enumerate(chunk):
        arguments = describe_item(spec, item)
        if crash.start_failed:
            exc: BaseException = WorkerStartError(f"could not start worker processes: {crash.exit}")
        else:
            exc = WorkerCrashedError(start + offset, arguments, crash.pid, crash.exit, spec.name)
        errors.append(ItemError(offset, exc, "", arguments))
    return errors


def _settle(
    res: ChunkResult, chunk: list[Any], start: int, spec: CallSpec, raise_first: bool
) -> tuple[list[Any], BaseException | None]:
    """Values of a chunk with errors put in place, or (values before it, first error)."""
    if res.crash is not None:
        values: list[Any] = [None] * len(chunk)
        errors = _crash_errors(res, chunk, start, spec)
    else:
        values, errors = list(res.values), res.errors
    for err in errors:
        arguments = err.arguments or describe_item(spec, chunk[err.offset])
        exc = annotate(
            err.exc,
            index=start + err.offset,
            tb=err.traceback,
            function=spec.name,
            arguments=arguments,
        )
        if raise_first:
            return values[: err.offset], exc
        values[err.offset] = exc
    return values, None


def batches(
    session: Session,
    spec_id: int,
    spec: CallSpec,
    items: Iterator[Any],
    total: int | None,
    *,
    on_error: str,
    chunksize: int | None,
    deadline: float | None = None,
    first_error_in_input_order: bool = False,
) -> Iterator[Batch]:
    """Run a call on an open session; yield ``(start_index, values)`` per finished chunk.

    Batches come in the session's order (submission order for an ordered session, completion
    order otherwise). With ``on_error="raise"`` the call stops at a failure: queued chunks after
    it are dropped and no new input is read. On an unordered session with
    ``first_error_in_input_order``, the chunks before the failing one still finish, so that the
    exception raised is that of the failing item with the lowest index, whatever the timing.

    The session is closed when the generator ends, fails or is closed; on Ctrl-C it is aborted
    (its running tasks are stopped where the engine can).
    """
    in_flight: dict[int, tuple[int, list[Any]]] = {}
    next_index = 0
    remaining = total
    exhausted = False
    input_error: BaseException | None = None
    window = max(1, session.max_in_flight)
    raise_first = on_error == "raise"
    failure: tuple[int, int, BaseException] | None = None  # (seq, index, exception)
    abort = False
    try:
        while True:
            while not exhausted and len(in_flight) < window:
                size = chunksize or session.chunk_size(spec_id, remaining)
                chunk: list[Any] = []
                try:
                    # extend() keeps what it read even if the input raises midway.
                    chunk.extend(itertools.islice(items, size))
                except Exception as exc:
                    input_error, exhausted = exc, True
                if chunk:
                    seq = session.submit(spec_id, chunk, next_index)
                    in_flight[seq] = (next_index, chunk)
                    next_index += len(chunk)
                    if remaining is not None:
                        remaining = max(0, remaining - len(chunk))
                if len(chunk) < size:
                    exhausted = True
            if failure is not None and all(seq > failure[0] for seq in in_flight):
                raise failure[2]  # nothing before the failure is still running
            if not in_flight:
                break
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            results = session.wait(timeout)
            if not results and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"results not ready within the timeout ({len(in_flight)} chunks pending)"
                )
            for res in results:
                entry = in_flight.pop(res.seq, None)
                if entry is None or (failure is not None and res.seq > failure[0]):
                    continue
                start, chunk = entry
                if res.crash is None and not res.errors:
                    yield start, res.values
                    continue
                values, first_error = _settle(res, chunk, start, spec, raise_first)
                if values:
                    yield start, values
                if first_error is None:
                    continue
                # Stop: drop what has not started, read no more input.
                exhausted = True
                session.cancel(after_seq=res.seq)
                if not first_error_in_input_order:
                    raise first_error
                failure = (res.seq, start + len(values), first_error)
        if input_error is not None:
            raise input_error
    except KeyboardInterrupt:
        abort = True
        raise
    finally:
        session.close(abort=abort)


def collect(gen: Iterable[Batch]) -> list[Any]:
    """All values of a call, in input order, from batches in any order."""
    parts = list(gen)
    if len(parts) > 1 and any(parts[i][0] > parts[i + 1][0] for i in range(len(parts) - 1)):
        parts.sort(key=lambda part: part[0])
    out: list[Any] = []
    for _, values in parts:
        out.extend(values)
    return out


class ResultStream(Iterator[Any]):
    """The lazy iterator returned by ``imap`` and ``as_completed``.

    The session is opened (and the function checked for picklability) when the stream is made,
    so bad input fails at the call, not at the first ``next()``. Closing the stream, or dropping
    it, ends the session: queued work is dropped.
    """

    def __init__(self, session: Session, gen: Iterator[Any]) -> None:
        self._session = session
        self._gen = gen
        self._closed = False

    def __iter__(self) -> ResultStream:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        """Stop the call; queued items are dropped."""
        if not self._closed:
            self._closed = True
            close = getattr(self._gen, "close", None)
            if close is not None:
                close()
            self._session.close()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def flatten(gen: Iterable[Batch]) -> Iterator[Any]:
    """Values one by one."""
    for _, values in gen:
        yield from values


def with_indices(gen: Iterable[Batch]) -> Iterator[tuple[int, Any]]:
    """``(input_index, value)`` pairs."""
    for start, values in gen:
        yield from zip(itertools.count(start), values)
