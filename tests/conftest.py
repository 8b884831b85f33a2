from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from engines import REQUIRED, engine_backend
from shm_watch import TAG_VARIABLE, ShmWatch

#: This run's tag, inherited by every process it starts (see the /dev/shm check below).
_RUN_TAG = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
os.environ[TAG_VARIABLE] = _RUN_TAG

#: Open MPI keeps shared-memory segments in /dev/shm and leaves them behind when its processes
#: are killed, or run as singletons (a tool under test that imports mpi4py): every process of
#: this run puts them in a directory of the run's own instead, removed at the end, so that the
#: /dev/shm check below sees only what shoal itself would leave.
_MPI_SEGMENTS = tempfile.mkdtemp(prefix="shoal-test-mpi-sm-")
os.environ.setdefault("OMPI_MCA_btl_sm_backing_directory", _MPI_SEGMENTS)
# An MPI singleton in this process (a test that imports mpi4py) needs no TCP transport, which
# would listen on every interface (and be inherited by forked workers): shared memory only. MPI
# jobs that the tests start choose their own (tests/mpi_helpers.py).
os.environ.setdefault("OMPI_MCA_btl", "^tcp")

#: Cluster engines run the contract suite too, each on a cluster the tests start themselves.
ENGINES = ["dask", "ray", "slurm"]
#: SHOAL_TEST_BACKENDS=mpi runs the contract suite on the named backends only (tests/test_mpi.py
#: does, under mpiexec in launch mode).
BACKENDS = (
    os.environ["SHOAL_TEST_BACKENDS"].split(",")
    if "SHOAL_TEST_BACKENDS" in os.environ
    else ["processes", "threads", "serial", *ENGINES]
)
#: Engines that run only the contract module: other modules test the processes engine's own
#: features, and on the local Slurm the whole contract suite already takes about a minute.
_CONTRACT_ONLY = {"slurm"}


def slurm_unavailable() -> str | None:
    """Why the local Slurm cannot be used (``None`` if it can)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "Slurm is not installed (sbatch/scontrol not on PATH); run scripts/slurm_up.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if "is UP" not in ping.stdout:
        return f"the Slurm controller is not up ({ping.stdout.strip() or ping.stderr.strip()})"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A slurm backend on the local Slurm (scripts/slurm_up.sh), or a visible skip."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    import shoal

    backend = shoal.get_backend("slurm", workers=2, run_dir=tmp_path_factory.mktemp("slurm"))
    yield backend
    backend.shutdown()


@pytest.fixture(
    params=[pytest.param(b, marks=pytest.mark.engine) if b in ENGINES else b for b in BACKENDS]
)
def backend(request):
    """Every backend runs the same contract tests."""
    if request.param in ENGINES:
        return request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture(scope="session")
def dask_backend():
    """A Dask backend on a LocalCluster of 2 worker processes on 127.0.0.1."""
    yield from engine_backend("dask", workers=2)


@pytest.fixture(scope="session")
def ray_backend():
    """A Ray backend on a local Ray with 2 CPUs on 127.0.0.1."""
    yield from engine_backend("ray", workers=2)


@pytest.fixture(scope="session")
def slurm_backend(slurm):
    return slurm


def pytest_collection_modifyitems(config, items):
    # Some engines run the contract module only (see _CONTRACT_ONLY).
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        contract_only = callspec is not None and callspec.params.get("backend") in _CONTRACT_ONLY
        if contract_only and item.module.__name__ != "test_contract":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SHOAL_REQUIRE_ENGINES=1 (CI), a skipped test marked ``engine`` fails instead."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and REQUIRED
        and item.get_closest_marker("engine") is not None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"engine test skipped with SHOAL_REQUIRE_ENGINES=1: {reason}"


@pytest.fixture(autouse=True)
def _no_leaked_default(monkeypatch):
    yield


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def mpi_leftovers():
    """Open MPI's shared-memory segments of the jobs a module kills on purpose (rank 0
    SIGKILLed, Ctrl-C on mpiexec, a rank that dies) are never unlinked: nobody is left to do it.
    Remove those, and only those, so that the session check below still sees anything else."""
    before = _dev_shm()
    yield
    for name in _dev_shm() - before:
        if name.startswith("sm_segment."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left_behind():
    """After the whole run (crashes, kills and Ctrl-C tests included), this run's processes
    have left nothing in /dev/shm: shoal's segments are memfds, freed with their last holder.
    Files that other processes of the machine make meanwhile do not count (tests/shm_watch.py;
    tests/test_shm_check.py shows both sides)."""
    watch = ShmWatch(_RUN_TAG)
    watch.start()
    yield
    watch.stop()
    shutil.rmtree(_MPI_SEGMENTS, ignore_errors=True)
    if "SHOAL_TEST_BACKENDS" in os.environ:
        return  # a run nested in tests/test_mpi.py: the outer run checks /dev/shm
    left = watch.left()
    assert not left, f"files left in /dev/shm by this test run: {left}"
