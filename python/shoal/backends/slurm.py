"""The slurm backend: a call becomes one ``sbatch --array`` job, submitted from a login node.

::

    slurm = shoal.get_backend("slurm", partition="compute", time="02:00:00", cpus_per_task=4,
                              mem="8GB", setup=["module load foo"], workers=100)
    results = shoal.map(simulate, params, backend=slurm)

How a call runs:

- The driver sizes chunks so that a call of N items makes at most ``workers`` chunks (Slurm
  starts a task in about a second at best, so chunks must be large), pickles each chunk at
  ``submit`` and holds them for a short window; then all chunks held go out as *one* array job,
  at most ``workers`` array tasks, throttled with ``%workers``.
- Everything travels as files in a private run directory (``run_dir``, default
  ``./.shoal/slurm/<run>``, mode 0700) that must be visible from the compute nodes: the spec
  (function, fixed arguments, ``shared=``) once per call, one input file per array task, one
  result file per chunk, and each task's stdout and stderr.
- An array task runs ``python -m shoal.backends._slurm_task``, which runs its chunks on a few of
  shoal's own worker processes (one per CPU of the task), so a crashing item fails alone and
  ``timeout=`` kills only the item past its limit.
- The driver polls the run directory for results and ``squeue``/``scontrol`` for tasks that
  ended without writing theirs: it needs no open port and no daemon. A task that Slurm ended
  (``FAILED``, a signal, ``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``) fails exactly the chunks it
  had not finished, as :class:`~shoal.WorkerCrashedError`, :class:`~shoal.TaskTimeoutError` or
  :class:`~shoal.WorkerMemoryError`; the driver re-runs a failed chunk item by item, and
  ``retries=`` runs a failed item again.
- Ctrl-C (or any early end of the call) cancels the call's jobs with ``scancel``.
"""

from __future__ import annotations

import os
import shlex
import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from .._options import check_max_tasks
from .._spec import Limits
from ._base import Backend, Pool
from ._slurm_cli import SlurmError, check_commands, memory_bytes, parse_time, sbatch_options
from ._slurm_session import SlurmSession

__all__ = ["SlurmBackend", "SlurmError", "SlurmPool", "SlurmSession"]


class SlurmPool(Pool):
    """A Slurm "pool": ``workers`` array tasks at once. It holds no process of its own."""

    #: ``Executor.submit(..., resources={...})`` is passed to the session (sbatch options).
    takes_resources = True

    def __init__(self, backend: SlurmBackend, workers: int) -> None:
        self.backend = backend
        self.workers = workers
        self._sessions: weakref.WeakSet[SlurmSession] = weakref.WeakSet()

    def open_session(self, *, ordered: bool, limits: Limits | None = None) -> SlurmSession:
        if limits is not None:
            for name in ("max_load", "max_memory"):
                if getattr(limits, name) is not None:
                    raise ValueError(
                        f"the slurm backend cannot honour {name}=: Slurm decides where and when "
                        f"array tasks start; ask for resources with cpus_per_task=, mem= and "
                        f"workers= instead"
                    )
        check_commands()
        return SlurmSession(self, ordered=ordered, limits=limits)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        for session in list(self._sessions):
            session.close(abort=True)


