"""What one Slurm array task runs: ``python -m shoal.backends._slurm_task BATCH_DIR``.

The task reads its input file (``BATCH_DIR/t<SLURM_ARRAY_TASK_ID>.in``: chunks of items under
registered specs), runs each chunk on a small pool of shoal's own worker processes, and writes
one result file per chunk (``BATCH_DIR/c<seq>.out``, written to a temporary name and renamed,
so the driver never reads half a file).

Items run in worker processes, not in this process, for the same reasons as on a laptop: an item
that crashes (a segfault, ``os._exit``) fails alone and the task goes on; ``timeout=`` kills
only the item past its limit; ``max_worker_memory`` and ``max_tasks_per_worker`` replace a
worker. The engine is the processes backend's, so those behave exactly as they do locally.

A result file holds ``len(meta)`` (8 bytes), ``meta`` (a pickle: per-item crashes and the time
taken) and the outcome of the chunk as :func:`shoal._pickling.encode_outcome` writes it.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct("<Q")


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def pack_result(meta: dict[str, Any], outcome: bytes) -> bytes:
    head = pickle.dumps(meta, protocol=5)
    return HEADER.pack(len(head)) + head + outcome


def unpack_result(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = HEADER.unpack_from(data)
    start = HEADER.size
    return pickle.loads(data[start : start + size]), data[start + size :]


def _load_error(what: str, exc: BaseException) -> BaseException:
    from .._worker import SetupLoadError

    err = SetupLoadError(f"{what} could not be unpickled in the Slurm task: {exc!r}")
    err.__cause__ = exc
    return err


class _Runner:
    """Runs chunks on a local pool of shoal worker processes (the processes engine)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .._spec import Limits
        from .processes import ProcessPool

        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or config.get("cpus") or 1)
        self.pool = ProcessPool(
            max(1, cpus), idle_timeout=None, threads_per_worker=config.get("threads_per_worker")
        )
        self.limits = Limits(
            timeout=config.get("timeout"),
            max_tasks_per_worker=config.get("max_tasks_per_worker"),
            max_worker_memory=config.get("max_worker_memory"),
        )
        self.per_item = self.limits.timeout is not None
        self.session = self.pool.open_session(ordered=False, limits=self.limits)
        self.specs: dict[int, Any] = {}

    def spec(self, run_dir: str, spec_id: int) -> tuple[int, Any] | BaseException:
        got = self.specs.get(spec_id)
        if got is None:
            from .. import _shm

            try:
                with open(os.path.join(run_dir, f"spec-{spec_id}.pkl"), "rb") as f:
                    spec = _shm.loads(f.read())
                got = (self.session.register(spec), spec)
            except Exception as exc:
                got = _load_error("the function", exc)
            self.specs[spec_id] = got
        return got

    def run(self, spec: Any, local_id: int, start: int, items: Any) -> tuple[bytes, dict[str, Any]]:
        """Run one chunk; return its encoded outcome and the meta (per-item crashes)."""
        from .._pickling import encode_outcome

        n = len(items)
        values: list[Any] = [None] * n
        errors: dict[int, Any] = {}
        crashes: dict[int, Any] = {}
        done = [False] * n
        in_flight: dict[int, tuple[int, int]] = {}  # local seq -> (offset, count)
        session = self.session
        stop_at = n  # with stop_on_error: the offset of the first error that stops the chunk
        offset = 0
        began = time.perf_counter_ns()

        def send(off: int, count: int, alone: bool = False) -> None:
            seq = session.submit(local_id, list(items[off : off + count]), start + off, alone)
            in_flight[seq] = (off, count)

        # Keep a few sub-chunks queued per worker; an item with a timeout goes alone.
        window = 2 * self.pool.workers + 2
        while offset < n or in_flight:
            while offset < stop_at and offset < n and len(in_flight) < window:
                count = 1 if self.per_item else session.chunk_size(local_id, n - offset)
                count = max(1, min(count, n - offset))
                send(offset, count)
                offset += count
            for res in session.wait(None):
                if res.partial:
                    # A long sub-chunk reported its first items: take them now, and keep only
                    # the rest pending (a later crash re-runs or blames only those).
                    off, count = in_flight[res.seq]
                    in_flight[res.seq] = (off + len(res.values), count - len(res.values))
                else:
                    off, count = in_flight.pop(res.seq)
                if res.crash is not None:
                    if count > 1:  # find the culprit: each item again, alone
                        for i in range(off, off + count):
                            send(i, 1, True)
                        continue
                    crashes[off] = res.crash
                    done[off] = True
                    continue
                for i, value in enumerate(res.values):
                    values[off + i] = value
                    done[off + i] = True
                for err in res.errors:
                    at = off + err.offset
                    errors[at] = err
                    err.offset = at
                    if spec.stop_on_error and not isinstance(err.exc, spec.retry_on):
                        stop_at = min(stop_at, at)
            if stop_at < n:
                later = [s for s, (o, _) in in_flight.items() if o > stop_at]
                if later:
                    session.cancel(later)
                    for s in later:
                        del in_flight[s]
        # What the driver gets: every item up to the end, or up to the error that stopped it.
        last = n if stop_at >= n else stop_at + 1
        while last > 0 and not done[last - 1]:
            last -= 1  # items after a stop that never ran are not reported
        kept = [errors[i] for i in sorted(errors) if i < last]
        wire_crashes = [
            (i, c.pid, c.exit, c.kind, c.limit, c.rss)
            for i, c in sorted(crashes.items())
            if i < last
        ]
        meta = {"crashes": wire_crashes, "elapsed": time.perf_counter_ns() - began}
        return encode_outcome(values[:last], kept), meta

    def close(self) -> None:
        self.session.close()
        self.pool.shutdown(kill=True)


def _fail_all(exc: BaseException, n: int, stop: bool) -> bytes:
    from .._execute import format_remote_traceback
    from .._pickling import encode_outcome
    from .._spec import ItemError

    count = 1 if stop else max(1, n)
    tb = format_remote_traceback(exc.__cause__ or exc)
    return encode_outcome([None] * count, [ItemError(i, exc, tb, "") for i in range(count)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    batch_dir = argv[0]
    task = int(argv[1]) if len(argv) > 1 else int(os.environ["SLURM_ARRAY_TASK_ID"])
    run_dir = os.path.dirname(batch_dir)
    # Functions pickled by reference must import here as in the driver.
    extra = os.environ.get("SHOAL_SYS_PATH", "")
    for entry in reversed([e for e in extra.split(os.pathsep) if e]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    with open(os.path.join(run_dir, "session.pkl"), "rb") as f:
        config = pickle.load(f)
    with open(os.path.join(batch_dir, f"t{task}.in"), "rb") as f:
        chunks = pickle.load(f)
    from .. import _shm

    runner = _Runner(config)
    try:
        for seq, spec_id, payload in chunks:
            spec = runner.spec(run_dir, spec_id)
            meta: dict[str, Any] = {"crashes": [], "elapsed": 0}
            if isinstance(spec, BaseException):
                outcome = _fail_all(spec, 1, True)
            else:
                local_id, call = spec
                try:
                    start, items = _shm.loads(payload)
                except Exception as exc:
                    outcome = _fail_all(_load_error("the arguments", exc), 1, True)
                else:
                    outcome, meta = runner.run(call, local_id, start, items)
            write_atomic(os.path.join(batch_dir, f"c{seq}.out"), pack_result(meta, outcome))
    finally:
        runner.close()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
