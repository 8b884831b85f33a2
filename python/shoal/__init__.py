"""shoal: parallel map for scientific Python, with a Rust engine.

One line runs a function on every input, on all usable cores::

    import shoal
    results = shoal.map(simulate, parameters)

The same call runs on threads, in-process (for debugging), or on other engines by naming a
backend. See :func:`map` for the options every API shares.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:
    from typing import Any

    from ._api import as_completed, imap, map, starmap
    from ._batched import batched
    from ._context import InitializerError, shared, worker_state
    from ._errors import (
        DependencyError,
        PicklingError,
        RemoteError,
        RemoteTraceback,
        ShoalError,
        TaskTimeoutError,
        WorkerCrashedError,
        WorkerMemoryError,
        WorkerStartError,
    )
    from ._executor import Executor
    from ._options import cpu_count
    from ._progress import ProgressInfo
    from ._shared import share, shared_zeros
    from .backends import (
        Backend,
        Pool,
        Session,
        available_backends,
        backend,
        get_backend,
        register_backend,
        set_backend,
    )
    from .store import Store, StoreError, StoreWarning

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562). A worker process imports this package too,
# and must not pay for the driver's modules (concurrent.futures, threading machinery...).
_LAZY = {
    "as_completed": "._api",
    "imap": "._api",
    "map": "._api",
    "starmap": "._api",
    "batched": "._batched",
    "DependencyError": "._errors",
    "PicklingError": "._errors",
    "RemoteError": "._errors",
    "RemoteTraceback": "._errors",
    "ShoalError": "._errors",
    "WorkerCrashedError": "._errors",
    "TaskTimeoutError": "._errors",
    "WorkerMemoryError": "._errors",
    "ProgressInfo": "._progress",
    "InitializerError": "._context",
    "shared": "._context",
    "worker_state": "._context",
    "WorkerStartError": "._errors",
    "Executor": "._executor",
    "cpu_count": "._options",
    "share": "._shared",
    "Store": ".store",
    "StoreError": ".store",
    "StoreWarning": ".store",
    "shared_zeros": "._shared",
    "Backend": ".backends",
    "Pool": ".backends",
    "Session": ".backends",
    "available_backends": ".backends",
    "backend": ".backends",
    "get_backend": ".backends",
    "register_backend": ".backends",
    "set_backend": ".backends",
}


#: Subpackages reachable as ``shoal.spmd`` after a plain ``import shoal``, imported on first use.
_SUBMODULES = ("mpi", "spmd")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Backend",
    "DependencyError",
    "Executor",
    "InitializerError",
    "PicklingError",
    "Pool",
    "ProgressInfo",
    "RemoteError",
    "RemoteTraceback",
    "Session",
    "ShoalError",
    "Store",
    "StoreError",
    "StoreWarning",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "WorkerStartError",
    "__version__",
    "as_completed",
    "available_backends",
    "backend",
    "batched",
    "cpu_count",
    "get_backend",
    "imap",
    "map",
    "register_backend",
    "set_backend",
    "share",
    "shared",
    "shared_zeros",
    "starmap",
    "worker_state",
]
