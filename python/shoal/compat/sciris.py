"""``parallelize`` with the signature and behaviour of ``sciris.parallelize``, running on shoal.

Replace ``sc.parallelize(...)`` with ``shoal.compat.sciris.parallelize(...)`` and keep the
arguments. Data flow: the arguments are validated here with sciris' rules and messages, each job
becomes one item ``(index, iterval, iterdict)``, and :class:`_Job` (sent to each worker once per
call) turns an item into ``func(*iterval, *args, **kwargs, **iterdict)`` in the worker, runs the
callback there as sciris does, and hands ``(result,)`` back to :func:`shoal.map` (boxed, so that
a worker's death, which shoal puts in the job's place, cannot be mistaken for a result).

Where sciris' pool hangs or breaks (a worker that dies), shoal fails that job alone: with
``die=False`` a :class:`shoal.WorkerCrashedError` takes its place in the results.

sciris itself is optional: when it is installed, an unknown ``parallelizer`` raises its
``KeyNotFoundError`` so that existing ``except`` clauses keep working.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import multiprocessing
import numbers
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.managers import DictProxy, SyncManager
from typing import Any

import shoal

__all__ = ["KeyNotFoundError", "parallelize"]

#: sciris' names for its parallelizers, mapped onto the one each stands for.
_MAPPING = {
    "default": "multiprocess",
    "robust": "multiprocess",
    "fast": "concurrent.futures",
    "serial": "serial",
    "concurrent.futures": "concurrent.futures",
    "concurrent": "concurrent.futures",
    "futures": "concurrent.futures",
    "multiprocess": "multiprocess",
    "multiprocessing": "multiprocessing",
    "thread": "thread",
    "threadpool": "thread",
}
#: sciris' process pools all become shoal's processes backend.
_PROCESS_METHODS = ("multiprocess", "multiprocessing", "concurrent.futures")
_BACKENDS = {"serial": "serial", "thread": "threads"}


class KeyNotFoundError(KeyError):
    """An unknown ``parallelizer`` name.

    When sciris is installed, the exception raised also derives from ``sciris.KeyNotFoundError``
    (sciris is imported only then, on this error path).
    """


def _unknown_parallelizer(message: str) -> KeyNotFoundError:
    try:
        from sciris import KeyNotFoundError as SciKeyNotFoundError
    except ImportError:
        return KeyNotFoundError(message)
    both = type("KeyNotFoundError", (KeyNotFoundError, SciKeyNotFoundError), {})
    both.__module__ = __name__
    return both(message)  # type: ignore[no-any-return]


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _count_jobs(iterarg: Any, iterkwargs: Any) -> tuple[Any, bool, int]:
    """Validate ``iterarg``/``iterkwargs`` as sciris does; return ``(iterarg, embarrassing, n)``."""
    njobs = 0
    embarrassing = False
    if iterarg is not None:
        if not _iterable(iterarg):
            if isinstance(iterarg, numbers.Real) and not isinstance(iterarg, bool):
                iterarg = range(math.ceil(iterarg))  # np.arange(n): n calls without an argument
                embarrassing = True
            else:
                raise TypeError(
                    f'Could not understand iterarg "{iterarg}": not iterable and not an integer'
                )
        elif not (hasattr(iterarg, "__len__") and hasattr(iterarg, "__getitem__")):
            iterarg = list(iterarg)  # a generator: sciris needs len() and indexing
        njobs = len(iterarg)
    if iterkwargs is not None:
        if isinstance(iterkwargs, dict):
            for val in iterkwargs.values():
                if not _iterable(val):
                    raise TypeError(f"iterkwargs entries must be iterable, not {type(val)}")
                if not njobs:
                    njobs = len(val)
                elif len(val) != njobs:
                    raise ValueError(
                        "All iterarg and iterkwargs iterables must be the same length, "
                        f"not {njobs} vs. {len(val)}"
                    )
        elif isinstance(iterkwargs, list):
            if njobs and len(iterkwargs) != njobs:
                raise ValueError(
                    "iterarg and iterkwargs must be the same length, "
                    f"not {njobs} vs. {len(iterkwargs)}"
                )
            njobs = len(iterkwargs)
            for entry in iterkwargs:
                if not isinstance(entry, dict):
                    raise TypeError(
                        f"If iterkwargs is a list, each entry must be a dict, not {type(entry)}"
                    )
        else:
            raise TypeError(
                "iterkwargs must be a dict of lists, a list of dicts, or None, "
                f"not {type(iterkwargs)}"
            )
    if njobs == 0:
        raise ValueError(
            "Nothing found to parallelize: please supply an iterarg, iterkwargs, or both"
        )
    return iterarg, embarrassing, njobs


def _count_cpus(ncpus: Any, njobs: int) -> int:
    system = shoal.cpu_count()
    if not ncpus:
        n = system
    elif 0 < ncpus < 1:
        n = math.ceil(system * ncpus)
    else:
        n = int(ncpus)
    n = min(n, njobs)
    if not n > 0:
        raise ValueError(
            f"No CPUs to run on with inputs ncpus={n}, system CPUs={system}, "
            f"and/or number of jobs={njobs}"
        )
    return n


def _choose_method(
    parallelizer: Any, serial: bool, start_method: str | None, capture: bool
) -> tuple[str, bool]:
    """The sciris method a ``parallelizer`` names, and whether ``-copy`` was asked for."""
    name = parallelizer
    if name is None or name == "async":
        name = "default"
    if serial:
        name = "serial"
    copy_args = False
    if isinstance(name, str):
        copy_args = "-copy" in name
        key = name.replace("copy", "").replace("async", "").replace("-", "")
        if key not in _MAPPING:
            raise _unknown_parallelizer(
                f'Parallelizer "{key}" not found: must be one of {", ".join(_MAPPING)}'
            )
        method = _MAPPING[key]
    elif callable(name):
        method = "custom"
    else:
        raise TypeError(f"parallelizer must be a name or a map-like function, not {name!r}")
    if isinstance(parallelizer, str) and "async" in parallelizer and not serial:
        supported = ["multiprocess", "multiprocessing"]
        if method not in supported:
            raise ValueError(
                f'You have specified to use async with "{method}", but async is only '
                f"supported for: {', '.join(supported)}."
            )
    methods = multiprocessing.get_all_start_methods()
    if start_method is not None and start_method not in methods:
        raise ValueError(
            f'Start method "{start_method}" not available: must be one of {", ".join(methods)}'
        )
    if capture and method == "thread":
        raise ValueError(
            "capture=True is not supported with thread-based parallelization, since threads "
            "share stdout; please use a process-based or serial parallelizer instead"
        )
    return method, copy_args


class _SharedDict:
    """A picklable handle on a manager's dict: becomes the dict's proxy in a worker.

    A plain proxy carries its manager's key only when multiprocessing itself starts the
    child; shoal's workers are started by the engine, so the handle carries the key.
    """

    def __init__(self, proxy: Any, authkey: bytes) -> None:
        self.token = proxy._token
        self.authkey = authkey

    def connect(self) -> Any:
        # The manager object is only consulted for its registry (iterating the dict makes an
        # iterator proxy); constructing it connects to nothing.
        client = SyncManager(address=self.token.address, authkey=self.authkey)
        return DictProxy(self.token, "pickle", manager=client, authkey=self.authkey)


class _Job:
    """Runs one sciris job in a worker: ``item`` is ``(index, iterval, iterdict)``."""

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        njobs: int,
        die: bool,
        capture: bool,
        copy_args: bool,
        callback: Callable[[dict[str, Any]], Any] | None,
        globaldict: Any,
        stop_file: str | None,
    ) -> None:
        self.func = func
        # shoal names the function in error notes by its __qualname__: name the user's.
        self.__qualname__ = getattr(func, "__qualname__", None) or repr(func)
        self.args = args
        self.kwargs = kwargs
        self.njobs = njobs
        self.die = die
        self.capture = capture
        self.copy_args = copy_args
        self.callback = callback
        self.globaldict = globaldict
        self.stop_file = stop_file

    def __call__(self, item: tuple[int, tuple[Any, ...] | None, dict[str, Any] | None]) -> Any:
        # A callback may stop the run: jobs that start after that are skipped, as in sciris.
        if self.stop_file is not None and os.path.exists(self.stop_file):
            return (None,)
        index, iterval, iterdict = item
        args, kwargs = self.args, self.kwargs
        if self.copy_args:
            iterval, iterdict = copy.deepcopy(iterval), copy.deepcopy(iterdict)
            args, kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)
        if iterval is not None:
            args = iterval + args
        kwargs = {**kwargs, **(iterdict or {})}
        globaldict = self.globaldict
        if isinstance(globaldict, _SharedDict):
            globaldict = globaldict.connect()
        if self.globaldict is not None:
            kwargs["globaldict"] = globaldict
        success = False
        try:
            if self.capture:
                with contextlib.redirect_stdout(io.StringIO()):
                    result = self.func(*args, **kwargs)
            else:
                result = self.func(*args, **kwargs)
            success = True
        except Exception as exc:
            if self.die:
                exc.add_note(f"Task {index} failed: set die=False to keep going instead.")
                raise
            result = exc  # as sciris documents: the exception is the job's result
        if self.callback is None:
            return (result,)
        data = {
            "index": index,
            "njobs": self.njobs,
            "args": args,
            "kwargs": kwargs,
            "globaldict": globaldict,
            "outdict": {"result": result, "success": success, "skipped": False},
            "stop": False,
        }
        self.callback(data)
        if data["stop"] and self.stop_file is not None:
            with open(self.stop_file, "w"):
                pass
        return (result,)


def _items(
    iterarg: Any, iterkwargs: Any, embarrassing: bool, njobs: int
) -> Iterator[tuple[int, tuple[Any, ...] | None, dict[str, Any] | None]]:
    for index in range(njobs):
        iterval: tuple[Any, ...] | None = None
        if iterarg is not None and not embarrassing:
            value = iterarg[index]
            iterval = value if isinstance(value, tuple) else (value,)
        iterdict: dict[str, Any] | None = None
        if isinstance(iterkwargs, dict):
            iterdict = {key: val[index] for key, val in iterkwargs.items()}
        elif iterkwargs is not None:
            iterdict = iterkwargs[index]
        yield index, iterval, iterdict


def _draw_seed() -> int | None:
    """One draw from numpy's global generator, as sciris takes before seeding each job."""
    try:
        import numpy as np
    except ImportError:
        return None
    return int(np.random.randint(2**63, dtype=np.int64))


