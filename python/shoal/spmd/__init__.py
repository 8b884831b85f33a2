"""SPMD: one function on N ranks at once, with collectives; the same code on a laptop and under
``mpiexec``.

>>> def step(data, scale):
...     comm = shoal.spmd.comm()
...     part = comm.scatter(np.array_split(data, comm.size) if comm.is_main else None)
...     return comm.allreduce(float(part.sum()) * scale)
>>> shoal.spmd.run(step, data, 2.0, ranks=4)  # one return value per rank, by rank

Backends: ``processes`` (ranks are local worker processes run by shoal's engine) and ``mpi``
(the ranks of the MPI job, with ``MPI.COMM_WORLD``). Inside an MPI job (``mpiexec -n N python
script.py``, with or without ``-m shoal.mpi``) the default is ``mpi``; elsewhere ``processes``.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable
from typing import Any

from ._comm import Comm, SpmdError

__all__ = ["Comm", "SpmdError", "comm", "run"]


def _check_ranks(ranks: Any) -> int | None:
    if ranks is None:
        return None
    if isinstance(ranks, bool) or not isinstance(ranks, numbers.Integral):
        raise TypeError(f"ranks must be a positive int or None, not {type(ranks).__name__}")
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    return int(ranks)


def _in_mpi() -> bool:
    from ..mpi import in_mpi_job, is_launch_mode

    return is_launch_mode() or in_mpi_job()


def run(
    fn: Callable[..., Any],
    *args: Any,
    ranks: int | None = None,
    backend: str | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``ranks`` processes at once; return their return values.

    Parameters
    ----------
    fn : callable
        Called once on every rank; inside it, :func:`comm` gives the rank's communicator.
    *args, **kwargs
        Passed to ``fn`` on every rank.
    ranks : int or None
        How many ranks. ``None``: every usable CPU (processes), or every rank of the MPI job.
        Under MPI it must be ``None`` or the job's size.
    backend : {"processes", "mpi"} or None
        Default: ``"mpi"`` inside an MPI job, ``"processes"`` elsewhere.
    timeout : float or None
        Seconds the whole call may take; past it, :class:`~shoal.TaskTimeoutError`.

    Returns
    -------
    list
        ``fn``'s return value on each rank, indexed by rank (on every rank, under MPI).

    Raises
    ------
    Exception
        The first exception raised by ``fn`` on any rank, with its original type and a note
        naming the rank; the other ranks are stopped, even inside a collective.
    shoal.WorkerCrashedError
        A rank's process died (processes backend; under MPI the job ends, as MPI does).
    shoal.TaskTimeoutError
        ``timeout`` passed.
    """
    from .._options import check_timeout, cpu_count

    if not callable(fn):
        raise TypeError(f"shoal.spmd.run needs a callable, not {type(fn).__name__}")
    size = _check_ranks(ranks)
    limit = check_timeout(timeout)
    if backend is None:
        backend = "mpi" if _in_mpi() else "processes"
    if backend == "processes":
        from . import _local

        return _local.run(fn, args, kwargs, size or cpu_count(), limit)
    if backend == "mpi":
        from . import _mpi

        return _mpi.run(fn, args, kwargs, size, limit)
    raise ValueError(f"shoal.spmd backends are 'processes' and 'mpi', not {backend!r}")


def comm() -> Comm:
    """This rank's communicator: inside :func:`run`, or the world's in an MPI job.

    Raises
    ------
    SpmdError
        Outside :func:`run` and outside an MPI job.
    """
    from . import _local

    if _local.current is not None:
        return _local.current
    if "shoal.spmd._mpi" in sys.modules and sys.modules["shoal.spmd._mpi"].current is not None:
        return sys.modules["shoal.spmd._mpi"].current  # type: ignore[no-any-return]
    if _in_mpi():
        from . import _mpi

        return _mpi.comm()
    raise SpmdError(
        "shoal.spmd.comm() was called outside shoal.spmd.run(...) and outside an MPI job: "
        "call it from the function that shoal.spmd.run runs"
    )
