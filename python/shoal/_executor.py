"""``shoal.Executor``: a :class:`concurrent.futures.Executor` on any shoal backend.

It drops into code that takes an executor (emcee, scipy's ``workers=``, pipefunc, joblib's
``parallel_config``). Futures share one unordered session on the executor's own pool; a
*pump* thread waits on that session (in Rust, with the GIL released) and completes futures as
results arrive, in batches.

Each distinct function is pickled once and sent to each worker once. To keep ``submit`` cheap,
the sequence number of a task is known before it is queued (sessions number tasks 0, 1, 2...),
so its future is registered before the result can possibly arrive.

A future among a task's arguments makes it a *dependant*: it waits in the driver until its
futures are done (see :mod:`shoal._dependencies`, which ``submit`` enters only then).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import _driver
from ._api import Prepared, deadline_after, make_context
from ._dependencies import _LEAVES, Dependencies, Waiting, find_futures
from ._driver import _crash_error, _describe_crash
from ._errors import ShoalError, annotate, note_attempts
from ._options import (
    check_max_tasks,
    check_retries,
    check_retry_on,
    check_seed,
    check_timeout,
    parse_memory,
)
from ._spec import MODE_KW, CallSpec, ChunkResult, Limits, describe_item
from ._threads import Reused
from .backends import Backend, get_backend
from .backends._base import Session, refuse_engine_limits

__all__ = ["Executor"]

_KW_SPEC = CallSpec(len, MODE_KW)
_LIVE_EXECUTORS: weakref.WeakSet[Executor] = weakref.WeakSet()

#: The threads that run executors' pumps, kept for the next executor.
_PUMPS = Reused("shoal-executor")


def _stop_pumps() -> None:
    # At exit, CPython 3.11 ends a daemon thread that re-takes the GIL by unwinding it with
    # pthread_exit; through Rust frames (a pump waiting in the engine) that aborts the process.
    # This hook runs before threads are joined and before finalization, so every pump is out of
    # Rust by then.
    for executor in list(_LIVE_EXECUTORS):
        executor._stop_at_exit()


_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_stop_pumps)
else:  # pragma: no cover - other interpreters
    import atexit

    atexit.register(_stop_pumps)


def _named(name: str) -> Any:
    """A stand-in callable that only carries a name, for error messages."""

    def stand_in() -> None:  # pragma: no cover - never called
        pass

    stand_in.__qualname__ = name
    return stand_in


#: Functions kept registered with the workers; older idle ones are released beyond this.
_MAX_CACHED_FUNCTIONS = 256


_PENDING, _FINISHED = cf._base.PENDING, cf._base.FINISHED
_DONE_STATES = (cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED, cf._base.FINISHED)
# Guards the lazy creation of a future's condition against the pump settling it (see _Future).
_lazy_lock = threading.Lock()


class _Future(cf.Future):  # type: ignore[type-arg]
    """A standard :class:`concurrent.futures.Future`, lighter to create and complete.

    ``cf.Future.__init__`` builds a ``threading.Condition`` (an RLock, a deque, bound methods)
    for every future. At 100k futures per second those allocations, and the garbage-collector
    passes they trigger, cost more than everything else. Here the condition and the waiter
    lists are made on first use, which for most futures is never: the result has arrived before
    anyone asks. The pump settles a future under one lock instead of two.

    Correctness of the lazy condition: a waiter creates it under ``_lazy_lock`` and only then
    checks the state; the pump, finding no condition, sets the result while holding the same
    lock. So a waiter either sees the result, or exists before the pump looks and is notified.
    """

    def __init__(self, task_id: int, owner: Executor) -> None:
        self._state = _PENDING
        self._result = None
        self._exception = None
        #: This task's number in its executor: 0, 1, 2... in submission order (see
        #: :meth:`Executor.dependency_graph`).
        self.task_id = task_id
        #: The executor that numbered the task (kept once settled: it tells this executor's
        #: futures from others' when they are dependencies), and the task's sequence number
        #: in its session (-1 until it is queued): what :meth:`cancel` needs.
        self._owner = owner
        self._seq = -1

    def cancel(self) -> bool:
        """Cancel the task if it has not started, as :mod:`concurrent.futures` does: ``False``
        once a worker has it (it then runs to completion), ``True`` if it never will run."""
        owner = self._owner
        if owner is not None and self._state == _PENDING and not owner._drop_queued(self):
            return False
        return super().cancel()

    def __getattr__(self, name: str) -> Any:
        if name == "_condition":
            with _lazy_lock:
                cond = self.__dict__.get("_condition")
                if cond is None:
                    cond = self.__dict__["_condition"] = threading.Condition()
            return cond
        if name in ("_waiters", "_done_callbacks"):
            with _lazy_lock:
                return self.__dict__.setdefault(name, [])
        raise AttributeError(name)

    # Finished futures answer without touching (or creating) the condition: the state is
    # written last, after the result, and never changes again.
    def done(self) -> bool:
        return self._state in _DONE_STATES or super().done()

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        try:
            return super().result(timeout)
        except cf.CancelledError:
            raise self._why_cancelled() from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        try:
            return super().exception(timeout)
        except cf.CancelledError:
            raise self._why_cancelled() from None

    def _why_cancelled(self) -> cf.CancelledError:
        """The error for a cancelled future, with the reason when shoal cancelled it."""
        reason = self.__dict__.get("_cancel_reason")
        return cf.CancelledError() if reason is None else cf.CancelledError(reason)

    def _cancel_with(self, reason: str) -> None:
        """Cancel a future that has not run, saying why (shown by ``result()``)."""
        self._cancel_reason = reason
        cf.Future.cancel(self)

    def _settle(self, value: Any = None, exc: BaseException | None = None) -> None:
        with _lazy_lock:
            cond: threading.Condition | None = self.__dict__.get("_condition")
            if cond is None:
                if self._state != _PENDING:
                    return
                self._result, self._exception, self._state = value, exc, _FINISHED
        if cond is None:  # nobody waits: settled above
            if self.__dict__.get("_done_callbacks"):
                self._invoke_callbacks()
            return
        with cond:
            if self._state != _PENDING:  # cancelled: the result is dropped
                return
            if exc is None:
                self._result = value
                for waiter in self._waiters:
                    waiter.add_result(self)
            else:
                self._exception = exc
                for waiter in self._waiters:
                    waiter.add_exception(self)
            self._state = _FINISHED
            cond.notify_all()
        self._invoke_callbacks()


def _function_key(fn: Callable[..., Any]) -> Any:
    # A bound method is a new object at every attribute access; key it by its parts.
    if isinstance(fn, types.MethodType):
        return ("method", id(fn.__func__), id(fn.__self__))
    return id(fn)


def _weak(fn: Callable[..., Any]) -> Callable[[], Any] | None:
    """A weak reference to ``fn`` (a bound method through its parts), or ``None``."""
    try:
        if isinstance(fn, types.MethodType):
            return weakref.WeakMethod(fn)
        return weakref.ref(fn)
    except TypeError:
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, types.MethodType) and isinstance(b, types.MethodType):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return a is b


class _Registered:
    """A function registered with the executor's session.

    While tasks of it are outstanding it is held strongly. When none is, the executor does not
    keep it alive (a bound method would keep its object, a closure its data): the entry keeps a
    weak reference, so the next submit of the same function skips pickling it again, or it is
    unregistered when the session holds Python objects or no weak reference can be made.
    """

    __slots__ = ("fn", "key", "name", "outstanding", "spec_id", "weak")

    def __init__(self, fn: Callable[..., Any], key: Any, spec_id: int, name: str) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.weak: Callable[[], Any] | None = None
        self.key = key
        self.spec_id = spec_id
        self.name = name
        self.outstanding = 0

    def matches(self, fn: Callable[..., Any]) -> bool:
        if self.fn is not None:
            return _same(self.fn, fn)
        held = self.weak() if self.weak is not None else None
        return held is not None and _same(held, fn)


def _submit_alone(
    session: Any,
    executor: Executor,
    future: _Future,
    spec_id: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
) -> None:
    """``submit(..., resources={...})`` on a backend whose tasks take their own resources.

    The session keeps the resources of this item, so a retry runs with them too.
    """
    resources = kwargs.pop("resources")
    item = (args, kwargs)
    session.hold_resources(item, resources)
    executor._queue(session, future, spec_id, item, name, [])


def _stuck_message(reasons: list[str]) -> str:
    shown = "; ".join(reasons[:5])
    more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
    return (
        f"shoal.Executor.shutdown cancelled {len(reasons)} task(s) that wait on futures that "
        f"can never complete: {shown}{more}"
    )


def _caller_level() -> int:
    """``stacklevel`` of a warning from :meth:`Executor.shutdown` that points at user code,
    through ``__exit__`` when the executor is a context manager."""
    import sys

    frame = sys._getframe(2)
    return 3 if frame.f_code.co_name == "__exit__" and frame.f_globals is globals() else 2


class Executor(cf.Executor):
    """A :class:`concurrent.futures.Executor` running on a shoal backend.

    Parameters
    ----------
    workers : int, float or None
        Pool size (see :func:`shoal.map`). The executor owns its pool.
    backend : str, Backend or None
        Which engine (default: the current default backend).
    threads_per_worker : int or None
        Threads for numeric libraries in each worker (see :func:`shoal.map`).
    **backend_options
        Options for a backend created by name (e.g. ``idle_timeout=``).

    timeout : float or None
        Seconds one task may run; past it, its worker is killed and replaced, and that future
        fails with :class:`shoal.TaskTimeoutError`. (``Executor.map(timeout=)`` keeps its
        :mod:`concurrent.futures` meaning: a deadline for all results.)
    retries, retry_on, max_tasks_per_worker, max_worker_memory
        As in :func:`shoal.map`, for every task of this executor.
    seed : int or None
        As in :func:`shoal.map`; a future's index is its submission order (0, 1, 2, ...).
    initializer, initargs, shared
        As in :func:`shoal.map`: run once per worker of this executor, for all its tasks.

    Notes
    -----
    A future among the arguments of :meth:`submit` makes the task wait for it and receive its
    result (see :meth:`submit`, :meth:`dependency_graph`, and ``docs/executor.md``).

    As in :mod:`concurrent.futures`, ``Future.cancel()`` succeeds only for a task no worker has
    taken yet (it then never runs) and returns ``False`` once the task is running. The
    executor holds a task's function, arguments and result only until its future is settled.
    A dead worker fails only the future
    of the task it was running; the executor never becomes "broken". On Ctrl-C inside a
    ``with`` block, the workers are killed at once instead of waiting for running tasks.
    """

    def __init__(
        self,
        workers: int | float | None = None,
        *,
        backend: str | Backend | None = None,
        threads_per_worker: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        seed: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        shared: Any = None,
        **backend_options: Any,
    ) -> None:
        self._seed = check_seed(seed)
        self._context = make_context(initializer, initargs, shared)
        self._limits = Limits(
            timeout=check_timeout(timeout),
            retries=check_retries(retries),
            retry_on=check_retry_on(retry_on),
            max_tasks_per_worker=check_max_tasks(max_tasks_per_worker),
            max_worker_memory=parse_memory(max_worker_memory),
        )
        be = get_backend(backend, **backend_options)
        if self._limits.needs_engine:
            refuse = getattr(be, "name", "")
            if refuse in ("threads", "serial"):
                refuse_engine_limits(refuse, self._limits)
        # The backend's reading of the setting: on MPI in launch mode, the ranks' workers
        # (no cpu_count() of rank 0 needed); on a cluster, the whole cluster.
        n = be.pool_size(be.workers if workers is None else workers)
        threads = check_max_tasks(threads_per_worker, "threads_per_worker")
        self._pool = be.create_pool(n, **be.check_pool_options({"threads_per_worker": threads}))
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._functions: OrderedDict[Any, _Registered] = OrderedDict()
        self._by_spec: dict[int, _Registered] = {}
        self._futures: dict[int, tuple[_Future, int, Any, str, list[str]]] = {}
        self._next_seq = 0
        #: ``task_id`` of the next future; also its index for ``seed=`` (submission order,
        #: whatever order dependants start in).
        self._next_task = 0
        self._deps: Dependencies | None = None  # made at the first dependant
        #: Why dependants were cancelled at shutdown, for ``shutdown(wait=True)`` to warn.
        self._stuck: list[str] = []
        self._joining = False
        self._last: _Registered | None = None
        #: Whether the pump (the loop that settles futures) was handed to a thread, and the
        #: thread, once it runs it.
        self._pumping = False
        self._pump_thread: threading.Thread | None = None
        self._shutdown = False
        self._exiting = False
        _LIVE_EXECUTORS.add(self)
        self._closed = threading.Event()

    @property
    def workers(self) -> int:
        """Pool size."""
        return self._pool.workers

    # -- futures -------------------------------------------------------------------------

    def _registered(self, session: Session, fn: Callable[..., Any]) -> _Registered:
        """The registration of ``fn`` with ``session``, made on first use (lock held)."""
        last = self._last
        if last is not None and last.fn is fn:  # the common case: one function, many submits
            return last
        key = _function_key(fn)
        hit = self._functions.get(key)
        if hit is not None and not hit.matches(fn):  # a dead function's id, reused
            self._forget(session, hit)
            hit = None
        if hit is not None:
            self._functions.move_to_end(key)
            hit.fn, hit.weak = fn, None
            self._last = hit
            return hit
        spec = CallSpec(
            fn,
            MODE_KW,
            stop_on_error=True,
            retry_on=self._limits.retry_on,
            seed=self._seed,
            context=self._context,
        )
        spec_id = session.register(spec)
        hit = self._functions[key] = self._by_spec[spec_id] = self._last = _Registered(
            fn, key, spec_id, spec.name
        )
        if len(self._functions) > _MAX_CACHED_FUNCTIONS:
            for old in list(self._functions.values()):
                if len(self._functions) <= _MAX_CACHED_FUNCTIONS:
                    break
                if not old.outstanding and old is not hit:
                    self._forget(session, old)
        return hit

    def _forget(self, session: Session, entry: _Registered) -> None:
        """Unregister a function that has no outstanding task (lock held)."""
        self._functions.pop(entry.key, None)
        self._by_spec.pop(entry.spec_id, None)
        if self._last is entry:
            self._last = None
        session.unregister(entry.spec_id)

    def _task_done(self, spec_id: int) -> None:
        """One task of ``spec_id`` is settled or dropped (lock held); once none is left, the
        executor stops holding the function."""
        entry = self._by_spec.get(spec_id)
        if entry is None:
            return
        entry.outstanding -= 1
        if entry.outstanding > 0:
            return
        if self._last is entry:
            self._last = None
        session = self._session
        fn = entry.fn
        weak = None if fn is None or session is None or session.holds_specs else _weak(fn)
        if weak is None:
            if session is not None:
                self._forget(session, entry)
        else:
            entry.fn, entry.weak = None, weak

    def _drop_queued(self, future: _Future) -> bool:
        """Remove ``future``'s task if no worker has it yet; ``False`` if it has started."""
        with self._lock:
            seq, session = future._seq, self._session
            if seq < 0:  # a dependant still waiting for its arguments
                return self._deps is not None and self._deps.cancel(self, future)
            entry = self._futures.get(seq)
            if session is None or entry is None or entry[0] is not future:
                return False
            if seq not in session.cancel([seq]):
                return False
            del self._futures[seq]
            self._task_done(entry[1])
        return True

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a :class:`concurrent.futures.Future`.

        The future's ``task_id`` is its submission order in this executor (0, 1, 2, ...).

        Any :class:`concurrent.futures.Future` among the arguments (at the top level, or in
        lists, tuples and dict values) is a dependency: the task waits, in the driver, until
        all are done, and receives their results in their place. If one failed or was
        cancelled, the task is not run and its future fails with
        :class:`shoal.DependencyError`, whose ``__cause__`` is the original error. See
        :meth:`dependency_graph` and :meth:`shutdown`.

        On a backend whose tasks take resources of their own (``slurm``), a ``resources={...}``
        keyword is not passed to ``fn``: it runs this task alone, as a job with those ``sbatch``
        options (``{"cpus_per_task": 32, "mem": "64GB", "time": "12:00:00"}``).

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.
        TypeError
            If ``fn`` is not callable.
        shoal.PicklingError
            If ``fn`` or an argument cannot be sent to the workers (for a task that waits for
            futures, an argument that cannot be sent fails its future instead).
        """
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        # Inlined, cheap test for the usual plain arguments; anything else is scanned for
        # futures, which make the task wait for them (a dependant).
        deps = None
        if kwargs:
            deps = find_futures(args, kwargs)
        else:
            for arg in args:
                if type(arg) not in _LEAVES:
                    deps = find_futures(args, kwargs)
                    break
        if deps is not None:
            return self._submit_dependant(fn, args, kwargs, deps)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._session is None:
                self._session = self._pool.open_session(ordered=False, limits=self._limits)
            session = self._session
            last = self._last  # the common case, inlined: one function, many submits
            registered = (
                last if last is not None and last.fn is fn else self._registered(session, fn)
            )
            future = _Future(self._next_task, self)
            if "resources" in kwargs and self._pool.takes_resources:
                # A backend with per-task resources (slurm): this task is submitted alone.
                _submit_alone(
                    session, self, future, registered.spec_id, args, kwargs, registered.name
                )
            else:
                item = (args, kwargs)
                self._queue(session, future, registered.spec_id, item, registered.name, [])
            self._next_task += 1
            if not self._pumping:
                self._start_pump()
        return future

    def _start_pump(self) -> None:
        # A thread kept from an earlier executor's pump, if one is idle: starting a thread
        # would be a good share of a fresh executor's time to its first result.
        self._pumping = True
        _PUMPS.run(self._run_pump)

    def _submit_dependant(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deps: list[cf.Future[Any]],
    ) -> cf.Future[Any]:
        """``submit`` of a task with futures among its arguments: it waits in the driver, and
        is queued once they are all done (see :mod:`shoal._dependencies`)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._session is None:
                self._session = self._pool.open_session(ordered=False, limits=self._limits)
            # Registered now, so that a function that cannot be pickled fails this call as it
            # does for any task, and held (outstanding) while the task waits.
            registered = self._registered(self._session, fn)
            registered.outstanding += 1
            future = _Future(self._next_task, self)  # _seq -1: cancel() finds it waiting
            self._next_task += 1
            if self._deps is None:
                self._deps = Dependencies()
            node = Waiting(self, future, registered.spec_id, registered.name, args, kwargs, deps)
            self._deps.add(self, node, deps)
            if not self._pumping:
                self._start_pump()
        # Outside the lock: a dependency already done calls back at once, in this thread.
        for dep in deps:
            dep.add_done_callback(node.dependency_done)
        return future

    def dependency_graph(self) -> dict[int, list[int]]:
        """Which tasks each submitted task waits on.

        Returns
        -------
        dict
            Maps the ``task_id`` of every future this executor's :meth:`submit` returned (0,
            1, 2, ... in submission order) to the ids of the futures among its arguments, in
            order of appearance. A future that is not this executor's (another executor's, or
            one the caller sets) gets a negative id (-1, -2, ...), and a key of its own with
            no dependencies. Only ids are kept: the graph holds no task data.
        """
        with self._lock:
            if self._deps is None:
                return {i: [] for i in range(self._next_task)}
            return self._deps.graph(self._next_task)

    def _queue(
        self,
        session: Session,
        future: _Future,
        spec_id: int,
        item: Any,
        name: str,
        attempts: list[str],
        exclusive: bool = False,
    ) -> None:
        """Register a future under the next sequence number, then submit its task (lock held).

        Sessions number tasks 0, 1, 2...; registering first means the result cannot arrive
        before its future is known.
        """
        seq = self._next_seq
        self._futures[seq] = (future, spec_id, item, name, attempts)
        try:
            # The item's index (for seed=) is the task's, whatever the queue order or retry.
            got = session.submit(spec_id, [item], future.task_id, exclusive)
        except BaseException:
            del self._futures[seq]
            raise
        if got != seq:  # pragma: no cover - guards the numbering assumption above
            raise RuntimeError(f"session numbered a task {got}, expected {seq}")
        self._next_seq += 1
        future._seq = seq
        self._by_spec[spec_id].outstanding += 1

    def _retry(self, entry: Any, failure: str) -> bool:
        """Run a failed task again if it has retries left; True if it was resubmitted."""
        future, spec_id, item, name, attempts = entry
        if len(attempts) >= self._limits.retries or future.cancelled():
            return False
        with self._lock:
            session = self._session
            if session is None:
                return False
            self._queue(session, future, spec_id, item, name, [*attempts, failure], True)
        return True

    def _complete(self, results: list[ChunkResult]) -> None:
        done = []
        with self._lock:
            for res in results:
                if res.partial:  # never for one-item tasks; nothing to settle yet
                    continue
                entry = self._futures.pop(res.seq, None)
                if entry is not None:
                    done.append((res, entry))
        for res, entry in done:
            future, _, item, name, attempts = entry
            if not res.crash and not res.errors:
                future._settle(res.values[0])
                continue
            if res.crash is not None:
                crash = res.crash
                arguments = describe_item(_KW_SPEC, item)
                if crash.kind != "start_failed" and self._retry(entry, _describe_crash(crash)):
                    continue
                spec = CallSpec(_named(name), MODE_KW)
                exc = _crash_error(crash, None, arguments, spec)  # type: ignore[arg-type]
                future._settle(exc=note_attempts(exc, attempts))
            else:
                err = res.errors[0]
                retryable = self._limits.retry_on and isinstance(err.exc, self._limits.retry_on)
                if retryable and self._retry(entry, f"{type(err.exc).__name__}: {err.exc}"):
                    continue
                exc = annotate(
                    err.exc, index=None, tb=err.traceback, function=name, arguments=err.arguments
                )
                future._settle(exc=note_attempts(exc, attempts))
        # Released only now: a retry above re-counted its task first, so the function of a
        # task being retried is never dropped in between.
        with self._lock:
            for _, entry in done:
                self._task_done(entry[1])

    def _run_pump(self) -> None:
        self._pump_thread = threading.current_thread()
        session = self._session
        assert session is not None
        try:
            while not self._exiting:
                results = session.wait(0.5)
                if results:
                    self._complete(results)
                # Hold no finished result while waiting for the next: the caller may have
                # dropped its future already.
                results = []
                stuck = None
                with self._lock:
                    if self._shutdown and not self._futures:
                        if self._deps is None or not self._deps.waiting:
                            break
                        stuck = self._deps.take_stuck(self)
                if stuck:
                    self._cancel_stuck(stuck)
            if self._exiting:
                raise ShoalError("the interpreter is exiting")
        except Exception as exc:  # the pool was killed (Ctrl-C) or broke: fail what is left
            with self._lock:
                pending, self._futures = list(self._futures.values()), {}
                waiting = self._deps.take_all(self) if self._deps is not None else []
            err_text = f"the executor's workers were stopped before this task ended: {exc}"
            for future in waiting:
                future._settle(exc=ShoalError(err_text))
            for future, *_ in pending:
                future._settle(exc=ShoalError(err_text))
        session.close()
        # At interpreter exit nothing waits for running tasks: the workers are killed.
        self._pool.shutdown(wait=not self._exiting, kill=self._exiting)
        self._closed.set()

    def _cancel_stuck(self, stuck: list[tuple[_Future, str]]) -> None:
        """Cancel dependants that can never start (pump, at shutdown), and say why: to the
        caller of ``shutdown(wait=True)`` if there is one, else as a warning from here."""
        with self._lock:
            report = not self._joining
            if not report:
                self._stuck.extend(reason for _, reason in stuck)
        if report:  # before cancelling: whoever sees a future cancelled has had the warning
            # Warnings turned into errors would have nobody to reach in this thread.
            with contextlib.suppress(Exception):
                warnings.warn(_stuck_message([r for _, r in stuck]), RuntimeWarning, stacklevel=1)
        for future, reason in stuck:
            future._cancel_with(f"cancelled at the executor's shutdown: {reason}")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; free the workers once pending futures are done.

        Parameters
        ----------
        wait : bool
            Block until pending futures are done and the workers have exited.
        cancel_futures : bool
            Cancel the futures whose tasks have not started (they never will); tasks that are
            running finish and their futures get their results.

        Notes
        -----
        Dependants (tasks with futures among their arguments) still waiting when no task of
        this executor is left are cancelled if a future they wait on is pending and nothing
        works on it: a future nobody sets, a task still queued in another executor, or such a
        dependant itself. ``result()`` of each says why, and a :class:`RuntimeWarning` lists
        them. Outside futures that are running (``Future.running()``) or queued in another
        shoal executor are waited for.
        """
        cancelled = []
        with self._lock:
            self._shutdown = True
            in_pump = self._pump_thread is threading.current_thread()
            if wait and not in_pump:
                self._joining = True
            session, pumping = self._session, self._pumping
            if cancel_futures and self._deps is not None:
                cancelled.extend(self._deps.take_all(self))  # dependants first: see take_all
            if cancel_futures and session is not None:
                # Only tasks no worker has yet are dropped; running ones finish with results.
                for seq in session.cancel():
                    entry = self._futures.pop(seq, None)
                    if entry is not None:
                        self._task_done(entry[1])
                        cancelled.append(entry[0])
        for future in cancelled:
            cf.Future.cancel(future)
        if session is not None:
            session.wake()
        if not pumping:
            self._pool.shutdown(wait=wait)
            self._closed.set()
        elif wait and not in_pump:
            self._closed.wait()
            with self._lock:
                stuck, self._stuck = self._stuck, []
            if stuck:
                warnings.warn(_stuck_message(stuck), RuntimeWarning, stacklevel=_caller_level())

    # -- lazy maps -------------------------------------------------------------------------

    def _stream(
        self,
        api: str,
        fn: Callable[..., Any],
        iterables: tuple[Any, ...],
        *,
        star: bool,
        ordered: bool,
        timeout: float | None,
        with_index: bool = False,
        **options: Any,
    ) -> _driver.ResultStream:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        lim = self._limits
        call = Prepared(
            api,
            fn,
            iterables,
            star=star,
            timeout=lim.timeout,
            retries=lim.retries,
            retry_on=lim.retry_on,
            max_tasks_per_worker=lim.max_tasks_per_worker,
            max_worker_memory=lim.max_worker_memory,
            seed=self._seed,
            **options,
        )
        call.spec.context = self._context
        session, gen = call.open(self._pool, ordered=ordered, deadline=deadline_after(timeout))
        return _driver.ResultStream(session, gen, call.recorder, with_index)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        iterkwargs: Iterable[Mapping[str, Any]] | None = None,
        on_error: str = "raise",
        store: Any = None,
        key: Callable[..., Any] | None = None,
        capture: bool = False,
        rerun_failed: bool = True,
    ) -> Iterator[Any]:
        """Lazy, ordered map on this executor's workers (see :func:`shoal.imap`).

        ``timeout`` (seconds, from this call) raises :class:`TimeoutError` if results are not
        all in by then, as in :meth:`concurrent.futures.Executor.map`; ``chunksize`` defaults
        to adaptive chunking. ``store``, ``key``, ``capture`` and ``rerun_failed`` are those
        of :func:`shoal.map` (see ``docs/store.md``).
        """
        return self._stream(
            "map",
            fn,
            iterables,
            star=False,
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            args=args,
            kwargs=kwargs,
            iterkwargs=iterkwargs,
            on_error=on_error,
            store=store,
            key=key,
            capture=capture,
            rerun_failed=rerun_failed,
        )

    imap = map

    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        *,
        timeout: float | None = None,
        chunksize: int | None = None,
        on_error: str = "raise",
    ) -> Iterator[Any]:
        """Lazy, ordered ``fn(*item)`` over ``iterable``."""
        return self._stream(
            "starmap",
            fn,
            (iterable,),
            star=True,
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            args=(),
            kwargs=None,
            iterkwargs=None,
            on_error=on_error,
        )

    def as_completed(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        with_index: bool = False,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        iterkwargs: Iterable[Mapping[str, Any]] | None = None,
        on_error: str = "raise",
    ) -> Iterator[Any]:
        """Results in completion order (see :func:`shoal.as_completed`)."""
        return self._stream(
            "as_completed",
            fn,
            iterables,
            star=False,
            ordered=False,
            timeout=timeout,
            with_index=with_index,
            chunksize=chunksize,
            args=args,
            kwargs=kwargs,
            iterkwargs=iterkwargs,
            on_error=on_error,
        )

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._interrupt()
            return
        self.shutdown(wait=True)

    def _stop_at_exit(self) -> None:
        """Interpreter exit: get the pump out of Rust before finalization (see below)."""
        self._exiting = True
        session = self._session
        if session is not None:
            session.wake()
        if self._pumping and self._pump_thread is not threading.current_thread():
            self._closed.wait(5)

    def _interrupt(self) -> None:
        """Ctrl-C: cancel what is pending and kill the workers now, without waiting."""
        self.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, kill=True)
