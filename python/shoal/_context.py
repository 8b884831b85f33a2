"""Per-worker state: ``initializer``/``initargs``, ``shared`` objects, and their accessors.

A call (or an Executor) may carry a :class:`CallContext`: an initializer to run once per worker,
its arguments, and one shared object. The context travels inside the call's spec, so each
worker gets it once, and a worker started to replace a dead one gets it again and runs the
initializer again. Tasks reach the state through :func:`shared` and :func:`worker_state`, not
through module globals. That is why it also works for functions defined in ``__main__``:
pickled by value, their globals are a private copy that an initializer could never reach.

In a thread pool, each thread is a worker: it runs the initializer once and has its own
:func:`worker_state`, while :func:`shared` is the same object for all.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from ._errors import ShoalError

_keys = itertools.count(1)
_local = threading.local()
_states: dict[tuple[Any, int], _State] = {}
_lock = threading.Lock()


class InitializerError(ShoalError):
    """The ``initializer`` raised in a worker; every task of the call fails with this."""


class CallContext:
    """What every worker of a call is handed once: initializer, its arguments, a shared object."""

    __slots__ = ("initargs", "initializer", "key", "shared")

    def __init__(
        self,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        shared: Any = None,
        key: Any = None,
    ) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self.shared = shared
        # Unique across processes of one driver: (driver-side counter, id of the driver object).
        self.key = key if key is not None else (next(_keys), id(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallContext, (self.initializer, self.initargs, self.shared, self.key))


class _State:
    __slots__ = ("error", "shared", "state")

    def __init__(self, shared: Any) -> None:
        self.shared = shared
        self.state: dict[str, Any] = {}
        self.error: BaseException | None = None


def activate(ctx: CallContext) -> BaseException | None:
    """Make ``ctx`` current in this thread, running its initializer the first time.

    Returns the :class:`InitializerError` if the initializer failed (now or earlier).
    """
    slot = (ctx.key, threading.get_ident())
    entry = _states.get(slot)
    if entry is None:
        entry = _State(ctx.shared)
        with _lock:
            _states[slot] = entry
        _local.current = entry
        if ctx.initializer is not None:
            try:
                ctx.initializer(*ctx.initargs)
            except BaseException as exc:
                name = getattr(ctx.initializer, "__qualname__", repr(ctx.initializer))
                err = InitializerError(
                    f"the initializer {name}() raised {type(exc).__name__}: {exc}"
                )
                err.__cause__ = exc
                entry.error = err
    _local.current = entry
    return entry.error


def deactivate() -> None:
    """No context is current in this thread any more (a chunk ended)."""
    _local.current = None


def release(key: Any) -> None:
    """Forget the state of a context in this process (all threads)."""
    with _lock:
        for slot in [s for s in _states if s[0] == key]:
            del _states[slot]


def _current() -> _State:
    entry = getattr(_local, "current", None)
    if entry is None:
        raise RuntimeError(
            "shoal.shared() and shoal.worker_state() are only available inside a task of a call "
            "given initializer= or shared="
        )
    state: _State = entry
    return state


def shared() -> Any:
    """The ``shared=`` object of the call whose task is running.

    Handed to each worker once per call, not with every item. Treat it as read-only: in worker
    processes each worker has its own copy, so changes are not seen elsewhere.
    """
    return _current().shared


def worker_state() -> dict[str, Any]:
    """A dict private to this worker (process, or thread) and this call.

    The ``initializer`` fills it (it runs with the state current); tasks read it. A replacement
    worker starts empty and runs the initializer again.
    """
    return _current().state
