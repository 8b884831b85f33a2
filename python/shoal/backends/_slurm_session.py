"""One call (or one Executor) on Slurm: chunks held, submitted as array jobs, results polled.

See :mod:`shoal.backends.slurm` for the whole picture. A session writes the call's spec once,
holds submitted chunks for a short window, sends them as one ``sbatch --array`` job of at most
``workers`` tasks, reads each chunk's result file as it appears, and asks ``squeue`` (then
``scontrol``) about tasks that left the queue without writing all of theirs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._errors import PicklingError, ShoalError
from .._pickling import decode_outcome, dumps_items, dumps_spec
from .._spec import CallSpec, ChunkResult, ItemError, Limits
from ._base import Session
from ._slurm_cli import (
    SlurmCrash,
    SlurmError,
    crash_of,
    format_time,
    job_records,
    memory_bytes,
    private_dir,
    sbatch,
    sbatch_options,
    scancel,
    sigint_deferred,
    squeue_alive,
)
from ._slurm_task import unpack_result, write_atomic

if TYPE_CHECKING:
    from .slurm import SlurmPool

#: Items per chunk when the length of the input is not known.
UNKNOWN_LENGTH_CHUNK = 256
#: Seconds added to the ``--time`` derived from ``timeout=`` (start-up, pickling, slack).
TIME_MARGIN = 120
#: Seconds a COMPLETED task may take for its result files to show up (shared filesystems
#: cache directory listings) before its chunks count as lost.
RESULT_GRACE = 30.0
#: Seconds squeue may keep failing before the call gives up.
QUEUE_PATIENCE = 300.0

_runs = itertools.count()


def _private_file(path: str, data: bytes) -> None:
    write_atomic(path, data)  # created 0600


class _Chunk:
    __slots__ = ("n", "payload", "resources", "seq", "spec_id", "start")

    def __init__(
        self, seq: int, spec_id: int, start: int, n: int, payload: bytes, resources: Any
    ) -> None:
        self.seq = seq
        self.spec_id = spec_id
        self.start = start
        self.n = n
        self.payload = payload
        self.resources = resources


class _Task:
    """One array task: which chunks it runs, and whether Slurm has ended it."""

    __slots__ = ("batch_dir", "ended_at", "index", "job_id", "seqs")

    def __init__(self, job_id: int, index: int, batch_dir: str, seqs: list[int]) -> None:
        self.job_id = job_id
        self.index = index
        self.batch_dir = batch_dir
        self.seqs = seqs
        self.ended_at: float | None = None  # when it was seen COMPLETED with results missing

    @property
    def name(self) -> str:
        return f"{self.job_id}_{self.index}"

    def logs(self) -> str:
        base = os.path.join(self.batch_dir, f"t{self.index}")
        return f"{base}.out and {base}.err"


class SlurmSession(Session):
    """One call (or one Executor) on Slurm; see the module docs."""

    #: The array task enforces ``timeout=`` per item itself, so chunks need not be single items.
    times_items = True

    def __init__(self, pool: SlurmPool, *, ordered: bool, limits: Limits | None) -> None:
        backend = pool.backend
        self._pool = pool
        self._backend = backend
        self._workers = pool.workers
        self._ordered = ordered
        self._limits = limits or Limits()
        # Chunks held by a call: a round trip through Slurm takes a second or more, so with
        # small chunks (an explicit chunksize) a narrow window would pay it many times.
        self.max_in_flight = max(2 * pool.workers + 2, 64)
        base = backend.run_dir or os.path.join(os.getcwd(), ".shoal", "slurm")
        private_dir(base)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = private_dir(
            os.path.join(base, f"{stamp}-{os.getpid()}-{next(_runs)}-{os.urandom(2).hex()}"),
            fresh=True,
        )
        # Unique, so that `scancel --name` finds this call's jobs even if an id was lost.
        self.job_name = f"shoal-{os.path.basename(self.run_dir)}"
        config = {
            "timeout": self._limits.timeout,
            "max_tasks_per_worker": self._limits.max_tasks_per_worker,
            "max_worker_memory": self._limits.max_worker_memory,
            "threads_per_worker": backend.threads_per_worker,
            "cpus": backend.cpus_per_task or 1,
        }
        _private_file(os.path.join(self.run_dir, "session.pkl"), pickle.dumps(config))
        self._script = os.path.join(self.run_dir, "task.sh")
        _private_file(self._script, backend.script().encode())
        self._lock = threading.RLock()
        self._specs: dict[int, CallSpec] = {}
        self._sizes: dict[int, int] = {}
        self._next_seq = 0
        self._pending: list[_Chunk] = []
        self._first_pending = 0.0
        self._last_submit = 0.0
        self._chunks: dict[int, _Chunk] = {}  # submitted, result not yet delivered
        self._task_of: dict[int, _Task] = {}
        self._tasks: list[_Task] = []
        self._batches = 0
        self._jobs: list[int] = []
        self._cancelled: set[int] = set()
        self._split: dict[tuple[int, int], tuple[str, Any]] = {}
        self._held: dict[int, tuple[Any, Any]] = {}  # id(item) -> (item, resources)
        self._ready: list[ChunkResult] = []
        self._parked: dict[int, ChunkResult] = {}
        self._next_out = 0
        self._woken = False
        self._closed = False
        self._failed = False
        self._last_poll = 0.0
        self._queue_down_since: float | None = None
        pool._sessions.add(self)

    # -- specs and chunks ----------------------------------------------------------------

    def register(self, spec: CallSpec) -> int:
        blob = dumps_spec(spec)  # PicklingError names what cannot travel, at call time
        with self._lock:
            spec_id = len(self._specs) + 1
            self._specs[spec_id] = spec
        _private_file(os.path.join(self.run_dir, f"spec-{spec_id}.pkl"), blob)
        return spec_id

    def chunk_size(self, spec_id: int, remaining: int | None) -> int:
        # Fixed per call at its first chunk: about one chunk per array task, since each task
        # costs seconds of scheduling. (Asked again with a smaller `remaining`, a shrinking
        # size would make more, smaller chunks.)
        size = self._sizes.get(spec_id)
        if size is None:
            if remaining is None:
                size = UNKNOWN_LENGTH_CHUNK
            else:
                size = max(1, math.ceil(remaining / self._workers))
            self._sizes[spec_id] = size
        return size

    def submit(self, spec_id: int, items: list[Any], start: int, exclusive: bool = False) -> int:
        resources = None
        if len(items) == 1 and self._held:
            held = self._held.get(id(items[0]))
            if held is not None and held[0] is items[0]:
                resources = held[1]
        return self._submit(spec_id, items, start, resources)

    def hold_resources(self, item: Any, resources: Mapping[str, Any]) -> None:
        """Run ``item`` (an Executor task), whenever it is submitted, as a job of its own with
        these ``sbatch`` options (``{"cpus_per_task": 32, "mem": "64GB"}``)."""
        options = sbatch_options(resources, what="resources")
        with self._lock:
            self._held[id(item)] = (item, (dict(resources), options, id(item)))

    def _submit(self, spec_id: int, items: Any, start: int, resources: Any) -> int:
        if len(items) == 1 and resources is None:
            known = self._split.pop((spec_id, start), None)
            if known is not None:
                return self._answer(known)
        payload = dumps_items(items, start)
        with self._lock:
            if self._closed:
                raise ShoalError("this Slurm session is closed")
            seq = self._next_seq
            self._next_seq += 1
            chunk = _Chunk(seq, spec_id, start, len(items), payload, resources)
            self._chunks[seq] = chunk
            now = time.monotonic()
            if not self._pending:
                self._first_pending = now
            self._last_submit = now
            self._pending.append(chunk)
        return seq

    def _answer(self, known: tuple[str, Any]) -> int:
        """Hand back, without running it again, an item whose outcome a split chunk gave."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            kind, value = known
            if kind == "value":
                res = ChunkResult(seq, [value])
            elif kind == "error":
                res = ChunkResult(seq, [None], [value])
            else:
                res = ChunkResult(seq, [], crash=value)
            self._deliver(res)
        return seq

    # -- submitting array jobs -------------------------------------------------------------

    def _flush(self, force: bool = False) -> None:
        """Send held chunks: those with ``resources=`` alone, the rest as one array job."""
        with self._lock:
            if not self._pending or self._closed:
                return
            now = time.monotonic()
            quiet = now - self._last_submit >= self._backend.batch_window
            old = now - self._first_pending >= 10 * self._backend.batch_window
            if not (force or quiet or old):
                return
            pending, self._pending = self._pending, []
        plain = [c for c in pending if c.resources is None]
        if plain:
            self._submit_array(plain, None)
        for chunk in pending:
            if chunk.resources is not None:
                self._submit_array([chunk], chunk.resources)

    def _submit_array(self, chunks: list[_Chunk], resources: Any) -> None:
        with self._lock:
            self._batches += 1
            batch_dir = private_dir(os.path.join(self.run_dir, f"b{self._batches}"), fresh=True)
        n_tasks = min(len(chunks), self._workers)
        groups: list[list[_Chunk]] = [
            chunks[i * len(chunks) // n_tasks : (i + 1) * len(chunks) // n_tasks]
            for i in range(n_tasks)
        ]
        for index, group in enumerate(groups):
            data = pickle.dumps([(c.seq, c.spec_id, c.payload) for c in group], protocol=5)
            _private_file(os.path.join(batch_dir, f"t{index}.in"), data)
        options = self._backend.options(resources[0] if resources else None)
        if not any(o.startswith("--time=") for o in options) and self._limits.timeout:
            # Enough for the largest task if every item ran to its timeout, plus a margin.
            cpus = int((resources[0] if resources else {}).get("cpus_per_task") or 0) or (
                self._backend.cpus_per_task or 1
            )
            items = max(sum(c.n for c in g) for g in groups)
            seconds = math.ceil(items / cpus) * self._limits.timeout + TIME_MARGIN
            options.append(f"--time={format_time(math.ceil(seconds))}")
        options += [
            f"--array=0-{n_tasks - 1}%{self._workers}",
            f"--job-name={self.job_name}",
            f"--output={batch_dir}/t%a.out",
            f"--error={batch_dir}/t%a.err",
            *self._backend.sbatch_args,
        ]
        env = {**os.environ, "SHOAL_SYS_PATH": os.pathsep.join(p for p in sys.path if p)}
        with sigint_deferred():
            job_id = sbatch(options, [self._script, batch_dir], env)
            with self._lock:
                self._jobs.append(job_id)
                for index, group in enumerate(groups):
                    task = _Task(job_id, index, batch_dir, [c.seq for c in group])
                    self._tasks.append(task)
                    for c in group:
                        self._task_of[c.seq] = task
                        c.payload = b""  # on disk now
                closed = self._closed
        if closed:  # closed (Ctrl-C in another thread) while sbatch ran
            scancel([str(job_id)])

    # -- results -----------------------------------------------------------------------------

    def _deliver(self, res: ChunkResult) -> None:
        if res.errors or res.crash is not None:
            self._failed = True
        if not self._ordered:
            self._ready.append(res)
            return
        self._parked[res.seq] = res
        while self._next_out in self._parked:
            self._ready.append(self._parked.pop(self._next_out))
            self._next_out += 1

    def _finish(self, seq: int, res: ChunkResult) -> None:
        chunk = self._chunks.pop(seq, None)
        self._task_of.pop(seq, None)
        if chunk is None:
            return
        if chunk.resources is not None and not res.errors and res.crash is None:
            # Done for good (a failed one may be retried, with the same resources).
            self._held.pop(chunk.resources[2], None)
        if seq in self._cancelled:
            self._cancelled.discard(seq)
            if self._ordered:
                self._deliver(ChunkResult(seq, []))  # a gap the ordering must not wait for
            return
        self._deliver(res)

    def _read(self, task: _Task, seq: int, path: str) -> None:
        try:
            with open(path, "rb") as f:
                meta, outcome = unpack_result(f.read())
            values, errors = decode_outcome(outcome)
        except Exception as exc:
            lost = PicklingError(f"a result could not be read back from {path}: {exc!r}")
            self._finish(seq, ChunkResult(seq, [None], [ItemError(0, lost, "", "")]))
            return
        note = f"shoal: ran in Slurm array task {task.name}; its output is in {task.logs()}"
        for err in errors:
            err.exc.add_note(note)
        chunk = self._chunks.get(seq)
        crashes = {
            off: SlurmCrash(exit, kind, note=task.logs(), limit=limit, rss=rss, pid=pid)
            for off, pid, exit, kind, limit, rss in meta["crashes"]
        }
        if not crashes or chunk is None:
            self._finish(seq, ChunkResult(seq, values, errors, elapsed_ns=meta["elapsed"]))
            return
        if chunk.n > 1:
            # The driver re-runs a crashed chunk item by item to find the culprit; this task
            # already did, so remember each item's outcome and answer those re-runs at once.
            by_offset = {e.offset: e for e in errors}
            for off in range(len(values)):
                key = (chunk.spec_id, chunk.start + off)
                if off in crashes:
                    self._split[key] = ("crash", crashes[off])
                elif off in by_offset:
                    e = by_offset[off]
                    self._split[key] = ("error", ItemError(0, e.exc, e.traceback, e.arguments))
                else:
                    self._split[key] = ("value", values[off])
        first = crashes[min(crashes)]
        self._finish(seq, ChunkResult(seq, [], crash=first))

    def _poll_files(self) -> None:
        listings: dict[str, set[str]] = {}
        for seq, task in list(self._task_of.items()):
            names = listings.get(task.batch_dir)
            if names is None:
                try:
                    names = listings[task.batch_dir] = set(os.listdir(task.batch_dir))
                except OSError:
                    names = listings[task.batch_dir] = set()
            if f"c{seq}.out" in names:
                self._read(task, seq, os.path.join(task.batch_dir, f"c{seq}.out"))

    def _poll_queue(self) -> None:
        """Find tasks that left the queue without writing all their results."""
        waiting = {task.name: task for task in self._task_of.values()}
        if not waiting:
            return
        try:
            alive = squeue_alive(self.job_name)
        except SlurmError:
            # A busy or restarting controller: keep waiting, but not forever.
            now = time.monotonic()
            if self._queue_down_since is None:
                self._queue_down_since = now
            if now - self._queue_down_since > QUEUE_PATIENCE:
                raise
            return
        self._queue_down_since = None
        gone = [t for t in waiting.values() if (t.job_id, t.index) not in alive]
        if not gone:
            return
        self._poll_files()  # a task may have written its last result and left since
        records: dict[int, dict[int, dict[str, str]]] = {}
        memory = memory_bytes(self._backend.mem)
        for task in gone:
            missing = [s for s in task.seqs if s in self._task_of]
            if not missing:
                continue
            if task.job_id not in records:
                records[task.job_id] = job_records(task.job_id)
            record = records[task.job_id].get(task.index)
            crash = crash_of(record, f"Slurm array task {task.name}", task.logs(), memory)
            if crash is None:  # COMPLETED: its files may still be on their way (NFS)
                now = time.monotonic()
                if task.ended_at is None:
                    task.ended_at = now
                if now - task.ended_at < RESULT_GRACE:
                    continue
                crash = SlurmCrash(
                    f"Slurm array task {task.name} completed without writing results for "
                    f"{len(missing)} chunk(s)",
                    "crashed",
                    note=task.logs(),
                )
            for seq in missing:
                self._finish(seq, ChunkResult(seq, [], crash=crash))

    def wait(self, timeout: float | None) -> list[ChunkResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self._backend.poll_interval
        while True:
            self._flush()
            with self._lock:
                self._poll_files()
                now = time.monotonic()
                if not self._ready and now - self._last_poll >= self._backend.queue_interval:
                    self._last_poll = now
                    self._poll_queue()
                if self._ready or self._woken or self._closed:
                    self._woken = False
                    out, self._ready = self._ready, []
                    return out
            left = interval if deadline is None else min(interval, deadline - time.monotonic())
            if left <= 0:
                return []
            time.sleep(left)  # short sleeps: Ctrl-C stays responsive

    def wake(self) -> None:
        self._woken = True

    def cancel(self, seqs: list[int] | None = None) -> list[int]:
        # A chunk already handed to Slurm cannot be told queued from running without asking
        # Slurm: every chosen chunk is dropped (its task's result, if any, is ignored).
        with self._lock:
            targets = set(self._chunks) if seqs is None else set(seqs) & set(self._chunks)
            self._pending = [c for c in self._pending if c.seq not in targets]
            for seq in targets:
                if seq not in self._task_of:  # never sent
                    self._chunks.pop(seq, None)
                    if self._ordered:
                        self._deliver(ChunkResult(seq, []))  # a gap ordering must not wait for
                else:
                    self._cancelled.add(seq)
            # A task all of whose unfinished chunks are cancelled has nothing left to do.
            idle = {
                t.name
                for t in self._tasks
                if any(s in self._task_of for s in t.seqs)
                and all(s in self._cancelled for s in t.seqs if s in self._task_of)
            }
        if idle:
            scancel(sorted(idle))
        return sorted(targets)

    def close(self, *, abort: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = bool(self._task_of) or bool(self._pending)
            jobs = bool(self._jobs)
            failed = self._failed
        if busy and jobs:
            scancel(name=self.job_name)
        self._pool._sessions.discard(self)
        self._clean(keep_logs=failed)

    def _clean(self, keep_logs: bool) -> None:
        """Delete the call's pickles; keep the task logs only if something failed."""
        if self._backend.keep_files:
            return
        if not keep_logs:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for folder, _, files in os.walk(self.run_dir):
            for name in files:
                is_log = name.startswith("t") and name.endswith((".out", ".err"))
                if not is_log:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
