"""Exceptions of shoal, and how a task's failure is dressed up for the caller.

Every public exception derives from :class:`ShoalError`, and also from the standard exception it
really is (a pickling failure is a :class:`pickle.PicklingError`), so existing ``except`` clauses
keep working.

A task that raises in a worker is re-raised in the driver as *its own exception type*. The
worker's formatted traceback becomes ``__cause__`` (a :class:`RemoteTraceback`), and a PEP 678
note names the input that failed, so the failing item can be found without a debugger.
"""

from __future__ import annotations

import pickle

TYPE_CHECKING = False  # workers import this module: keep typing out of their start-up
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DependencyError",
    "PicklingError",
    "RemoteError",
    "RemoteTraceback",
    "ShoalError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "WorkerStartError",
]


class ShoalError(Exception):
    """Base class of every exception that shoal itself defines."""


class RemoteTraceback(ShoalError):  # noqa: N818 - a cause carrier, never raised by itself
    """The traceback of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip("\n")


class RemoteError(ShoalError):
    """Stands in for a worker exception that could not be sent back as itself.

    This happens when the exception object cannot be pickled, or cannot be rebuilt from its
    pickle (for example a custom ``__init__`` with required arguments).

    Attributes
    ----------
    type_name : str
        Qualified name of the original exception type.
    message : str
        ``str()`` of the original exception.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message))


class PicklingError(ShoalError, pickle.PicklingError):
    """A function, argument or result could not be pickled; the message names which one."""


def _subject(index: int | None, function: str, arguments: str) -> tuple[str, str]:
    """``("item 3", " f(3)")``: how messages name the failed item and its call."""
    where = f"item {index}" if index is not None else "a task"
    return where, (f" {function}({arguments})" if function else "")


def _pid(pid: int | None) -> str:
    # Cluster engines do not always say which process died.
    return "" if pid is None else f" (pid {pid})"


class WorkerCrashedError(ShoalError):
    """The worker process died while it was running this item.

    Attributes
    ----------
    index : int or None
        Index of the item in the input.
    arguments : str
        Short repr of the item's arguments.
    pid : int or None
        Pid of the worker that died.
    exit : str
        How it ended, e.g. ``"killed by signal 11 (SIGSEGV)"``.
    """

    def __init__(
        self, index: int | None, arguments: str, pid: int | None, exit: str, function: str = ""
    ) -> None:
        where, call = _subject(index, function, arguments)
        super().__init__(f"worker{_pid(pid)} died while running {where}:{call}: {exit}")
        self.index = index
        self.arguments = arguments
        self.pid = pid
        self.exit = exit

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerCrashedError, (self.index, self.arguments, self.pid, self.exit))


class TaskTimeoutError(ShoalError, TimeoutError):
    """The item ran longer than ``timeout``; its worker was killed and replaced.

    Attributes
    ----------
    index : int or None
        Index of the item in the input.
    arguments : str
        Short repr of the item's arguments.
    pid : int or None
        Pid of the worker that was killed.
    timeout : float
        The limit, in seconds.
    """

    def __init__(
        self, index: int | None, arguments: str, pid: int | None, timeout: float, function: str = ""
    ) -> None:
        where, call = _subject(index, function, arguments)
        super().__init__(
            f"{where}{call} ran past its timeout of {timeout:g} s; its worker{_pid(pid)} was killed"
        )
        self.index = index
        self.arguments = arguments
        self.pid = pid
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskTimeoutError, (self.index, self.arguments, self.pid, self.timeout))


class WorkerMemoryError(ShoalError, MemoryError):
    """The worker's resident memory went past ``max_worker_memory`` while running this item.

    Attributes
    ----------
    index : int or None
        Index of the item in the input.
    arguments : str
        Short repr of the item's arguments.
    pid : int or None
        Pid of the worker that was killed.
    rss, limit : int
        Resident memory seen and the limit, in bytes.
    """

    def __init__(
        self,
        index: int | None,
        arguments: str,
        pid: int | None,
        rss: int,
        limit: int,
        function: str = "",
    ) -> None:
        where, call = _subject(index, function, arguments)
        super().__init__(
            f"worker (pid {pid}) used {rss / 2**20:.0f} MiB, over max_worker_memory "
            f"({limit / 2**20:.0f} MiB), while running {where}:{call}; it was killed"
        )
        self.index = index
        self.arguments = arguments
        self.pid = pid
        self.rss = rss
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerMemoryError, (self.index, self.arguments, self.pid, self.rss, self.limit))


class WorkerStartError(ShoalError):
    """No worker process could be started (bad interpreter, import error in the worker...)."""


class DependencyError(ShoalError):
    """A task was not run because a future it takes as an argument failed or was cancelled.

    ``__cause__`` is the original error: the exception of the task that failed (also when it
    is several dependencies up the chain), or a :class:`concurrent.futures.CancelledError` for
    one that was cancelled.

    Attributes
    ----------
    task_id : int or None
        ``task_id`` of the task that was not run.
    function : str
        Its function's name.
    dependency : str
        Which future it waited on (``"task 3"``, or the repr of an outside future).
    reason : str
        What happened to that future (``"failed with ValueError: ..."``, ``"was cancelled"``,
        or ``"was not run either: ..."`` down to the first failure of a chain).
    """

    def __init__(self, task_id: int | None, function: str, dependency: str, reason: str) -> None:
        name = f" ({function})" if function else ""
        super().__init__(f"task {task_id}{name} was not run: its argument {dependency} {reason}")
        self.task_id = task_id
        self.function = function
        self.dependency = dependency
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (DependencyError, (self.task_id, self.function, self.dependency, self.reason))


def note_attempts(exc: BaseException, attempts: list[str]) -> BaseException:
    """Record earlier failed attempts on the final error (``exc.attempts`` and a note)."""
    if attempts:
        exc.attempts = list(attempts)  # type: ignore[attr-defined]
        lines = "; ".join(f"attempt {i}: {a}" for i, a in enumerate(attempts, start=1))
        exc.add_note(
            f"shoal: failed after {len(attempts) + 1} attempts ({lines}; attempt "
            f"{len(attempts) + 1}: {type(exc).__name__})"
        )
    return exc


def annotate(
    exc: BaseException, *, index: int | None, tb: str, function: str, arguments: str
) -> BaseException:
    """Attach the worker traceback and a note naming the failed item to ``exc``."""
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    where = f"item {index}" if index is not None else "task"
    note = f"shoal: raised by {where}: {function}({arguments})"
    notes = getattr(exc, "__notes__", None)
    if not notes or note not in notes:
        exc.add_note(note)
    return exc
