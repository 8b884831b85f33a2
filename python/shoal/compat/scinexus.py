"""A scinexus parallel backend running on shoal.

    from scinexus.parallel import set_parallel_backend
    from shoal.compat.scinexus import ShoalParallel

    set_parallel_backend(ShoalParallel(workers=8, timeout=600))

After that, ``scinexus.parallel.map``/``imap``/``as_completed`` and every app's
``apply_to(..., parallel=True)`` run on shoal. Data flow: scinexus calls :meth:`ShoalParallel.imap`
or :meth:`ShoalParallel.as_completed` with the function and the inputs; they go to
:func:`shoal.imap`/:func:`shoal.as_completed` with ``on_error="return"``, the function wrapped in
:class:`_Call` so that a worker can tell a raised exception from a returned one, and that marks
the worker as a non-master scinexus rank. Back in the driver, a raised exception is re-raised
where scinexus' own backends raise it; a worker that died fails its input alone, as a
``NotCompleted`` when the function is a scinexus app.
"""

from __future__ import annotations

import multiprocessing
import numbers
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import scinexus.parallel as snx_parallel
from scinexus.composable import NotCompleted

import shoal
from shoal._errors import ShoalError
from shoal._options import resolve_workers

__all__ = ["ShoalParallel"]

#: In a shoal worker process: this worker's rank (its pid). 0 in the driver.
_worker_rank = 0


class _Value:
    """A successful result, boxed so that an exception returned by ``f`` stays a value."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Value, (self.value,))


class _Call:
    """Runs ``f(item)`` in a worker; knows the pid of the driver that made it."""

    def __init__(self, f: Callable[[Any], Any], workers: int | float) -> None:
        self.f = f
        self.driver = os.getpid()
        self.workers = workers
        self.__qualname__ = getattr(f, "__qualname__", None) or repr(f)

    def __call__(self, item: Any) -> _Value:
        global _worker_rank
        if not _worker_rank and os.getpid() != self.driver:
            # A worker process: scinexus asks its default backend who is master, and a worker
            # has none set; this one answers "not master, rank = pid".
            _worker_rank = os.getpid()
            snx_parallel.set_parallel_backend(ShoalParallel(workers=self.workers))
        return _Value(self.f(item))


def _check_count(value: Any, name: str) -> None:
    """scinexus' rule and message for ``max_workers`` and ``chunksize``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} ({value}) must be greater than 0")


