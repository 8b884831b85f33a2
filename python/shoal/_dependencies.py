"""Futures as arguments: :class:`~shoal.Executor` tasks that wait for other futures.

How a dependant moves through the driver::

    Executor.submit(fn, fut_a, x=[fut_b])
      find_futures(args, kwargs)  - None for a plain task (the hot path, which stops here)
      Waiting node                - holds the arguments (and so the futures), not the results
        fut_a, fut_b done-callbacks, in whichever thread settles them:
          all succeeded  -> arguments rebuilt with the results, task queued like any other
          one failed     -> DependencyError (cause: the original error), the task never runs
          one cancelled  -> DependencyError (cause: a CancelledError)
      the node then forgets everything it held

So a result stays in the driver only while a dependant that is still waiting needs it (and for
as long as the caller keeps its own future). Nothing here runs in a worker.

A dependency may be any :class:`concurrent.futures.Future`: another executor's, or one the
caller sets. Since such a future may never complete, the executor's shutdown does not wait for
ever: once none of its own tasks is left, a dependant whose arguments nothing is working on is
cancelled (see :func:`stuck`).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._executor import Executor

__all__ = ["Dependencies", "Waiting", "find_futures"]

# Arguments of these types hold no future; checking the type is all a plain submit pays.
_LEAVES = frozenset({int, float, complex, str, bytes, bool, type(None)})
_CONTAINERS = (list, tuple, dict)

#: Order of creation of every waiting node, in every executor: a node only ever waits on
#: futures made before it, so this order is a topological order of all dependency graphs.
_STAMPS = itertools.count()


def find_futures(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[cf.Future[Any]] | None:
    """The distinct futures among ``args`` and ``kwargs`` (at the top level, or inside lists,
    tuples and dict values, at any depth), in order of appearance; ``None`` if there is none.

    Only exact ``list``, ``tuple`` and ``dict`` are looked into: a subclass (a named tuple, an
    ``OrderedDict``) could not be rebuilt faithfully with the results in place.
    """
    found: dict[int, cf.Future[Any]] | None = None
    for value in args:
        if type(value) not in _LEAVES:
            found = _scan(value, found, ())
    if kwargs:
        for value in kwargs.values():
            if type(value) not in _LEAVES:
                found = _scan(value, found, ())
    return None if found is None else list(found.values())


def _scan(
    value: Any, found: dict[int, cf.Future[Any]] | None, path: tuple[int, ...]
) -> dict[int, cf.Future[Any]] | None:
    if isinstance(value, cf.Future):
        if found is None:
            found = {}
        found.setdefault(id(value), value)
        return found
    kind = type(value)
    if kind is list or kind is tuple or kind is dict:
        if id(value) in path:  # a container that holds itself: pickle copes, we must not loop
            return found
        inner = (id(value), *path)
        for item in value.values() if kind is dict else value:
            if type(item) not in _LEAVES:
                found = _scan(item, found, inner)
    return found


def _resolve(value: Any, path: tuple[int, ...] = ()) -> Any:
    """``value`` with every future replaced by its result; containers that hold none are kept
    as they are (the caller's own lists are never modified)."""
    if isinstance(value, cf.Future):
        return value.result()
    kind = type(value)
    if (kind is not list and kind is not tuple and kind is not dict) or id(value) in path:
        return value
    inner = (id(value), *path)
    if kind is dict:
        new = {key: _resolve(item, inner) for key, item in value.items()}
        return value if all(new[k] is v for k, v in value.items()) else new
    items = [_resolve(item, inner) for item in value]
    if all(a is b for a, b in zip(items, value, strict=True)):
        return value
    return items if kind is list else tuple(items)


def _failure(dep: cf.Future[Any]) -> tuple[str, BaseException] | None:
    """How a done dependency failed (reason, original error), or ``None`` if it succeeded."""
    from ._errors import DependencyError

    if dep.cancelled():
        reason = getattr(dep, "_cancel_reason", None)
        return ("was cancelled" if reason is None else f"was cancelled ({reason})"), (
            cf.CancelledError(reason) if reason is not None else cf.CancelledError()
        )
    exc = dep.exception()
    if exc is None:
        return None
    if isinstance(exc, DependencyError):
        # A chain: name the first failure, and keep its error as the cause.
        if exc.reason.startswith(_EITHER):
            return exc.reason, exc.__cause__ or exc
        return f"{_EITHER}{exc.dependency} {exc.reason}", exc.__cause__ or exc
    return f"failed with {type(exc).__name__}: {exc}", exc


_EITHER = "was not run either: "


class Waiting:
    """A submitted task whose arguments include futures that are not all done yet.

    Every attribute that holds user data is cleared when the node is queued or settled, since
    the dependencies' callback lists keep a reference to the node for as long as they live.
    """

    __slots__ = (
        "args",
        "deps",
        "executor",
        "future",
        "kwargs",
        "name",
        "remaining",
        "spec_id",
        "stamp",
        "task_id",
    )

    def __init__(
        self,
        executor: Executor,
        future: Any,
        spec_id: int,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deps: list[cf.Future[Any]],
    ) -> None:
        self.executor: Executor | None = executor
        self.future: Any = future
        self.task_id: int = future.task_id
        self.spec_id = spec_id
        self.name = name
        self.args: tuple[Any, ...] | None = args
        self.kwargs: dict[str, Any] | None = kwargs
        self.deps: list[cf.Future[Any]] | None = deps
        self.remaining = len(deps)
        self.stamp = next(_STAMPS)

    @property
    def finished(self) -> bool:
        return self.executor is None

    def finish(self) -> None:
        """Forget the task (queued or settled): its arguments, futures and executor."""
        future = self.future
        if future is not None:
            future.__dict__.pop("_node", None)
        self.executor = self.future = self.args = self.kwargs = self.deps = None

    def dependency_done(self, dep: cf.Future[Any]) -> None:
        """Done-callback of each dependency; runs in the thread that settled it."""
        ex = self.executor
        if ex is None:
            return
        try:
            failure = _failure(dep)
        except Exception as exc:  # an odd Future subclass: fail rather than wait for ever
            failure = f"could not be read ({type(exc).__name__}: {exc})", exc
        error: BaseException | None = None
        with ex._lock:
            if self.finished or ex._deps is None:
                return
            future = self.future
            if failure is None:
                self.remaining -= 1
                if self.remaining > 0:
                    return
                error = ex._deps.start(ex, self)
            else:
                ex._deps.drop(ex, self)
                error = _dependency_error(ex, self.task_id, self.name, dep, *failure)
            shut = ex._shutdown
            session = ex._session
        if error is not None:
            _settle_in_turn(future, error)
            if shut and session is not None:
                session.wake()  # the pump may be waiting for this node to leave


_draining = threading.local()


def _settle_in_turn(future: Any, error: BaseException) -> None:
    """Fail ``future``; its own dependants fail in turn, in a loop rather than by recursion.

    Settling a future runs its callbacks, which fail its dependants, whose callbacks... A chain
    of a few hundred dependants would exceed the recursion limit (and concurrent.futures would
    only log the error, leaving the rest of the chain waiting for ever).
    """
    queue: list[tuple[Any, BaseException]] | None = getattr(_draining, "queue", None)
    if queue is not None:  # called back from a settle below, in this thread: its turn comes
        queue.append((future, error))
        return
    queue = _draining.queue = [(future, error)]
    try:
        while queue:
            future, error = queue.pop()
            future._settle(exc=error)
    finally:
        _draining.queue = None


def _dependency_error(
    ex: Executor, task_id: int, name: str, dep: cf.Future[Any], reason: str, cause: BaseException
) -> BaseException:
    from ._errors import DependencyError

    err = DependencyError(task_id, name, describe(ex, dep), reason)
    err.__cause__ = cause
    return err


def _node_of(dep: cf.Future[Any]) -> Waiting | None:
    node = dep.__dict__.get("_node")
    return node if isinstance(node, Waiting) else None


def describe(ex: Executor, dep: cf.Future[Any]) -> str:
    """How messages name a dependency."""
    from ._executor import _Future

    if isinstance(dep, _Future):
        if dep._owner is ex:
            return f"task {dep.task_id}"
        return f"task {dep.task_id} of another Executor"
    return repr(dep)


class Dependencies:
    """The dependency state of one executor (made at its first dependant; lock: the
    executor's).

    Attributes
    ----------
    waiting : dict
        Task id -> node, for dependants not queued yet.
    waits_on : dict
        Task id -> ids of its dependencies, for every dependant ever submitted: plain ints,
        so keeping them for :meth:`graph` holds no task data.
    """

    def __init__(self) -> None:
        self.waiting: dict[int, Waiting] = {}
        self.waits_on: dict[int, tuple[int, ...]] = {}
        self._outside: weakref.WeakKeyDictionary[cf.Future[Any], int] = weakref.WeakKeyDictionary()
        self._outside_count = 0

    def dependency_id(self, ex: Executor, dep: cf.Future[Any]) -> int:
        """The graph id of ``dep``: its ``task_id`` if it is one of ``ex``'s futures, else a
        negative id, the same for the same future."""
        if dep.__dict__.get("_owner") is ex:  # one of ex's own futures
            return int(dep.task_id)  # type: ignore[attr-defined]
        got = self._outside.get(dep)
        if got is None:
            self._outside_count += 1
            got = self._outside[dep] = -self._outside_count
        return got

    def add(self, ex: Executor, node: Waiting, deps: list[cf.Future[Any]]) -> None:
        self.waiting[node.task_id] = node
        self.waits_on[node.task_id] = tuple(self.dependency_id(ex, d) for d in deps)
        node.future._node = node

    def graph(self, tasks: int) -> dict[int, list[int]]:
        """Every task id (0 .. tasks-1, then outside futures as -1, -2, ...) -> the ids it
        waits on."""
        edges = self.waits_on
        out = {i: list(edges.get(i, ())) for i in range(tasks)}
        for i in range(1, self._outside_count + 1):
            out[-i] = []
        return out

    def start(self, ex: Executor, node: Waiting) -> BaseException | None:
        """Queue a node whose dependencies all succeeded (lock held); an error that prevents
        it (an argument that cannot be pickled) is returned, for its future."""
        future, spec_id, name = node.future, node.spec_id, node.name
        args, kwargs = node.args, node.kwargs
        self.waiting.pop(node.task_id, None)
        node.finish()
        error: BaseException | None = None
        session = ex._session
        try:
            if session is None:  # pragma: no cover - the pump keeps it open while nodes wait
                raise RuntimeError("the executor's session is closed")
            item = (_resolve(args), _resolve(kwargs))
            if "resources" in item[1] and ex._pool.takes_resources:
                # Per-task resources (slurm), as a task submitted without dependencies has
                # them: the session holds them for this item (and its retries).
                kw = dict(item[1])
                resources = kw.pop("resources")
                item = (item[0], kw)
                session.hold_resources(item, resources)
            ex._queue(session, future, spec_id, item, name, [])
        except Exception as exc:
            error = exc
        ex._task_done(spec_id)  # the hold taken at submit; a queued task holds its own
        return error

    def drop(self, ex: Executor, node: Waiting) -> None:
        """Forget a node that will not run (lock held)."""
        self.waiting.pop(node.task_id, None)
        spec_id = node.spec_id
        node.finish()
        ex._task_done(spec_id)

    def cancel(self, ex: Executor, future: Any) -> bool:
        """``future.cancel()`` of a dependant: ``True`` if it was still waiting (lock held)."""
        node = self.waiting.get(future.task_id)
        if node is None or node.future is not future:
            return False
        self.drop(ex, node)
        return True

    def take_all(self, ex: Executor) -> list[Any]:
        """Drop every waiting node; their futures, to be cancelled or failed (lock held)."""
        nodes = sorted(self.waiting.values(), key=lambda n: -n.task_id)
        futures = [n.future for n in nodes]
        for node in nodes:
            self.drop(ex, node)
        return futures

    def take_stuck(self, ex: Executor) -> list[tuple[Any, str]]:
        """Drop the waiting nodes that can never start, with the reason for each (lock held).

        Called once none of the executor's own tasks is left: a node waits for ever if one of
        its dependencies is pending and nothing works on it (a future nobody sets, a task still
        queued in another executor, or such a node itself).
        """
        nodes = list(self.waiting.values())
        moving = _moving_nodes(nodes)
        stuck = [n for n in nodes if not moving[id(n)]]
        # Dependants first, so that each one is cancelled in its own name rather than failed
        # by the cancellation of the node it waits on.
        stuck.sort(key=lambda n: -n.task_id)
        out = []
        for node in stuck:
            blocker = next((d for d in node.deps or () if not _moves(d, moving)), None)
            if blocker is None:  # a dependency completed just now: the node will start
                continue
            why = (
                "which can never start either"
                if _node_of(blocker) is not None
                else "which is pending with nothing running it, so it can never start"
            )
            reason = f"task {node.task_id} ({node.name}) waits on {describe(ex, blocker)}, {why}"
            out.append((node.future, reason))
            self.drop(ex, node)
        return out


def _moves(dep: cf.Future[Any], moving: dict[int, bool]) -> bool:
    """Whether ``dep`` is done or will be without anyone else's help."""
    from ._executor import _Future

    if dep.done():
        return True
    if isinstance(dep, _Future):
        node = _node_of(dep)
        if node is not None:
            return moving.get(id(node), True)
        # Queued in a session (this executor's or another live one's): its pump settles it.
        return dep._seq >= 0
    return dep.running()  # a concurrent.futures executor has started it


def _moving_nodes(roots: list[Waiting]) -> dict[int, bool]:
    """For each node reachable from ``roots`` (through other executors' nodes too), whether
    all its dependencies are moving. No recursion: nodes are visited in creation order, a
    topological order, so the nodes a node waits on are always decided first."""
    seen: dict[int, Waiting] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for dep in node.deps or ():
            sub = _node_of(dep)
            if sub is not None and id(sub) not in seen:
                stack.append(sub)
    moving: dict[int, bool] = {}
    for node in sorted(seen.values(), key=lambda n: n.stamp):
        deps = node.deps
        # A node finished meanwhile (in another thread) has been queued or settled.
        moving[id(node)] = deps is None or all(_moves(d, moving) for d in deps)
    return moving
