"""Running one chunk of items: the same code in a worker process, a thread or in-process.

Every backend calls :func:`run_chunk`, which is why errors, argument handling and
``on_error`` behave identically everywhere.
"""

from __future__ import annotations

import os  # loaded at interpreter start-up anyway
from itertools import islice  # a builtin module: nothing to load at worker start-up

from ._spec import MODE_KW, MODE_SINGLE, MODE_STAR, CallSpec, ItemError, describe_item

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any


def _invoker(spec: CallSpec) -> Callable[[Any], Any] | None:
    """A function that calls ``spec.fn`` for one item; ``None`` for the plain ``fn(item)`` case,
    which :func:`run_chunk` runs without the extra call layer."""
    fn, args, kwargs = spec.fn, spec.args, spec.kwargs
    if spec.mode == MODE_SINGLE:
        if not args and not kwargs:
            return None
        return lambda item: fn(item, *args, **kwargs)
    if spec.mode == MODE_STAR:
        if not args and not kwargs:
            return lambda item: fn(*item)
        return lambda item: fn(*item, *args, **kwargs)
    if spec.mode == MODE_KW:
        # Per-item keyword arguments override the fixed ones of the same name.
        return lambda item: fn(*item[0], *args, **{**kwargs, **item[1]})
    raise ValueError(f"unknown call mode {spec.mode}")


def format_remote_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without shoal's own frame at the top."""
    import traceback  # only on the error path: keeps worker start-up fast

    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is _run_items.__code__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


#: Seconds between two reports of a long chunk's finished items (see ``report`` below): items
#: slower than this are each reported as they finish; cheaper ones in batches of about this
#: long, so reporting costs a tiny share of the run time. An MPI relay sets a longer one for
#: its workers (``SHOAL_REPORT_INTERVAL``): there each report is a message to rank 0.
REPORT_INTERVAL = float(os.environ.get("SHOAL_REPORT_INTERVAL", "0.02"))


def run_chunk(
    spec: CallSpec,
    items: list[Any],
    start: int = 0,
    seed_lock: Any = None,
    report: Callable[[list[Any], list[ItemError]], None] | None = None,
) -> tuple[list[Any], list[ItemError]]:
    """Run ``spec`` over ``items``; return the values and the errors.

    ``start`` is the input index of ``items[0]``; with ``spec.seed`` each item gets its own
    random stream from its index (``seed_lock``, if given, is held around each seeded item, for
    backends whose items share one process's global random state).

    With ``report``, a chunk that runs for long hands the outcome of its finished items to
    ``report(values, errors)`` about every :data:`REPORT_INTERVAL` seconds (error offsets
    relative to those values), and returns only the items after the last report: a worker
    that crashes later then loses only the item it was running.

    The loop runs inside one ``try`` so the common case pays nothing per item for error handling;
    after an error it resumes with the next item of the same iterator, so no item runs twice.
    ``SystemExit`` raised by a task is an error of that task, not an exit of the worker.
    """
    run = _run_items if report is None or len(items) < 2 else _reporting(report)
    if spec.context is None:
        return run(spec, items, start, seed_lock)
    from ._context import activate, deactivate

    failure = activate(spec.context)
    try:
        if failure is None:
            return run(spec, items, start, seed_lock)
        # The initializer raised: every item fails with that error.
        count = 1 if spec.stop_on_error else len(items)
        tb = format_remote_traceback(failure.__cause__ or failure)
        errors = [ItemError(i, failure, tb, describe_item(spec, items[i])) for i in range(count)]
        return [None] * count, errors
    finally:
        deactivate()


