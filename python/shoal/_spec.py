"""What a call is, as every backend sees it: the data of the backend contract.

A :class:`CallSpec` holds what is the same for every item (the function, fixed arguments, how
an item maps to arguments). It is sent to each worker once per call. A chunk is a plain list of
items. A :class:`ChunkResult` is what comes back for one chunk.
"""

from __future__ import annotations

import reprlib

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:  # kept out of the worker's import path, which must start fast
    from collections.abc import Callable
    from typing import Any

#: An item is the single positional argument: ``fn(item, *args, **kwargs)``.
MODE_SINGLE = 0
#: An item is a tuple of positional arguments: ``fn(*item, *args, **kwargs)``.
MODE_STAR = 1
#: An item is ``(positional_tuple, keyword_dict)``.
MODE_KW = 2

# Plain classes with __slots__ rather than dataclasses: importing dataclasses (and inspect)
# would add ~8 ms to every worker start.


class CallSpec:
    """Everything about a call that does not change from item to item.

    Attributes
    ----------
    fn : callable
        The function.
    mode : int
        How an item maps to arguments (``MODE_SINGLE``, ``MODE_STAR`` or ``MODE_KW``).
    args, kwargs
        Fixed arguments passed to every call.
    stop_on_error : bool
        Stop running a chunk at its first failing item (``on_error="raise"``), unless the
        failure is one that will be retried.
    retry_on : tuple of exception types
        Exceptions after which the item is run again.
    """

    __slots__ = ("args", "context", "fn", "kwargs", "mode", "retry_on", "seed", "stop_on_error")

    def __init__(
        self,
        fn: Callable[..., Any],
        mode: int = MODE_SINGLE,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        stop_on_error: bool = True,
        retry_on: tuple[type[BaseException], ...] = (),
        seed: int | None = None,
        context: Any = None,
    ) -> None:
        self.fn = fn
        self.mode = mode
        self.args = args
        self.kwargs = kwargs or {}
        self.stop_on_error = stop_on_error
        #: Exceptions that will be retried: a chunk does not stop at them.
        self.retry_on = retry_on
        #: Root of the per-item random streams (see :mod:`shoal._seeding`).
        self.seed = seed
        #: Initializer and shared object, a :class:`shoal._context.CallContext`, or ``None``.
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_spec,
            (
                # First, so that the receiver extends its import path before it unpickles the
                # function and arguments, which may be found only there.
                _ImportPath(),
                self.fn,
                self.mode,
                self.args,
                self.kwargs,
                self.stop_on_error,
                self.retry_on,
                self.seed,
                self.context,
            ),
        )

    @property
    def name(self) -> str:
        """A readable name of the function, for error notes."""
        fn = self.fn
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class _ImportPath:
    """The sender's ``sys.path``, as it is when pickled; unpickling it adds the entries the
    receiver lacks (at the end, so the receiver's own modules keep precedence). A worker started
    before the caller extended its path (a notebook that did ``sys.path.insert`` after a first
    call) can then import the caller's modules."""

    def __reduce__(self) -> tuple[Any, ...]:
        import sys

        return (_extend_import_path, (tuple(p for p in sys.path if p),))


def _extend_import_path(paths: tuple[str, ...]) -> None:
    import sys

    missing = [p for p in paths if p not in sys.path]
    if missing:
        sys.path.extend(missing)


def _rebuild_spec(_path: None, *fields: Any) -> CallSpec:
    return CallSpec(*fields)


class ItemError:
    """One item that raised: its offset in the chunk, the exception, the formatted traceback
    and a short repr of its arguments."""

    __slots__ = ("arguments", "exc", "offset", "traceback")

    def __init__(self, offset: int, exc: BaseException, traceback: str, arguments: str) -> None:
        self.offset = offset
        self.exc = exc
        self.traceback = traceback
        self.arguments = arguments


class Crash:
    """The whole chunk failed; ``kind`` says how.

    - ``"crashed"``: its worker died (``pid``, ``exit`` say how);
    - ``"start_failed"``: no worker could start (``exit`` says why);
    - ``"timed_out"``: it ran past ``limit`` seconds and its worker was killed;
    - ``"memory"``: its worker used ``rss`` bytes, over ``limit``, and was killed.
    """

    __slots__ = ("exit", "kind", "limit", "pid", "rss")

    #: A backend's pointer to the worker's output (added to the error as a note), if any.
    note: str = ""

    def __init__(
        self,
        pid: int | None,
        exit: str,
        kind: str = "crashed",
        limit: float = 0.0,
        rss: int = 0,
    ) -> None:
        self.pid = pid
        self.exit = exit
        self.kind = kind
        self.limit = limit
        self.rss = rss

    @property
    def start_failed(self) -> bool:
        """No worker could be started."""
        return self.kind == "start_failed"

    def locate(self, exc: BaseException) -> None:
        """Mark ``exc`` (the error made of this crash) with where it happened; a backend
        whose workers run on other hosts says which (the mpi backend: rank and host)."""


