"""shoal: parallel map for scientific Python, with a Rust engine.

One line runs a function on every input, on all usable cores::

    import shoal
    results = shoal.map(simulate, parameters)

The same call runs on threads, in-process (for debugging), or on other engines by naming a
backend. See :func:`map` for the options every API shares.
"""

from __future__ import annotations

from ._api import as_completed, imap, map, starmap
from ._errors import (
    PicklingError,
    RemoteError,
    RemoteTraceback,
    ShoalError,
    WorkerCrashedError,
    WorkerStartError,
)
from ._executor import Executor
from ._options import cpu_count
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

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Executor",
    "PicklingError",
    "Pool",
    "RemoteError",
    "RemoteTraceback",
    "Session",
    "ShoalError",
    "WorkerCrashedError",
    "WorkerStartError",
    "__version__",
    "as_completed",
    "available_backends",
    "backend",
    "cpu_count",
    "get_backend",
    "imap",
    "map",
    "register_backend",
    "set_backend",
    "starmap",
]
