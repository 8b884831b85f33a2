"""The top-level functions: ``shoal.map``, ``imap``, ``as_completed`` and ``starmap``.

Each one validates its input (so mistakes fail before any work starts), turns the iterables
into a lazy stream of items, picks a pool, and hands over to :mod:`shoal._driver`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypedDict, Unpack

from . import _driver
from ._context import CallContext
from ._options import (
    check_chunksize,
    check_int,
    check_max_load,
    check_max_memory,
    check_max_tasks,
    check_on_error,
    check_retries,
    check_retry_on,
    check_seed,
    check_timeout,
    parse_memory,
    resolve_workers,
)
from ._progress import make_progress
from ._spec import MODE_KW, MODE_SINGLE, MODE_STAR, CallSpec, Limits
from .backends import Backend, get_backend
from .backends._base import Pool

__all__ = ["as_completed", "imap", "map", "starmap"]


def _length(iterables: tuple[Any, ...]) -> int | None:
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))
        except TypeError:
            return None
    return min(lengths) if lengths else None


def _iterators(api: str, iterables: tuple[Any, ...]) -> list[Iterator[Any]]:
    out = []
    for position, it in enumerate(iterables, start=2):
        try:
            out.append(iter(it))
        except TypeError:
            raise TypeError(
                f"argument {position} of shoal.{api}() must be iterable, not {type(it).__name__}"
            ) from None
    return out


class Prepared:
    """A validated call: the spec, the item stream and its length if known."""

    def __init__(
        self,
        api: str,
        fn: Callable[..., Any],
        iterables: tuple[Any, ...],
        *,
        star: bool,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        iterkwargs: Iterable[Mapping[str, Any]] | None = None,
        on_error: str = "raise",
        chunksize: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: Any = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        progress: Any = False,
        callback: Callable[[Any], Any] | None = None,
        seed: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        shared: Any = None,
        max_load: float | None = None,
        max_memory: float | int | str | None = None,
        store: Any = None,
        key: Callable[..., Any] | None = None,
        capture: bool = False,
        rerun_failed: bool = True,
    ) -> None:
        if not callable(fn):
            raise TypeError(
                f"shoal.{api}() needs a callable as its first argument, not {type(fn).__name__}"
            )
        self.api = api
        self.on_error = check_on_error(on_error)
        self.chunksize = check_chunksize(chunksize)
        retry_types = check_retry_on(retry_on)
        self.limits = Limits(
            timeout=check_timeout(timeout),
            retries=check_retries(retries),
            retry_on=retry_types,
            max_tasks_per_worker=check_max_tasks(max_tasks_per_worker),
            max_worker_memory=parse_memory(max_worker_memory),
            max_load=check_max_load(max_load),
            max_memory=check_max_memory(max_memory),
        )
        if progress not in (None, True, False) and not callable(progress):
            raise TypeError(f"progress must be True, False or a callable, not {progress!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        self.progress = progress
        self.callback = callback
        if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
            raise TypeError(
                f"args must be a tuple or list of extra positional arguments, not {args!r}"
            )
        fixed_args = tuple(args)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(
                f"kwargs must be a mapping of keyword arguments, not {type(kwargs).__name__}"
            )
        fixed_kwargs = dict(kwargs or {})
        for name in fixed_kwargs:
            if not isinstance(name, str):
                raise TypeError(f"kwargs keys must be strings, got {name!r}")
        if not iterables and iterkwargs is None:
            raise TypeError(f"shoal.{api}() needs at least one iterable of inputs (or iterkwargs=)")
        self.range_source: range | list[Any] | tuple[Any, ...] | None = None
        sources = list(iterables)
        if iterkwargs is not None:
            if isinstance(iterkwargs, Mapping):
                raise TypeError(
                    "iterkwargs must be an iterable of dicts (one per item), not a dict"
                )
            sources.append(iterkwargs)
        iterators = _iterators(api, tuple(sources))
        self.total = _length(tuple(sources))
        if iterkwargs is not None:
            kw_iter = iterators.pop()
            if star:
                positional: Iterator[Any] = (tuple(t) for t in iterators[0])
            elif iterators:
                positional = zip(*iterators, strict=False)
            else:
                positional = itertools.repeat(())
            self.items: Iterator[Any] = zip(positional, kw_iter, strict=False)
            mode = MODE_KW
        elif star:
            self.items, mode = iterators[0], MODE_STAR
        elif len(iterators) == 1:
            self.items, mode = iterators[0], MODE_SINGLE
            if type(iterables[0]) in (range, list, tuple):
                # Chunks of a range travel as ranges (a few bytes instead of a list); those of
                # a list or tuple are slices, cut in C rather than read item by item.
                self.range_source = iterables[0]
        else:
            self.items, mode = zip(*iterators, strict=False), MODE_STAR
        #: Raise the lowest-index failure even on an unordered session (map, starmap).
        self.in_order_errors = api in ("map", "starmap")
        self.spec = CallSpec(
            fn,
            mode,
            fixed_args,
            fixed_kwargs,
            stop_on_error=self.on_error == "raise",
            retry_on=retry_types if self.limits.retries else (),
            seed=check_seed(seed),
            context=make_context(initializer, initargs, shared),
        )
        self.store = _store_options(self, fn, store, key, capture, rerun_failed)
        self.recorder: Any = None

    def open(self, pool: Pool, *, ordered: bool, deadline: float | None = None) -> Any:
        """Open a session on ``pool``; return ``(session, batch generator)``.

        The session itself is unordered: the driver puts results in input order by index when
        ``ordered``, which also works when items are re-run after a crash. ``map`` needs no
        ordered delivery at all (it holds every result anyway), which keeps a long item at the
        head of the input from stalling the window while other workers idle; it still raises the
        failure of lowest input index.
        """
        recorder = None
        if self.store is not None:
            recorder = self.store.open(self, pool)
        try:
            session = pool.open_session(ordered=False, limits=self.limits)
        except BaseException:
            if recorder is not None:
                recorder.finish("failed")
            raise
        try:
            spec_id = session.register(self.spec)
        except BaseException:
            session.close()
            if recorder is not None:
                recorder.finish("failed")
            raise
        gen = _driver.Run(
            session,
            spec_id,
            self.spec,
            self.items,
            self.total,
            on_error=self.on_error,
            chunksize=self.chunksize,
            deadline=deadline,
            ordered=ordered,
            first_error_in_input_order=self.in_order_errors,
            limits=self.limits,
            progress=make_progress(self.progress, self.total, self.api),
            callback=self.callback,
            range_source=self.range_source,
            store=recorder,
        ).loop()
        self.recorder = recorder
        return session, gen


class _StoreOptions:
    """``store=``, ``key=``, ``capture=``, ``rerun_failed=`` of a call, checked."""

    def __init__(
        self, fn: Callable[..., Any], path: str | None, key: Any, capture: bool, rerun: bool
    ) -> None:
        self.fn, self.path, self.key, self.capture, self.rerun = fn, path, key, capture, rerun

    def open(self, call: Prepared, pool: Pool) -> Any:
        from .store._recorder import CallRecorder

        return CallRecorder(
            self.fn,
            call.spec,
            call.items,
            path=self.path,
            key=self.key,
            capture=self.capture,
            rerun_failed=self.rerun,
            total=call.total,
            api=call.api,
            backend=type(pool).__module__.rsplit(".", 1)[-1],
            workers=getattr(pool, "workers", None),
        )


def _store_options(
    call: Prepared, fn: Callable[..., Any], store: Any, key: Any, capture: Any, rerun: Any
) -> _StoreOptions | None:
    """Check the store options; wrap the function so workers report per-item facts."""
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable, not {type(key).__name__}")
    if not isinstance(capture, bool):
        raise TypeError(f"capture must be True or False, not {capture!r}")
    if not isinstance(rerun, bool):
        raise TypeError(f"rerun_failed must be True or False, not {rerun!r}")
    if store is None:
        if key is not None:
            raise TypeError("key= names items in a store: it needs store=")
        if not capture:
            return None
        path = None
    else:
        from .store._db import check_path

        path = check_path(store, write=True)
        call.range_source = None  # items are read one by one to skip stored ones
    from ._itemcall import ItemCall

    call.spec.fn = ItemCall(fn, capture, call.spec.name)
    return _StoreOptions(fn, path, key, capture, rerun)


def make_context(initializer: Any, initargs: Any, shared: Any) -> CallContext | None:
    """The per-worker context of a call, or ``None`` if it has none."""
    if initializer is None and shared is None:
        if tuple(initargs):
            raise TypeError("initargs given without an initializer")
        return None
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
    if isinstance(initargs, (str, bytes)) or not isinstance(initargs, Iterable):
        raise TypeError(f"initargs must be a tuple of arguments, not {initargs!r}")
    return CallContext(initializer, tuple(initargs), shared)


def _pool(workers: Any, backend: str | Backend | None, threads_per_worker: Any = None) -> Pool:
    if workers is not None:
        resolve_workers(workers)
    threads = check_int(threads_per_worker, "threads_per_worker", 1)
    return get_backend(backend).pool(workers, threads_per_worker=threads)


class CallOptions(TypedDict, total=False):
    """The options every top-level call takes; :func:`map` documents them."""

    workers: int | float | None
    threads_per_worker: int | None
    chunksize: int | None
    args: Iterable[Any]
    kwargs: Mapping[str, Any] | None
    iterkwargs: Iterable[Mapping[str, Any]] | None
    on_error: str
    timeout: float | None
    retries: int
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None
    max_tasks_per_worker: int | None
    max_worker_memory: int | str | None
    progress: bool | Callable[[Any], Any]
    callback: Callable[[Any], Any] | None
    seed: int | None
    initializer: Callable[..., Any] | None
    initargs: Iterable[Any]
    shared: Any
    max_load: float | None
    max_memory: float | int | str | None
    backend: str | Backend | None
    store: str | os.PathLike[str] | None
    key: Callable[..., Any] | None
    capture: bool
    rerun_failed: bool


_OPTION_NAMES = frozenset(CallOptions.__annotations__)


def _start(
    api: str,
    fn: Callable[..., Any],
    iterables: tuple[Any, ...],
    star: bool,
    ordered: bool,
    options: dict[str, Any],
) -> Any:
    """Validate a call's options, open its session; return ``(session, batch generator,
    store recorder or None)``."""
    for name in options:
        if name not in _OPTION_NAMES:
            raise TypeError(f"shoal.{api}() got an unexpected keyword argument {name!r}")
    options = dict(options)
    workers = options.pop("workers", None)
    threads = options.pop("threads_per_worker", None)
    backend = options.pop("backend", None)
    call = Prepared(api, fn, iterables, star=star, **options)
    session, gen = call.open(_pool(workers, backend, threads), ordered=ordered)
    return session, gen, call.recorder


def map(
    fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[CallOptions]
) -> list[Any]:
    """Apply ``fn`` to every input in parallel and return the results as a list, in input order.

    Parameters
    ----------
    fn : callable
        The function. Lambdas, closures and functions defined in ``__main__`` work.
    *iterables : iterable
        Inputs. With several, they are zipped like the builtin :func:`map`
        (``fn(x, y)``), stopping at the shortest.
    workers : int, float or None
        Number of workers: an int, a float in (0, 1) for that fraction of the usable CPUs, or
        ``None`` for all usable CPUs (see :func:`shoal.cpu_count`).
    threads_per_worker : int or None
        Threads each worker's numeric libraries (BLAS, OpenMP, numexpr, numba) may use, set
        through ``OMP_NUM_THREADS`` and friends before the worker imports anything. ``None``:
        the backend's setting (by default usable CPUs divided by workers). Like ``workers``,
        each distinct value gets its own pool of workers. Processes backend only; others
        refuse it with a ``ValueError``.
    chunksize : int or None
        Items per message to a worker. ``None`` (recommended) adapts it from measured run
        times: tiny tasks are batched, long ones sent one by one.
    args : tuple
        Extra positional arguments passed to every call after the item's own:
        ``fn(item, *args, **kwargs)``. Sent to each worker once per call, not once per item.
    kwargs : dict
        Keyword arguments passed to every call. Sent once per worker, like ``args``.
    iterkwargs : iterable of dict
        Per-item keyword arguments, zipped with the inputs (``fn(x, **kw)``). They override
        ``kwargs`` entries of the same name. May be given without ``iterables``.
    on_error : {"raise", "return"}
        ``"raise"`` (default): the first failing item's exception is re-raised (the worker's
        traceback as ``__cause__``, a note naming the item) and no new tasks start. ``"return"``:
        the exception object takes that item's place in the result and every other item runs.
    timeout : float or None
        Seconds one item may run. Past it, the worker running it is killed and replaced, and the
        item fails with :class:`shoal.TaskTimeoutError`; the rest of the call goes on. Items are
        then sent one at a time (``chunksize`` is ignored).
    retries : int
        Run an item that crashed its worker (:class:`shoal.WorkerCrashedError`), timed out, or
        ran out of memory, up to this many more times on a fresh worker. The final error lists
        the attempts (``exc.attempts`` and a note).
    retry_on : exception type or tuple of them
        Also retry items that raised these exceptions (needs ``retries``).
    max_tasks_per_worker : int or None
        Replace each worker after it has run this many items (for leaky code). Items are then
        sent one at a time, so that no worker runs more.
    max_worker_memory : int, str or None
        Bytes (or ``"2GB"``, ``"512MiB"``) of resident memory: a worker over it after an item is
        replaced, and one that goes over it while running an item is killed, failing that item
        with :class:`shoal.WorkerMemoryError`.
    progress : bool or callable
        ``True``: a live bar on stderr (items done/total, rate, ETA, failures), drawn from a Rust
        thread; in a notebook, a ``tqdm.auto`` bar if tqdm is installed. A callable receives a
        :class:`shoal.ProgressInfo` after each finished chunk.
    callback : callable or None
        Called in the driver with each result (or exception, with ``on_error="return"``) as it
        arrives.
    seed : int or None
        Give every item its own random stream, derived from ``seed`` and the item's input index
        and installed as the global state of :mod:`random` and ``numpy.random`` before the item
        runs. Results are then bit-identical whatever the number of workers, the chunking, the
        backend or retries. (On the threads backend, seeded items run one at a time, since
        threads share the global random state.)
    initializer, initargs : callable, tuple
        ``initializer(*initargs)`` runs once in each worker before its first item of this call
        (again in a worker that replaces a dead one). It can fill :func:`shoal.worker_state`,
        which tasks then read. If it raises, every item fails with
        :class:`shoal.InitializerError` naming it.
    shared : object
        One object handed to each worker once per call (not with every item); tasks get it
        with :func:`shoal.shared`.
    max_load, max_memory : float, int, str or None
        Hold back new items while the machine is busy, so a big sweep does not take down a
        shared node: ``max_load`` is a fraction of all CPUs (``0.8``), ``max_memory`` a fraction
        of RAM (``0.9``) or a size (``"100GB"``) of memory in use. Measured by the engine every
        ``load_check_interval`` seconds (a processes-backend option, default 0.5). Running items
        are not touched. Note that shoal's own workers count towards the load.
    backend : str, Backend or None
        ``"processes"`` (default), ``"threads"``, ``"serial"``, or a backend instance.
    store : str, os.PathLike or None
        An SQLite file that keeps every result (and failure) as it arrives. Running the same
        call again with it runs only the items not done yet and returns what an uninterrupted
        run returns. See ``docs/store.md`` and :class:`shoal.Store`.
    key : callable or None
        With ``store``: names each item (called with the function's arguments, returns a str,
        int or bytes) instead of hashing its arguments.
    capture : bool
        Keep each item's stdout and stderr (first and last 64 KiB): in the store, or without
        one, in a note on the item's error.
    rerun_failed : bool
        With ``store``: run stored failures again (default), or keep them.

    Returns
    -------
    list
        One result per input, in input order.

    Raises
    ------
    TypeError, ValueError
        For bad arguments, before any work starts.
    shoal.PicklingError
        If the function or an argument cannot be sent to worker processes.
    Exception
        The exception raised by the first failing item (with ``on_error="raise"``).

    Examples
    --------
    >>> import shoal
    >>> shoal.map(pow, [2, 3], [5, 2])
    [32, 9]
    """
    _, gen, _ = _start("map", fn, iterables, star=False, ordered=False, options=dict(options))
    return _driver.collect(gen)


def starmap(
    fn: Callable[..., Any], iterable: Iterable[Iterable[Any]], **options: Unpack[CallOptions]
) -> list[Any]:
    """Like :func:`map`, but each input is a tuple of arguments: ``fn(*item)``.

    Examples
    --------
    >>> import shoal
    >>> shoal.starmap(pow, [(2, 5), (3, 2)])
    [32, 9]
    """
    _, gen, _ = _start("starmap", fn, (iterable,), star=True, ordered=False, options=dict(options))
    return _driver.collect(gen)


def imap(
    fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[CallOptions]
) -> _driver.ResultStream:
    """Like :func:`map`, but lazy: an iterator over results in input order.

    Inputs are read only as workers need them, and at most a few chunks per worker are in
    flight, so memory stays bounded for huge or infinite inputs and for slow consumers.
    Closing the iterator (or leaving a ``for`` loop over it early, by ``break`` or by an
    exception) drops the queued work and stops the running tasks.
    """
    session, gen, recorder = _start(
        "imap", fn, iterables, star=False, ordered=True, options=dict(options)
    )
    return _driver.ResultStream(session, gen, recorder)


def as_completed(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    with_index: bool = False,
    **options: Unpack[CallOptions],
) -> _driver.ResultStream:
    """Like :func:`imap`, but yields results as they complete.

    Parameters
    ----------
    with_index : bool
        Yield ``(index, result)`` pairs, ``index`` being the input's position, so each result
        can be matched to its input.
    """
    session, gen, recorder = _start(
        "as_completed", fn, iterables, star=False, ordered=False, options=dict(options)
    )
    return _driver.ResultStream(session, gen, recorder, with_index)


def deadline_after(timeout: float | None) -> float | None:
    """Monotonic deadline for a ``timeout`` in seconds (``None``: no deadline)."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be non-negative, got {timeout}")
    return time.monotonic() + timeout
