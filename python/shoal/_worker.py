"""The worker process of the processes backend.

Started by the Rust supervisor as ``python -c "from shoal._worker import main; main()" FD``,
where FD is this worker's end of a Unix socketpair. It loops over frames:

- *setup*: a pickled :class:`~shoal._spec.CallSpec`, kept until *release*;
- *task*: a pickled chunk of items; it runs the chunk and queues a *result* frame; a chunk
  that runs for long first sends *partial* frames with the outcome of its finished items, so
  that they survive a crash of this worker later in the chunk;
- *shutdown* or end of stream: exit.

Receives and sends are Rust calls (:class:`shoal._native.WorkerChannel`) that release the GIL.
Results are flushed when the worker is about to wait for more work, so a burst of small tasks
is answered in few system calls. The reported time covers unpickling, running and pickling,
which is what the chunk-size policy needs to know.
"""

from __future__ import annotations

import os
import sys
import time

from . import _native, _shm
from ._errors import ShoalError
from ._execute import format_remote_traceback, run_chunk
from ._pickling import encode_outcome
from ._spec import CallSpec, ItemError

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class SetupLoadError(ShoalError):
    """The call's function or fixed arguments could not be unpickled in the worker."""


def _extend_sys_path() -> None:
    # Functions pickled by reference (module.function) must be importable here as in the driver.
    extra = os.environ.get("SHOAL_SYS_PATH")
    if extra:
        for entry in reversed(extra.split(os.pathsep)):
            if entry not in sys.path:
                sys.path.insert(0, entry)


def _failed_chunk(failure: BaseException, tb: str, n: int, stop: bool) -> bytes:
    count = 1 if stop else max(n, 1)
    errors = [ItemError(i, failure, tb, "") for i in range(count)]
    return encode_outcome([None] * count, errors)


def _run_task(
    setup: CallSpec | BaseException,
    payload: bytes,
    segments: _shm.ResultSegments,
    report: Callable[[list[Any], list[ItemError]], None],
) -> bytes:
    if isinstance(setup, BaseException):
        return _failed_chunk(setup, format_remote_traceback(setup), 1, True)
    try:
        start, items = _shm.loads(payload)
    except Exception as exc:
        err = SetupLoadError(f"the arguments could not be unpickled in the worker: {exc!r}")
        return _failed_chunk(err, format_remote_traceback(exc), 1, True)
    values, errors = run_chunk(setup, items, start, report=report)
    return encode_outcome(values, errors, segments)


def main(fd: int | None = None) -> None:
    """Serve tasks on file descriptor ``fd`` (default: the last command-line argument)."""
    if fd is None:
        fd = int(sys.argv[-1])
    _extend_sys_path()
    channel = _native.WorkerChannel(fd)
    try:  # noqa: SIM105 - contextlib would cost every worker's start-up an import
        _serve(channel)
    except (_native.EngineError, OSError):
        # The driver is gone (killed, or its socket reset mid-frame): nobody is left to tell,
        # and a traceback per worker on the terminal would only bury the driver's own error.
        pass
    sys.stdout.flush()
    sys.stderr.flush()


def _serve(channel: _native.WorkerChannel) -> None:
    channel.hello(os.getpid())
    setups: dict[int, Any] = {}
    segments = _shm.ResultSegments()  # reused: emptied after each result
    clock = time.perf_counter_ns
    task_kind, setup_kind = _native.KIND_TASK, _native.KIND_SETUP
    release_kind, shutdown_kind = _native.KIND_RELEASE, _native.KIND_SHUTDOWN
    while True:
        frame = channel.recv()
        if frame is None:
            break
        kind, ident, aux, payload = frame
        if kind == task_kind:
            start = clock()
            setup = setups.get(aux)

            def report(values: list[Any], errors: list[ItemError], task: int = ident) -> None:
                # A long chunk's finished items go to the driver now (and survive a crash).
                partial = encode_outcome(values, errors, segments)
                channel.send_partial(task, len(values), partial, segments.fds())
                segments.close()

            blob = _run_task(_missing(aux) if setup is None else setup, payload, segments, report)
            # Large buffers of the result travel as segments passed with the frame; once it
            # is sent, our handles on them can go.
            channel.send_result(ident, clock() - start, blob, segments.fds())
            segments.close()
            # Hold nothing of this task while waiting: a released call's arrays (mapped
            # segments) must be freed when the release arrives, not at the next task.
            del setup, blob, payload, frame, report
        elif kind == setup_kind:
            try:
                setups[ident] = _shm.loads(payload)
            except BaseException as exc:
                setups[ident] = SetupLoadError(
                    f"the function could not be loaded in the worker: {exc!r}"
                )
                setups[ident].__cause__ = exc
        elif kind == release_kind:
            gone = setups.pop(ident, None)
            context = getattr(gone, "context", None)
            if context is not None and not any(
                getattr(s, "context", None) is not None and s.context.key == context.key
                for s in setups.values()
            ):
                from ._context import release

                release(context.key)
            gone = context = None  # its mapped segments go now, not at the next release
            _shm.tidy_reused()
        elif kind == shutdown_kind:
            break
    channel.flush()


def _missing(setup: int) -> BaseException:
    return SetupLoadError(f"setup {setup} is unknown to this worker (protocol error)")