def _run_items(
    spec: CallSpec,
    items: list[Any],
    start: int,
    seed_lock: Any,
    lo: int = 0,
    hi: int | None = None,
    values: list[Any] | None = None,
    errors: list[ItemError] | None = None,
) -> tuple[list[Any], list[ItemError]]:
    """Run ``items[lo:hi]`` (``start`` is the input index of ``items[0]``), appending to
    ``values`` and ``errors`` (new lists by default; an error's offset is its value's position
    in ``values``). The items are read in place: a slice of a long chunk is never copied."""
    values = [] if values is None else values
    errors = [] if errors is None else errors
    base = len(values) - lo  # items[i] gives values[base + i]
    call = _invoker(spec)
    fn = spec.fn
    if spec.seed is not None:
        call = _seeded(call or fn, spec.seed, start - base, values, seed_lock)
    it: Iterator[Any] = iter(items)
    if lo or hi is not None:
        # Only a slice that stops before the end pays islice's extra step per item: a chunk's
        # last slice, the usual long one, iterates the list directly.
        n = len(items)
        stop = n if hi is None else min(hi, n)
        if lo and type(items) is list:
            it.__setstate__(lo)  # type: ignore[attr-defined]  # starts at lo, in O(1)
            if stop < n:
                it = islice(it, stop - lo)
        elif lo or stop < n:
            it = islice(it, lo, stop)
    while True:
        try:
            # A C-level loop: list.extend keeps the values appended before an item raises,
            # and map has then consumed that item, so the loop resumes after it.
            values.extend(map(fn if call is None else call, it))
            return values, errors
        except (Exception, SystemExit) as exc:
            offset = len(values)
            values.append(None)
            arguments = describe_item(spec, items[offset - base])
            errors.append(ItemError(offset, exc, format_remote_traceback(exc), arguments))
            if spec.stop_on_error and not isinstance(exc, spec.retry_on):
                return values, errors


def _reporting(
    report: Callable[[list[Any], list[ItemError]], None],
) -> Callable[[CallSpec, list[Any], int, Any], tuple[list[Any], list[ItemError]]]:
    """A :func:`_run_items` that runs a chunk in growing slices and reports what finished.

    Each slice runs in the same tight loop as a whole chunk; between slices the clock is read,
    and once :data:`REPORT_INTERVAL` has passed since the last report, the finished items go to
    ``report``. A chunk whose rest will end before a report is due (the usual short chunk) runs
    it in one more slice; otherwise slices double in size while items are cheap and shrink to
    what fits in the interval when items are slow.
    """
    from time import perf_counter

    def run(
        spec: CallSpec, items: list[Any], start: int, seed_lock: Any
    ) -> tuple[list[Any], list[ItemError]]:
        n = len(items)
        values: list[Any] = []
        errors: list[ItemError] = []
        pos = 0  # items run so far
        size = 1
        last = perf_counter()
        while pos < n:
            end = min(n, pos + size)
            began = perf_counter()
            had_values, had_errors = len(values), len(errors)
            # Straight into this report's lists: no slice of the chunk, no copy of its values.
            _run_items(spec, items, start, seed_lock, pos, end, values, errors)
            ran = len(values) - had_values
            stopped = ran < end - pos or (
                len(errors) > had_errors
                and spec.stop_on_error
                and not isinstance(errors[-1].exc, spec.retry_on)
            )
            pos += ran
            if stopped:
                break
            now = perf_counter()
            if now - last >= REPORT_INTERVAL and pos < n:
                report(values, errors)
                values, errors, last = [], [], now
            per_item = (now - began) / max(1, ran)
            left = REPORT_INTERVAL - (now - last)
            if per_item * (n - pos) < left:
                size = n - pos  # the rest ends before a report is due: one tight loop
                continue
            fits = left / per_item if per_item > 0 else 2 * size
            size = max(1, min(2 * size, int(fits)))
        return values, errors

    return run


def _seeded(
    call: Callable[[Any], Any], seed: int, start: int, values: list[Any], lock: Any
) -> Callable[[Any], Any]:
    from ._seeding import Seeder

    seeder = Seeder(seed)

    def seeded_call(item: Any) -> Any:
        # The index of this item is where its value will land.
        index = start + len(values)
        if lock is None:
            seeder.install(index)
            return call(item)
        with lock:
            seeder.install(index)
            return call(item)

    return seeded_call