class ShoalParallel(snx_parallel.Parallel):
    """Run scinexus' parallel calls on shoal.

    Parameters
    ----------
    workers : int, float or None
        Workers for calls that do not give ``max_workers`` (a ``max_workers`` given to a
        scinexus call wins). ``None``: all usable CPUs.
    **shoal_options
        Any option of :func:`shoal.map` (``backend=``, ``timeout=``, ``retries=``,
        ``max_worker_memory=``, ``seed=``, ``progress=``...), applied to every call.

    Notes
    -----
    An exception raised by a plain function is raised by the iterator at that input, as on
    scinexus' own backends. A worker that dies (a segfault, ``os._exit``, the OOM killer) fails
    its input alone: a ``NotCompleted`` of type ERROR when the function is a scinexus app,
    otherwise :class:`shoal.WorkerCrashedError` raised at that input; scinexus' own process
    backends raise ``BrokenProcessPool`` for all remaining inputs instead. Lambdas and closures
    work. The driver is the master (rank 0, :meth:`get_size` 1); a worker process reports
    ``is_master_process()`` false and its pid as its rank (with ``backend="threads"`` or
    ``"serial"`` the tasks run in the driver and report what the driver reports).

    Apps must be defined in an importable module: an app class defined in ``__main__`` is
    sent by value, and scinexus refuses to rebuild it in the worker (as with loky).
    """

    def __init__(self, workers: int | float | None = None, **shoal_options: Any) -> None:
        for name in ("on_error", "workers"):
            if name in shoal_options:
                raise TypeError(f"ShoalParallel sets {name}= itself")
        if workers is not None:
            resolve_workers(workers)
        self.workers = workers
        self.shoal_options = shoal_options

    def __repr__(self) -> str:
        return f"ShoalParallel(workers={self.workers!r})"

    def _stream(
        self, api: str, f: Callable[[Any], Any], s: Iterable[Any], max_workers: Any, kwargs: Any
    ) -> Generator[Any]:
        _check_count(max_workers, "max_workers")
        chunksize = kwargs.get("chunksize")
        _check_count(chunksize, "chunksize")
        cpus = multiprocessing.cpu_count()
        if max_workers is not None and max_workers > cpus:
            # scinexus refuses this in imap and clamps it in as_completed.
            if api == "imap":
                raise ValueError(
                    f"max_workers ({max_workers}) must be less than or equal to CPU count ({cpus})"
                )
            max_workers = cpus
        workers = self.workers if max_workers is None else int(max_workers)
        options = dict(self.shoal_options)
        if chunksize is not None or "chunksize" not in options:
            options["chunksize"] = chunksize  # the call's own chunksize wins
        call = _Call(f, shoal.cpu_count() if workers is None else workers)
        is_app = _is_app(f)
        # An app's failed input becomes a NotCompleted naming that input, so keep the inputs.
        inputs = list(s) if is_app or api == "as_completed" else s
        if api == "imap":
            results = shoal.imap(call, inputs, workers=workers, on_error="return", **options)
            stream: Iterator[tuple[int, Any]] = enumerate(results)
        else:
            results = shoal.as_completed(
                call, inputs, workers=workers, on_error="return", with_index=True, **options
            )
            stream = results
        try:
            for index, outcome in stream:
                if isinstance(outcome, _Value):
                    yield outcome.value
                elif is_app and isinstance(outcome, ShoalError):
                    yield _not_completed(f, inputs[index], outcome)  # type: ignore[index]
                else:
                    raise outcome
        finally:
            # Leaving early (break, an exception raised here) stops the call's running tasks.
            results.close()

    def imap(
        self,
        f: Callable[[Any], Any],
        s: Iterable[Any],
        max_workers: int | None = None,
        **kwargs: Any,
    ) -> Generator[Any]:
        """Yield ``f(x)`` for each ``x`` of ``s``, in order."""
        yield from self._stream("imap", f, s, max_workers, kwargs)

    def as_completed(
        self,
        f: Callable[[Any], Any],
        s: Iterable[Any],
        max_workers: int | None = None,
        **kwargs: Any,
    ) -> Generator[Any]:
        """Yield ``f(x)`` for each ``x`` of ``s``, in completion order."""
        yield from self._stream("as_completed", f, s, max_workers, kwargs)

    def is_master_process(self) -> bool:
        """True in the driver, false in shoal's workers."""
        return _worker_rank == 0

    def get_rank(self) -> int:
        """0 in the driver; a worker's pid in a worker."""
        return _worker_rank

    def get_size(self) -> int:
        """1: the driver is the only master process."""
        return 1


def _is_app(f: Any) -> bool:
    """Whether ``f`` is a scinexus app, or the wrapper ``apply_to``/``as_completed`` send."""
    from scinexus.composable import AppBase, propagate_source

    return isinstance(f, AppBase) or (
        isinstance(f, propagate_source) and isinstance(f.app, AppBase)
    )


def _not_completed(f: Any, item: Any, error: BaseException) -> NotCompleted:
    """The ``NotCompleted`` an app would have returned had it caught ``error`` itself."""
    from scinexus.composable import propagate_source, source_proxy

    message = f"{type(error).__name__}: {error}"
    if isinstance(f, propagate_source):
        source = item
        if isinstance(item, source_proxy):
            try:
                source = f.id_from_source(item)
            except Exception:  # an id that cannot be worked out leaves the source unnamed
                source = None
        return NotCompleted("ERROR", f.app, message, source=source)
    return NotCompleted("ERROR", f, message, source=item)