class SlurmBackend(Backend):
    """Run calls as Slurm job arrays (see the module docs and ``docs/clusters.md``).

    Parameters
    ----------
    workers : int, float or None
        Array tasks at once (``--array=...%workers``), and the number of chunks a call is cut
        into. Default: the usable CPUs of this machine, which on a login node says little: give
        it.
    partition, account, qos : str or None
        ``--partition``, ``--account``, ``--qos``.
    time : str, int or None
        ``--time`` of each array task: seconds, or Slurm's ``"HH:MM:SS"`` / ``"D-HH:MM:SS"``.
        If not given and a call has ``timeout=``, it is derived from the timeout with a margin.
    cpus_per_task : int or None
        ``--cpus-per-task``; an array task runs that many items at once.
    mem : str, int or None
        ``--mem`` per array task: bytes, or a size like ``"8GB"``.
    gpus : int or None
        ``--gpus`` per array task (0 or ``None``: none).
    setup : list of str
        Shell lines run in each task before Python starts (``"module load foo"``,
        ``"source venv/bin/activate"``).
    sbatch_args : list of str
        Extra ``sbatch`` arguments, passed as they are.
    run_dir : str or None
        Where calls keep their files; it must be on a filesystem the compute nodes see.
        Default: ``./.shoal/slurm`` under the current directory.
    python : str or None
        Interpreter of the array tasks (default: this one, :data:`sys.executable`).
    threads_per_worker : int or None
        Threads for BLAS/OpenMP in each of a task's worker processes.
    keep_files : bool
        Keep every file of a call (pickles included) instead of only the logs of failed calls.
    poll_interval, queue_interval, batch_window : float
        Seconds between looks at the run directory, between ``squeue`` calls, and of quiet
        after the last chunk before held chunks are submitted as one array job.
    """

    name = "slurm"

    def __init__(
        self,
        workers: int | float | None = None,
        *,
        partition: str | None = None,
        time: str | int | None = None,
        cpus_per_task: int | None = None,
        mem: str | int | None = None,
        gpus: int | None = None,
        account: str | None = None,
        qos: str | None = None,
        setup: Sequence[str] = (),
        sbatch_args: Sequence[str] = (),
        run_dir: str | os.PathLike[str] | None = None,
        python: str | None = None,
        threads_per_worker: int | None = None,
        keep_files: bool = False,
        poll_interval: float = 0.05,
        queue_interval: float = 0.5,
        batch_window: float = 0.03,
    ) -> None:
        super().__init__(workers)
        for name, value in (("partition", partition), ("account", account), ("qos", qos)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TypeError(f"{name} must be a non-empty string, not {value!r}")
        self.partition, self.account, self.qos = partition, account, qos
        if time is not None:
            parse_time(time)
        self.time = time
        self.cpus_per_task = check_max_tasks(cpus_per_task, "cpus_per_task")
        memory_bytes(mem)
        self.mem = mem
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
            raise ValueError(f"gpus must be a count >= 0, got {gpus!r}")
        self.gpus = gpus
        self.setup = _strings(setup, "setup")
        self.sbatch_args = _strings(sbatch_args, "sbatch_args")
        self.run_dir = (
            None if run_dir is None else os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
        )
        self.python = python or sys.executable
        self.threads_per_worker = check_max_tasks(threads_per_worker, "threads_per_worker")
        self.keep_files = bool(keep_files)
        for what, seconds in (
            ("poll_interval", poll_interval),
            ("queue_interval", queue_interval),
            ("batch_window", batch_window),
        ):
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {seconds!r}")
        self.poll_interval = float(poll_interval)
        self.queue_interval = float(queue_interval)
        self.batch_window = float(batch_window)
        # Fails now, not at the first call, on a bad value.
        self.options()

    def options(self, resources: Mapping[str, Any] | None = None) -> list[str]:
        """``sbatch`` options of an array task; ``resources`` override the backend's."""
        base: dict[str, Any] = {
            "partition": self.partition,
            "time": self.time,
            "cpus_per_task": self.cpus_per_task,
            "mem": self.mem,
            "gpus": self.gpus or None,
            "account": self.account,
            "qos": self.qos,
        }
        if resources:
            base.update(resources)
        return sbatch_options(base, what="slurm backend options")

    def script(self) -> str:
        """The batch script of every array task (its argument is the batch directory)."""
        lines = ["#!/bin/bash", "# Written by shoal: runs one array task's chunks.", "set -e"]
        lines += list(self.setup)
        lines.append(f'exec {shlex.quote(self.python)} -m shoal.backends._slurm_task "$1"')
        return "\n".join(lines) + "\n"

    def create_pool(self, workers: int, **options: Any) -> SlurmPool:
        self.check_pool_options(options)
        return SlurmPool(self, workers)


def _strings(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, not {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of strings, got {value!r}")
    return list(value)
