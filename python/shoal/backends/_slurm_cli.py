"""Slurm's client commands, as the slurm backend uses them: ``sbatch``, ``squeue``,
``scontrol`` and ``scancel``, plus the translation of ``sbatch`` options and of job states.

Nothing here keeps state; :mod:`shoal.backends.slurm` drives it. ``sacct`` is not used: it needs
Slurm's accounting daemon, which many small clusters (and the test bed) do not run, while
``squeue`` and ``scontrol show job`` always answer (``scontrol`` keeps a finished job's record
for ``MinJobAge``, 300 s by default).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .._errors import ShoalError
from .._options import parse_memory
from .._spec import Crash

COMMANDS = ("sbatch", "squeue", "scontrol", "scancel")
#: Seconds a client command may take before it counts as failed (a busy controller is slow).
COMMAND_TIMEOUT = 60.0


class SlurmError(ShoalError):
    """A Slurm command failed or is missing (the message has its output)."""


def check_commands() -> None:
    """Raise :class:`SlurmError` unless Slurm's client commands are on ``PATH``."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmError(
            f"the slurm backend needs Slurm's client commands on PATH, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Run shoal where you would run "
            f"sbatch (a login node), or install Slurm's client (Debian: slurm-client)."
        )


def _run(args: list[str], *, env: Mapping[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            env=dict(env) if env is not None else None,
            # Its own session: a Ctrl-C at the terminal reaches shoal, not the command, so an
            # sbatch is never cut off between submitting and printing the job id.
            start_new_session=True,
        )
    except FileNotFoundError:
        check_commands()
        raise
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{args[0]} did not answer within {COMMAND_TIMEOUT:g} s") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise SlurmError(f"{' '.join(args[:1])} failed (exit {done.returncode}): {message}")
    return done.stdout


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block ends.

    Around ``sbatch``: the job id must be recorded before KeyboardInterrupt unwinds, or the job
    could not be cancelled by id. Only the main thread receives SIGINT in Python; elsewhere this
    does nothing (and the session's unique job name still finds the job).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def sbatch(options: Sequence[str], script: Sequence[str], env: Mapping[str, str]) -> int:
    """Submit ``script`` (its path, then its arguments) with ``options``; return the job id."""
    out = _run(["sbatch", "--parsable", *options, *script], env=env)
    text = out.strip().split(";")[0]
    try:
        return int(text)
    except ValueError:
        raise SlurmError(f"sbatch printed no job id: {out!r}") from None


def squeue_alive(job_name: str) -> dict[tuple[int, int], str]:
    """``{(array job id, task id): state}`` of every task of ``job_name`` still in the queue."""
    out = _run(["squeue", "--noheader", "--array", f"--name={job_name}", "--format=%i %T"])
    alive: dict[tuple[int, int], str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        ident, state = parts
        job, _, task = ident.partition("_")
        if task.isdigit() and job.isdigit():
            alive[int(job), int(task)] = state
        elif task.startswith("[") and job.isdigit():
            # A pending range not expanded (older squeue): "12_[3-7%2]".
            for t in _expand_range(task.strip("[]").split("%")[0]):
                alive[int(job), t] = state
    return alive


def _expand_range(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def job_records(job_id: int) -> dict[int, dict[str, str]]:
    """``{task id: record}`` from ``scontrol show job`` for the tasks of array job ``job_id``.

    Pending tasks shown as a range get one entry each. Finished records are kept by the
    controller for ``MinJobAge`` seconds; after that the job is unknown and this returns ``{}``.
    """
    try:
        out = _run(["scontrol", "--oneliner", "show", "job", str(job_id)])
    except SlurmError as exc:
        if "Invalid job id" in str(exc):
            return sacct_records(job_id)
        raise
    records: dict[int, dict[str, str]] = {}
    for line in out.splitlines():
        fields = dict(
            (key, value) for key, _, value in (f.partition("=") for f in line.split()) if key
        )
        task = fields.get("ArrayTaskId", "")
        tasks = [int(task)] if task.isdigit() else _expand_range(task.split("%")[0])
        for t in tasks:
            records[t] = fields
    return records


def sacct_records(job_id: int) -> dict[int, dict[str, str]]:
    """Like :func:`job_records`, from ``sacct``, for a job the controller has forgotten.

    Only where Slurm keeps accounting (slurmdbd); elsewhere ``{}``.
    """
    if shutil.which("sacct") is None:
        return {}
    try:
        out = _run(
            [
                "sacct",
                "--noheader",
                "--parsable2",
                "--jobs",
                str(job_id),
                "--format=JobID,State,ExitCode",
            ]
        )
    except (SlurmError, OSError):
        return {}
    records: dict[int, dict[str, str]] = {}
    for line in out.splitlines():
        ident, _, rest = line.partition("|")
        state, _, exit_code = rest.partition("|")
        job, _, task = ident.partition("_")
        if job == str(job_id) and task.isdigit():
            # sacct writes "CANCELLED by 0"; scontrol's JobState is the first word.
            records[int(task)] = {
                "JobState": state.split()[0] if state else "",
                "ExitCode": exit_code,
            }
    return records


def scancel(job_ids: Sequence[str] = (), *, name: str | None = None) -> None:
    """Cancel jobs (``"12"`` or ``"12_3"``) and/or every job named ``name``; errors ignored."""
    args = ["scancel", *job_ids]
    if name is not None:
        args.append(f"--name={name}")
    if len(args) == 1:
        return
    with contextlib.suppress(SlurmError, OSError):
        _run(args)


# -- job states ---------------------------------------------------------------------------------

#: States in which a task is over (squeue no longer lists it).
_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}


def _exit_text(exit_code: str) -> str:
    code, _, sig = exit_code.partition(":")
    if sig.isdigit() and int(sig):
        name = _SIGNAL_NAMES.get(int(sig), f"signal {sig}")
        return f"killed by signal {sig} ({name})"
    if code.isdigit():
        return f"exit status {code}"
    return f"exit code {exit_code or '?'}"


def crash_of(
    record: Mapping[str, str] | None, where: str, log: str, memory: int | None
) -> Crash | None:
    """The crash that a finished array task's record means for the chunks it did not finish.

    ``None`` for a task that completed normally (its results should be on disk). ``where`` names
    the task (``"array task 12_3"``); ``log`` is its stderr file, named in the error.
    """
    if record is None:
        return SlurmCrash(
            f"{where} left the queue without writing results, and Slurm no longer knows it",
            "crashed",
            note=log,
        )
    state = record.get("JobState", "UNKNOWN")
    if state == "COMPLETED":
        return None
    reason = record.get("Reason", "None")
    exit_text = _exit_text(record.get("ExitCode", ""))
    detail = f"{where} ended {state} ({exit_text}"
    detail += ")" if reason in ("None", "") else f", reason {reason})"
    if state in ("TIMEOUT", "DEADLINE"):
        return SlurmCrash(detail, "timed_out", note=log, limit=time_limit_seconds(record))
    if state == "OUT_OF_MEMORY":
        limit = memory or 0
        return SlurmCrash(detail, "memory", note=log, limit=limit, rss=limit)
    return SlurmCrash(detail, "crashed", note=log)


class SlurmCrash(Crash):
    """A :class:`~shoal._spec.Crash` that also says where the task's output is (``note``)."""

    __slots__ = ("note",)

    def __init__(
        self,
        exit: str,
        kind: str,
        *,
        note: str,
        limit: float = 0.0,
        rss: int = 0,
        pid: int | None = None,
    ) -> None:
        super().__init__(pid, exit, kind, limit=limit, rss=rss)
        self.note = f"shoal: the Slurm task's stdout and stderr are in {note}" if note else ""


def time_limit_seconds(record: Mapping[str, str]) -> float:
    """``TimeLimit`` (``[D-]HH:MM:SS``) in seconds; 0 if unknown."""
    text = record.get("TimeLimit", "")
    try:
        return float(parse_time(text))
    except ValueError:
        return 0.0


_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(?:(\d+):)?(\d+)$")


def parse_time(value: Any) -> int:
    """Seconds from seconds (a number) or Slurm's ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM]``."""
    if isinstance(value, bool):
        raise TypeError("time must be seconds or a Slurm time string like '02:00:00', not a bool")
    if isinstance(value, (int, float)):
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"time must be positive seconds, got {value!r}")
        return math.ceil(value)
    if not isinstance(value, str):
        raise TypeError(f"time must be seconds or a string like '02:00:00', not {value!r}")
    text = value.strip()
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"time: cannot read {value!r} (use seconds, or 'HH:MM:SS', 'D-HH:MM:SS')")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:
        # D-HH, D-HH:MM, D-HH:MM:SS
        parts = [p for p in (a, b, c) if p is not None]
        hours, minutes, seconds = [*parts, 0, 0][:3] if len(parts) > 1 else (parts[0], 0, 0)
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    parts = [p for p in (a, b, c) if p is not None]
    if len(parts) == 1:  # Slurm reads a bare number as minutes
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def format_time(seconds: int) -> str:
    """Slurm's ``D-HH:MM:SS`` for ``seconds``, rounded up to whole minutes (Slurm's unit)."""
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes * 60, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:00"
    return f"{days}-{text}" if days else text


_OPTION = re.compile(r"^[a-z][a-z0-9_]*$")
#: Options shoal sets itself for each array job; a user value would break the protocol.
_RESERVED = {"array", "output", "error", "job_name", "parsable", "wrap", "export", "chdir"}


def sbatch_options(options: Mapping[str, Any], *, what: str) -> list[str]:
    """``["--cpus-per-task=4", ...]`` from ``{"cpus_per_task": 4}`` (long options, underscores).

    ``None`` and ``False`` leave an option out; ``True`` gives a bare flag (``exclusive``);
    ``time`` takes seconds or Slurm's syntax; ``mem`` takes ``"8GB"``-style sizes.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"{what} must be a dict of sbatch options, not {type(options).__name__}")
    out = []
    for key, value in options.items():
        if not isinstance(key, str) or not _OPTION.match(key):
            raise ValueError(
                f"{what}: {key!r} is not an sbatch long option spelled with underscores "
                f"(e.g. 'cpus_per_task', 'mem', 'time', 'partition')"
            )
        if key in _RESERVED:
            raise ValueError(f"{what}: shoal sets --{key.replace('_', '-')} itself")
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif key == "time":
            out.append(f"{flag}={format_time(parse_time(value))}")
        elif key in ("mem", "mem_per_cpu", "mem_per_gpu"):
            out.append(f"{flag}={format_memory(value, key)}")
        elif isinstance(value, (str, int, float)):
            text = str(value)
            if not text or "\n" in text:
                raise ValueError(f"{what}: bad value {value!r} for {key}")
            out.append(f"{flag}={text}")
        else:
            raise TypeError(f"{what}: {key} must be a string or a number, not {value!r}")
    return out


def format_memory(value: Any, name: str = "mem") -> str:
    """Slurm's size syntax (whole MiB, ``"8192M"``) from bytes or ``"8GB"``-style strings.

    A bare number in Slurm means MiB; here, as everywhere in shoal, a bare number is bytes.
    """
    size = parse_memory(value, name)
    assert size is not None
    return f"{max(1, math.ceil(size / 2**20))}M"


def memory_bytes(value: Any) -> int | None:
    """Bytes of a ``mem=`` option (for :class:`~shoal.WorkerMemoryError`); ``None`` if unset."""
    return None if value is None else parse_memory(value, "mem")


def private_dir(path: str, *, fresh: bool = False) -> str:
    """Create ``path`` (and missing parents) with mode 0700; return it absolute.

    ``fresh``: it must not exist yet (a call's own directory), and is made readable by its owner
    only whatever the umask. An existing parent is left as it is.
    """
    path = os.path.abspath(path)
    if fresh:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir obeys the umask
    elif not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path
