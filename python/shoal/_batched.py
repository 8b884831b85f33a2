"""``shoal.batched``: results of futures in lists of ``n``, as they complete."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["batched"]


def batched(
    futures: Iterable[cf.Future[Any]], n: int, *, timeout: float | None = None
) -> Iterator[list[Any]]:
    """Yield the results of ``futures`` in lists of ``n``, in the order they complete.

    The last list may be shorter. Any :class:`concurrent.futures.Future` works (a shoal
    :class:`~shoal.Executor`'s or another's); a future given twice counts once, as in
    :func:`concurrent.futures.as_completed`.

    Parameters
    ----------
    futures : iterable of concurrent.futures.Future
        Read at once, when this function is called.
    n : int
        Results per list, at least 1.
    timeout : float or None
        Seconds for all results, counted from the first ``next()``, as in
        :func:`concurrent.futures.as_completed`.

    Yields
    ------
    list
        ``n`` results (fewer in the last list).

    Raises
    ------
    ValueError
        If ``n < 1`` (at this call, not at the first ``next()``).
    TypeError
        If ``n`` is not an int, or an element of ``futures`` is not a future.
    TimeoutError
        From the iteration, if results are not all in by ``timeout``.
    Exception
        From the iteration: the exception of a future that failed, when it completes (the
        results already completed in an unfinished list are not yielded).

    Examples
    --------
    >>> with shoal.Executor() as ex:  # doctest: +SKIP
    ...     for batch in shoal.batched([ex.submit(simulate, p) for p in params], 10):
    ...         save(batch)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"batched() needs an int n, not {type(n).__name__}")
    if n < 1:
        raise ValueError(f"batched() needs n >= 1, got {n}")
    pending = list(futures)
    for f in pending:
        if not isinstance(f, cf.Future):
            raise TypeError(
                f"batched() needs concurrent.futures.Future objects, not {type(f).__name__}"
            )
    return _batches(cf.as_completed(pending, timeout), n)


def _batches(done: Iterator[cf.Future[Any]], n: int) -> Iterator[list[Any]]:
    # Holds only the futures not yielded yet (as_completed forgets each one it hands over).
    batch: list[Any] = []
    for future in done:
        batch.append(future.result())
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
