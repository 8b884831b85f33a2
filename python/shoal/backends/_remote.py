"""What runs inside a cluster worker (Dask or Ray) for one chunk of a shoal call.

A cluster backend sends each call's spec once (scattered or put in the object store) as an
opaque blob made by :func:`dumps_remote_spec`, and each chunk as a pickled ``(start, items)``.
A worker task calls :func:`run_remote`, which unpickles the spec once per worker process (kept
in a small cache keyed by the spec's token), runs the items with
:func:`shoal._execute.run_chunk` and answers with :func:`shoal._pickling.encode_outcome`, exactly
as a worker of the processes backend does. The driver decodes the answer with
:func:`shoal._pickling.decode_outcome`.

Everything here must import fast and without the engines: it is imported by the workers.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import uuid
from collections import OrderedDict

from .._context import CallContext, release
from .._execute import format_remote_traceback, run_chunk
from .._pickling import dumps_spec, encode_outcome
from .._spec import CallSpec
from .._worker import SetupLoadError, _failed_chunk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Specs (and contexts) a worker process keeps; older ones are dropped (an old call that is
#: still running just unpickles its spec again).
MAX_SPECS = 16

#: Unique to this driver process: context keys of different drivers on one cluster never meet.
DRIVER_TOKEN = uuid.uuid4().hex[:16]

_specs: OrderedDict[str, CallSpec | BaseException] = OrderedDict()
_contexts: OrderedDict[Any, None] = OrderedDict()
_lock = threading.Lock()
# Items of a seeded call share the process's global random state; a Dask worker may run several
# task threads in one process, so seeding and running one item is done under this lock.
_seed_lock = threading.Lock()


def dumps_remote_spec(spec: CallSpec) -> bytes:
    """Pickle ``spec`` for cluster workers, with this driver's ``sys.path`` entries.

    Functions pickled by reference (``module.function``) must import in the worker as they do
    here, as the processes backend arranges with ``SHOAL_SYS_PATH``. The context key is made
    unique to this driver process, since workers of a cluster serve many drivers.

    Raises
    ------
    shoal.PicklingError
        Naming the function or argument that cannot be pickled.
    """
    ctx = spec.context
    if ctx is not None:
        remote_ctx = CallContext(
            ctx.initializer, ctx.initargs, ctx.shared, key=(DRIVER_TOKEN, ctx.key)
        )
        spec = CallSpec(
            spec.fn,
            spec.mode,
            spec.args,
            spec.kwargs,
            spec.stop_on_error,
            spec.retry_on,
            spec.seed,
            remote_ctx,
        )
    paths = [p for p in sys.path if p]
    return pickle.dumps((paths, dumps_spec(spec)), 5)


def _load_spec(token: str, blob: bytes) -> CallSpec | BaseException:
    with _lock:
        hit = _specs.get(token)
        if hit is not None:
            _specs.move_to_end(token)
            return hit
    try:
        paths, body = pickle.loads(blob)
        for entry in reversed(paths):
            if entry not in sys.path and os.path.isdir(entry):
                sys.path.append(entry)
        spec: CallSpec | BaseException = pickle.loads(body)
    except BaseException as exc:
        spec = SetupLoadError(f"the function could not be loaded in the worker: {exc!r}")
        spec.__cause__ = exc
    with _lock:
        _specs[token] = spec
        while len(_specs) > MAX_SPECS:
            _specs.popitem(last=False)
        ctx = getattr(spec, "context", None)
        if ctx is not None:
            _contexts[ctx.key] = None
            _contexts.move_to_end(ctx.key)
            while len(_contexts) > MAX_SPECS:
                old, _ = _contexts.popitem(last=False)
                release(old)
    return spec


def run_remote(token: str, spec_blob: bytes, payload: bytes) -> tuple[bytes, int, int]:
    """Run one chunk in a cluster worker.

    Parameters
    ----------
    token : str
        Identifies the spec (one per registered spec of a session).
    spec_blob : bytes
        The spec from :func:`dumps_remote_spec` (the engine hands over the scattered copy).
    payload : bytes
        ``pickle((start, items))``.

    Returns
    -------
    tuple
        ``(outcome, elapsed_ns, pid)``: the outcome from :func:`encode_outcome`, the time spent
        (for the chunk-size policy) and this worker's process id.
    """
    began = time.perf_counter_ns()
    spec = _load_spec(token, spec_blob)
    if isinstance(spec, BaseException):
        blob = _failed_chunk(spec, format_remote_traceback(spec.__cause__ or spec), 1, True)
        return blob, time.perf_counter_ns() - began, os.getpid()
    try:
        start, items = pickle.loads(payload)
    except Exception as exc:
        err = SetupLoadError(f"the arguments could not be unpickled in the worker: {exc!r}")
        blob = _failed_chunk(err, format_remote_traceback(exc), 1, True)
        return blob, time.perf_counter_ns() - began, os.getpid()
    lock = _seed_lock if spec.seed is not None else None
    values, errors = run_chunk(spec, items, start, lock)
    blob = encode_outcome(values, errors)
    return blob, time.perf_counter_ns() - began, os.getpid()


def forget(prefix: str) -> None:
    """Drop the cached specs whose token starts with ``prefix`` (a finished session)."""
    with _lock:
        for token in [t for t in _specs if t.startswith(prefix)]:
            spec = _specs.pop(token)
            ctx = getattr(spec, "context", None)
            if ctx is not None and not any(
                getattr(s, "context", None) is not None and s.context.key == ctx.key  # type: ignore[union-attr]
                for s in _specs.values()
            ):
                _contexts.pop(ctx.key, None)
                release(ctx.key)


async def forget_soon(prefix: str) -> None:
    """:func:`forget` as a coroutine: Dask runs it on each worker without a reply."""
    forget(prefix)


def run_remote_streaming(token: str, spec_blob: bytes, payload: bytes) -> Any:
    """:func:`run_remote` as a generator: first this worker's pid, when the chunk starts, then
    the outcome. Ray streams the first value back at once, so the driver can time a chunk from
    its start (``timeout=``) rather than from when it was sent."""
    yield os.getpid()
    yield run_remote(token, spec_blob, payload)