def parallelize(
    func: Callable[..., Any],
    iterarg: Any = None,
    iterkwargs: Any = None,
    args: Any = None,
    kwargs: Mapping[str, Any] | None = None,
    ncpus: int | float | None = None,
    maxcpu: float | None = None,
    maxmem: float | None = None,
    interval: float | None = None,
    parallelizer: str | Callable[..., Any] | None = None,
    serial: bool = False,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    globaldict: dict[Any, Any] | None = None,
    capture: bool = False,
    die: bool = True,
    lbkwargs: Mapping[str, Any] | None = None,
    start_method: str | None = None,
    **func_kwargs: Any,
) -> list[Any]:
    """Run ``func`` once per job in parallel, as ``sciris.parallelize`` does, on shoal.

    Parameters
    ----------
    func : callable
        The function. Lambdas and closures work with every parallelizer.
    iterarg : sequence, int or None
        One job per entry: a tuple is unpacked as positional arguments, anything else is the
        first argument (``None`` included). An int ``n`` means ``n`` calls without an argument.
    iterkwargs : dict of lists or list of dicts
        Per-job keyword arguments, of the same length as ``iterarg`` when both are given.
    args, kwargs
        Positional and keyword arguments passed to every job (after the per-job ones).
        Extra keyword arguments of this function are merged into ``kwargs``.
    ncpus : int, float or None
        Workers: an int, a fraction of the CPUs if below 1, or ``None`` for all; never more
        than the number of jobs.
    maxcpu, maxmem, interval
        Hold back new jobs while the CPU load or the memory in use is above these fractions,
        checking every ``interval`` seconds (shoal's ``max_load``/``max_memory``). Honoured by
        the process-based parallelizers; ignored by ``"thread"``, ``"serial"`` and custom ones.
    parallelizer : str or callable
        ``None``/``"default"``/``"robust"``/``"multiprocess"``, ``"fast"``/``"concurrent"``/
        ``"concurrent.futures"`` and ``"multiprocessing"`` all run on shoal's processes backend;
        ``"thread"``/``"threadpool"`` on its threads backend; ``"serial"`` in this process. A
        ``-copy`` suffix deep-copies each job's arguments; ``-async`` is accepted where sciris
        accepts it (the call still returns the results). A callable is used as sciris uses it:
        ``parallelizer(task, items)`` must return the task's results, in order.
    serial : bool
        Same as ``parallelizer="serial"``.
    progress : bool
        Show shoal's progress bar.
    callback : callable
        Called in the worker after each job with a dict (``index``, ``njobs``, ``args``,
        ``kwargs``, ``globaldict``, ``outdict``, ``stop``); setting ``data["stop"] = True``
        stops jobs that have not started yet, whose results are then ``None``.
    globaldict : dict
        A dict shared by all jobs, passed to ``func`` as ``globaldict=``. On process workers it
        is served by a :mod:`multiprocessing` manager; the caller's dict is not changed.
    capture : bool
        Silence the jobs' standard output (``sc.parallelize`` discards it too; only
        ``sc.Parallel`` keeps it).
    die : bool
        ``True``: the first failure is raised with its own type, and the run stops. ``False``:
        the exception takes the failed job's place and the rest run; a worker that died gives
        a :class:`shoal.WorkerCrashedError` in its place.
    lbkwargs : dict
        Defaults for ``maxcpu``, ``maxmem`` and ``interval``, which override it when given.
    start_method : str
        Checked as sciris checks it, then ignored: shoal starts its workers itself.
    **func_kwargs
        Merged into ``kwargs``.

    Returns
    -------
    list
        One result per job, in job order.

    Raises
    ------
    KeyNotFoundError
        For an unknown ``parallelizer`` name (sciris' own class when sciris is installed).
    ValueError, TypeError
        For inputs sciris refuses, with sciris' messages.
    """
    merged = {**(kwargs or {}), **func_kwargs}
    maxload = merged.pop("maxload", None)
    explicit = {"maxcpu": maxcpu, "maxmem": maxmem, "interval": interval}
    balance = {**explicit, **(lbkwargs or {})}
    balance.update({k: v for k, v in explicit.items() if v is not None})
    if maxload is not None:
        balance["maxcpu"] = maxload
        warnings.warn(
            'sc.loadbalancer() argument "maxload" has been renamed "maxcpu" as of v2.0.0',
            FutureWarning,
            stacklevel=2,
        )
    iterarg, embarrassing, njobs = _count_jobs(iterarg, iterkwargs)
    workers = _count_cpus(ncpus, njobs)
    method, copy_args = _choose_method(parallelizer, serial, start_method, capture)
    fixed = () if args is None else tuple(args) if isinstance(args, (list, tuple)) else (args,)

    with contextlib.ExitStack() as stack:
        shared: Any = None
        if globaldict is not None:
            if method == "custom":
                shared = globaldict
            elif method in _PROCESS_METHODS:
                # The proxy keeps the served dict alive until the call returns.
                _proxy, shared = _shared_dict(globaldict)
            else:
                shared = dict(globaldict)
        stop_file = None
        if callback is not None:
            folder = tempfile.mkdtemp(prefix="shoal-sciris-")
            stack.callback(shutil.rmtree, folder, True)
            stop_file = os.path.join(folder, "stop")
        job = _Job(
            func,
            fixed,
            merged,
            njobs=njobs,
            die=die,
            capture=capture,
            copy_args=copy_args and method in ("serial", "thread", "custom"),
            callback=callback,
            globaldict=shared,
            stop_file=stop_file,
        )
        items = list(_items(iterarg, iterkwargs, embarrassing, njobs))
        if method == "custom":
            assert callable(parallelizer)
            outcomes = list(parallelizer(job, items))
        else:
            outcomes = _run(job, items, method, workers, njobs, balance, progress, die)
    results = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):  # the worker died (die=False)
            results.append(outcome)
        else:
            results.append(outcome[0])
        if isinstance(results[-1], BaseException):
            warnings.warn(
                f"sc.parallelize(): Task {index} failed, but die=False so continuing: "
                f"{results[-1]!r}",
                RuntimeWarning,
                stacklevel=2,
            )
    return results


