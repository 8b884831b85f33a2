"""Backends: which engine runs the tasks, and how to choose one.

``processes`` (default), ``threads`` and ``serial`` ship with shoal; ``dask`` and ``ray``
run on those engines' clusters when installed (``pip install 'shoal[dask]'``,
``'shoal[ray]'``). Choose one per call
(``backend="threads"``), for a block (``with shoal.backend("threads"):``) or for the process
(``shoal.set_backend("threads")``). Subclass :class:`Backend` to plug in another engine, and
pass an instance wherever a name is accepted.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
from collections.abc import Iterator
from typing import Any

from ._base import Backend, LocalSession, Pool, Session
from .mpi import MpiBackend
from .processes import ProcessBackend
from .serial import SerialBackend
from .threads import ThreadBackend

__all__ = [
    "Backend",
    "LocalSession",
    "Pool",
    "Session",
    "available_backends",
    "backend",
    "get_backend",
    "register_backend",
    "set_backend",
]

_REGISTRY: dict[str, type[Backend]] = {
    ProcessBackend.name: ProcessBackend,
    ThreadBackend.name: ThreadBackend,
    SerialBackend.name: SerialBackend,
    MpiBackend.name: MpiBackend,
}
#: Backends on engines installed as extras (name -> "module:class"): imported on first use, so
#: that ``import shoal`` never imports Dask, Ray or the Slurm client code.
_LAZY: dict[str, str] = {
    "dask": "shoal.backends.dask:DaskBackend",
    "ray": "shoal.backends.ray:RayBackend",
    "slurm": "shoal.backends.slurm:SlurmBackend",
}
_default: Backend | None = None
_default_lock = threading.Lock()
_override: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "shoal_backend", default=None
)


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``cls`` available under ``name`` for ``backend=name``."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"a backend must be a subclass of shoal.Backend, not {cls!r}")
    _REGISTRY[name] = cls


def available_backends() -> list[str]:
    """Names accepted by ``backend=``."""
    return sorted({*_REGISTRY, *_LAZY})


_shared: dict[str, Backend] = {}


def _create(name: str, options: dict[str, Any]) -> Backend:
    if name not in _REGISTRY and name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    try:
        cls = _REGISTRY[name]
    except KeyError:
        known = ", ".join(repr(n) for n in available_backends())
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None
    if options:
        return cls(**options)
    # A bare name means the process-wide instance, so `backend="threads"` on every call
    # reuses one pool instead of starting a new one each time.
    with _default_lock:
        shared = _shared.get(name)
        if shared is None or type(shared) is not cls:
            shared = _shared[name] = cls()
        return shared


def _current() -> Backend:
    global _default
    chosen = _override.get()
    if chosen is not None:
        return chosen
    current = _default
    if current is None:
        # The default is the process-wide "processes" instance, so that `backend="processes"`
        # and no backend at all share one pool instead of starting workers twice.
        shared = _create("processes", {})
        with _default_lock:
            if _default is None:
                _default = shared
            current = _default
    return current


def get_backend(name: str | Backend | None = None, **options: Any) -> Backend:
    """Return a backend instance without changing the default.

    Parameters
    ----------
    name : str, Backend or None
        A backend name, an instance (returned as is), or ``None`` for the current default.
        A name without options gives the process-wide instance of that backend (its pools are
        shared by every call that names it).
    **options
        Options for a new instance (``workers=``, and the backend's own). With ``name=None`` and
        options, a new instance of the default's kind is made.

    Raises
    ------
    ValueError
        For an unknown backend name.
    TypeError
        For an option the backend does not take.
    """
    if isinstance(name, Backend):
        if options:
            raise TypeError("options cannot be given together with a backend instance")
        return name
    if name is None:
        if not options:
            return _current()
        name = _current().name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a shoal.Backend, not {type(name).__name__}")
    return _create(name, options)


def set_backend(name: str | Backend, **options: Any) -> Backend:
    """Set the default backend for this process; returns it.

    The previous default's shared pools are shut down.
    """
    global _default
    new = get_backend(name, **options)
    with _default_lock:
        old, _default = _default, new
    if old is not None and old is not new:
        old.shutdown()
    return new


@contextlib.contextmanager
def backend(name: str | Backend, **options: Any) -> Iterator[Backend]:
    """Use a backend for the duration of a ``with`` block (in this thread or task).

    A backend created here (a name with options) is shut down when the block ends.
    """
    created = not isinstance(name, Backend) and bool(options)
    chosen = get_backend(name, **options)
    token = _override.set(chosen)
    try:
        yield chosen
    finally:
        _override.reset(token)
        if created:
            chosen.shutdown()
