"""``mpiexec -n N python -m shoal.mpi script.py [args...]``: shoal's launch mode.

Rank 0 runs ``script.py`` as ``__main__`` with ``sys.argv = ["script.py", args...]`` and the
``mpi`` backend as the default; every other rank serves its tasks (:mod:`shoal.mpi._relay`) and
never imports the script. ``-m module`` works in place of a script path. The job's exit status
is rank 0's, and an unhandled exception prints one traceback, from rank 0.

``python -m shoal.mpi --serve PID HOST`` is what spawn mode starts on each spawned rank.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any, NoReturn

USAGE = "usage: mpiexec -n N python -m shoal.mpi (script.py | -m module) [args...]"


#: Seconds MPI_Finalize may take at exit before the process leaves without it.
FINALIZE_GRACE = 5.0


def _exit_after_finalize(code: int) -> NoReturn:
    """Exit normally (mpi4py finalises MPI at exit), but never hang there: a peer that is gone
    or a message still in flight must not keep this rank alive."""
    from mpi4py import MPI

    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(FINALIZE_GRACE, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
    # Finalised here, while the timer can still run (at interpreter exit it could not).
    if not MPI.Is_finalized():
        MPI.Finalize()
    sys.exit(code)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_script_error() -> None:
    """The traceback of the exception being handled, without this module's and runpy's frames."""
    exc = sys.exc_info()[1]
    assert exc is not None
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
        or tb.tb_frame.f_code.co_filename.endswith("runpy.py")
    ):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _run_main(argv: list[str]) -> int:
    """Run the script or module as ``__main__``; return the exit status."""
    sys.argv = list(argv)
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _print_script_error()
        return 130
    except BaseException:
        _print_script_error()
        return 1
    return 0


def _bad_arguments(argv: list[str]) -> str | None:
    if not argv or argv[0] in ("-h", "--help"):
        return USAGE
    if argv[0] == "-m":
        return None if len(argv) > 1 else f"shoal.mpi: -m needs a module name\n{USAGE}"
    if not os.path.isfile(argv[0]):
        return f"shoal.mpi: cannot open script {argv[0]!r}: no such file\n{USAGE}"
    return None


def _serve_spawned(argv: list[str]) -> None:
    from . import require_mpi
    from ._relay import run_relay

    mpi = require_mpi()
    parent = mpi.Comm.Get_parent()
    parent_pid, parent_host = int(argv[0]), argv[1]
    from . import hostname

    if parent_host == hostname():
        # The parent is a plain python, not mpiexec: if it is killed nobody tells us.
        def watch() -> None:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    run_relay(parent, 0, parent.Get_rank(), 1)
    parent.Disconnect()
    _exit_after_finalize(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        _serve_spawned(argv[1:])
        return
    from . import MPIUnavailableError, require_mpi

    try:
        mpi = require_mpi()
    except MPIUnavailableError as exc:
        print(f"shoal.mpi: {exc}", file=sys.stderr)
        sys.exit(1)
    world = mpi.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    problem = _bad_arguments(argv)
    if problem is not None:
        if rank == 0:
            print(problem, file=sys.stderr)
        sys.exit(2)
    if size == 1:
        warnings.warn(
            "shoal.mpi: the job has a single MPI rank, so nothing serves tasks: falling back to "
            "local worker processes (start it with mpiexec -n N, N > 1, to use MPI ranks)",
            RuntimeWarning,
            stacklevel=1,
        )
        sys.exit(_run_main(argv))
    control = world.Dup()  # shoal's messages never mix with the script's own MPI traffic
    if rank != 0:
        _serve(mpi, control, rank)
    try:
        _workers_per_relay(mpi, control, rank)
        link = _open_link(control, size)
    except BaseException as exc:
        _setup_failed(control, size, exc)
    _lead(link, argv)


def _serve(mpi: Any, control: Any, rank: int) -> NoReturn:
    """A serving rank, to the end of the job; it never returns."""
    from ._relay import run_relay

    try:
        workers = _workers_per_relay(mpi, control, rank)
    except BaseException as exc:
        # Leaving without MPI_Finalize and with a failure status makes the MPI runtime end
        # every rank (rank 0 included) rather than leave them waiting for this one.
        print(f"shoal.mpi: rank {rank} could not start serving: {exc!r}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    run_relay(control, 0, rank, workers)
    control.Free()
    _exit_after_finalize(0)


def _setup_failed(control: Any, size: int, exc: BaseException) -> NoReturn:
    """Rank 0 could not set up the link to the serving ranks: end the job with its error.

    Leaving normally would hang: MPI_Finalize at exit waits for ranks that wait for rank 0.
    Every serving rank that already waits for rank 0's messages is told to stop; the MPI
    runtime ends any other (say, one still in a setup collective) when rank 0 leaves without
    finalising and with a failure status.
    """
    from ._wire import TAG_CONTROL, Outbox

    code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):
        code = exc.code
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    print("shoal.mpi: rank 0 could not set up its link to the serving ranks", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(BaseException):
        outbox = Outbox()
        for rank in range(1, size):
            outbox.send(control, ("stop",), rank, TAG_CONTROL)
        outbox.drain(0.5)
    os._exit(code or 1)


def _workers_per_relay(mpi: Any, control: Any, rank: int) -> int:
    """Worker processes for this rank if it serves: its CPUs, shared with the other serving
    ranks of its node whose CPU sets overlap its own.

    With ``--bind-to core`` each rank has its CPU (one worker each); with one rank per node and
    ``--bind-to none``, one relay gets the whole node; unbound ranks sharing a node split it
    instead of each starting a worker per CPU of the node.
    """
    from .._options import cpu_count

    node = control.Split_type(mpi.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = []
    everyone = node.allgather((rank, mine))
    node.Free()
    if rank == 0 or not mine:
        return cpu_count()
    overlapping = [r for r, cpus in everyone if r != 0 and set(cpus) & set(mine)]
    return max(1, cpu_count() // max(1, len(overlapping)))


def _open_link(control: Any, size: int) -> Any:
    """Rank 0's link to the serving ranks, made the default backend's."""
    from .. import mpi
    from ..backends import set_backend
    from ..backends.mpi import MpiBackend, _Link

    link = _Link(control, list(range(1, size)))
    mpi._launch = link
    set_backend(MpiBackend())
    return link


def _lead(link: Any, argv: list[str]) -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # Open MPI's mpiexec turns Ctrl-C into SIGTERM for the ranks: rank 0 sees it as the
        # KeyboardInterrupt a local run would get.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    code = _run_main(argv)
    link.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        _exit_after_finalize(0)
    # After a failure or Ctrl-C the other ranks may already be gone: finalising MPI could wait
    # for them, so leave without it.
    os._exit(code)


if __name__ == "__main__":
    main()