#: This process's dict server: ``(address, authkey)``, started on first use.
_server: tuple[Any, bytes] | None = None
_server_lock = threading.Lock()


def _shared_dict(contents: dict[Any, Any]) -> tuple[Any, _SharedDict]:
    """A dict served to the workers from this process; return its proxy and its handle.

    sciris serves ``globaldict`` from a manager process. Here a manager's server runs in a
    thread of this process instead: forking this process (engine and pump threads) could
    inherit a lock held by another thread, and spawning would re-run the user's script.
    The dict lives as long as the returned proxy.
    """
    global _server
    with _server_lock:
        if _server is None:
            authkey = os.urandom(32)
            server = SyncManager(address=("127.0.0.1", 0), authkey=authkey).get_server()
            server.stop_event = threading.Event()  # type: ignore[attr-defined]  # serve_forever sets it
            threading.Thread(target=server.accepter, name="shoal-globaldict", daemon=True).start()
            _server = (server.address, authkey)
    address, authkey = _server
    client = SyncManager(address=address, authkey=authkey)
    client.connect()
    proxy = client.dict(contents)
    return proxy, _SharedDict(proxy, authkey)


def _run(
    job: _Job,
    items: list[Any],
    method: str,
    workers: int,
    njobs: int,
    balance: Mapping[str, Any],
    progress: bool,
    die: bool,
) -> list[Any]:
    options: dict[str, Any] = {"on_error": "raise" if die else "return", "progress": progress}
    if method in _PROCESS_METHODS:
        # Each job gets its own numpy seed, derived from one draw from the caller's generator:
        # reproducible when the caller seeds numpy, different in each call (as in sciris).
        options["seed"] = _draw_seed()
        # sciris measures both as fractions of 100%: a limit of 1 or more never holds back.
        if balance.get("maxcpu") and balance["maxcpu"] < 1:
            options["max_load"] = balance["maxcpu"]
        if balance.get("maxmem") and balance["maxmem"] < 1:
            options["max_memory"] = float(balance["maxmem"])
        interval = balance.get("interval")
        if interval and ("max_load" in options or "max_memory" in options):
            with shoal.backend("processes", load_check_interval=interval) as be:
                return shoal.map(job, items, workers=workers, backend=be, **options)
        return shoal.map(job, items, workers=workers, backend="processes", **options)
    return shoal.map(job, items, workers=workers, backend=_BACKENDS[method], **options)