class Limits:
    """Per-call limits and recovery options, checked by the driver and the engine.

    Attributes
    ----------
    timeout : float or None
        Seconds one item may run before its worker is killed.
    retries : int
        How many more times an item that crashed its worker, timed out, ran out of memory, or
        raised one of ``retry_on`` is run.
    retry_on : tuple of exception types
        Exceptions that are retried (besides crashes and timeouts).
    max_tasks_per_worker : int or None
        Replace a worker after this many items.
    max_worker_memory : int or None
        Bytes of resident memory after which a worker is replaced (or killed mid-item).
    max_load : float or None
        No new item starts while the machine's CPU use (fraction of all CPUs) is above this.
    max_memory : int or None
        No new item starts while the machine's used memory (bytes) is above this.
    """

    __slots__ = (
        "max_load",
        "max_memory",
        "max_tasks_per_worker",
        "max_worker_memory",
        "retries",
        "retry_on",
        "timeout",
    )

    def __init__(
        self,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (),
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        max_load: float | None = None,
        max_memory: int | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_load = max_load
        self.max_memory = max_memory
        self.retries = retries
        self.retry_on = retry_on
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_worker_memory = max_worker_memory

    @property
    def needs_engine(self) -> bool:
        """Whether a limit needs an engine that can kill and watch workers."""
        return (
            self.timeout is not None
            or self.max_tasks_per_worker is not None
            or self.max_worker_memory is not None
            or self.max_load is not None
            or self.max_memory is not None
        )


NO_LIMITS = Limits()


class ChunkResult:
    """What a backend hands back for one submitted chunk.

    ``values`` has one entry per item that was run (fewer than the chunk when the chunk stopped at
    an error); entries at the offsets in ``errors`` are placeholders. ``crash`` is set when no
    value came back at all. A long chunk may first report its finished items in ``partial``
    results; everything after counts from the first item not reported.

    A backend may hand the values still packed, as ``unpack`` (a call that returns them): such a
    result has no errors and no crash, and the driver can free its slot and send the next chunk
    before it pays for unpacking (see :attr:`packed`).
    """

    __slots__ = ("_unpack", "_values", "crash", "elapsed_ns", "errors", "nbytes", "partial", "seq")

    def __init__(
        self,
        seq: int,
        values: list[Any] | None,
        errors: list[ItemError] | None = None,
        crash: Crash | None = None,
        elapsed_ns: int = 0,
        nbytes: int | None = None,
        partial: bool = False,
        unpack: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.seq = seq
        #: The outcome of the chunk's next ``len(values)`` items; the chunk goes on, and its
        #: later results (or crash) cover only the items after them.
        self.partial = partial
        self._values = values
        self._unpack = unpack
        self.errors = errors or []
        self.crash = crash
        self.elapsed_ns = elapsed_ns
        #: Size of the values as they travelled (pickle and buffers), if the backend knows it;
        #: the driver uses it to bound the memory held by results waiting for the consumer.
        self.nbytes = nbytes

    @property
    def packed(self) -> bool:
        """Whether the values are still packed: a whole chunk's values, with no errors."""
        return self._unpack is not None

    @property
    def values(self) -> list[Any]:
        if self._unpack is not None:
            self._values, self._unpack = self._unpack(), None
        assert self._values is not None
        return self._values

    @values.setter
    def values(self, values: list[Any]) -> None:
        self._values, self._unpack = values, None


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_MAX_ARGS_REPR = 200


def describe_item(spec: CallSpec, item: Any) -> str:
    """Short repr of the arguments an item stands for (used in error notes)."""
    try:
        if spec.mode == MODE_SINGLE:
            parts = [_short.repr(item)]
        elif spec.mode == MODE_STAR:
            parts = [_short.repr(a) for a in item]
        else:
            pos, kw = item
            parts = [_short.repr(a) for a in pos] + [f"{k}={_short.repr(v)}" for k, v in kw.items()]
        text = ", ".join(parts)
    except Exception:  # a broken __repr__ must not hide the real error
        text = "<unrepresentable>"
    if len(text) > _MAX_ARGS_REPR:
        text = text[: _MAX_ARGS_REPR - 3] + "..."
    return text
