"""The servers that the tests start listen on 127.0.0.1 only (the project's rule for engines).

Each test starts (or takes) an engine, finds the listening TCP sockets held by the processes
that engine runs as (from /proc), and fails on any that another machine could reach.
Known exceptions, which no setting of the engine can move to loopback, are named where they are
allowed (see test_an_mpi_job_listens_on_loopback_only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from engines import descendants
from listening import listeners, not_on_loopback

from mpi_helpers import ISOLATE, env, launch, mpi_missing, write

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_socket_on_every_interface_is_reported():
    # The check itself can fail: a socket bound to the wildcard address is reported, one bound
    # to 127.0.0.1 is not.
    with socket.socket() as wild, socket.socket() as local:
        wild.bind(("0.0.0.0", 0))
        wild.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        wild_port, local_port = wild.getsockname()[1], local.getsockname()[1]
        mine = listeners({os.getpid()})
        bad = not_on_loopback({os.getpid()})
    assert ("127.0.0.1", local_port) in [(a, p) for _, a, p in mine]
    assert any(entry.endswith(f"0.0.0.0:{wild_port}") for entry in bad), bad
    assert not any(entry.endswith(f":{local_port}") for entry in bad), bad


def _engine_processes() -> set[int]:
    # A local engine's scheduler or driver runs in this process; its other processes are
    # children of this process.
    return {os.getpid()} | descendants()


@pytest.mark.engine
def test_dask_listens_on_loopback_only(dask_backend):
    assert listeners(_engine_processes()), "no listening socket found: is the cluster up?"
    assert not_on_loopback(_engine_processes()) == []


@pytest.mark.engine
def test_ray_listens_on_loopback_only(ray_backend):
    assert listeners(_engine_processes()), "no listening socket found: is Ray up?"
    assert not_on_loopback(_engine_processes()) == []


@pytest.mark.engine
def test_slurm_daemons_listen_on_loopback_only(slurm):
    directory = os.environ.get("SHOAL_SLURM_DIR", "/tmp/shoal-slurm")
    pids = set()
    for name in ("slurmctld", "slurmd"):
        try:
            with open(os.path.join(directory, f"{name}.pid")) as f:
                pids.add(int(f.read()))
        except (OSError, ValueError):
            pytest.skip(f"this Slurm was not started by scripts/slurm_up.sh (no {name}.pid)")
    assert len(listeners(pids)) >= 2, "slurmctld and slurmd should each listen"
    assert not_on_loopback(pids) == []


_MPI_PROBE = """
import json, os, sys
sys.path.insert(0, {here!r})
from engines import descendants
from listening import not_on_loopback
import shoal

def probe(x):
    return x

if __name__ == "__main__":
    {start}
    # While the job runs, list the listening sockets of its processes (the ranks, their
    # workers, mpiexec's prterun or a spawn's prte) that others could reach.
    root = {root}
    print(json.dumps(not_on_loopback(descendants(root) | {{root}})))
"""


@pytest.mark.engine
@pytest.mark.skipif(bool(mpi_missing()), reason=str(mpi_missing()))
def test_an_mpi_job_listens_on_loopback_only(tmp_path):
    # Launch mode: rank 0 maps while the other ranks serve it; the job is prterun's.
    start = "shoal.map(probe, range(4))"
    script = write(tmp_path, _MPI_PROBE.format(here=HERE, start=start, root="os.getppid()"))
    res = launch(script, n=3, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    exposed = json.loads(res.stdout.strip().splitlines()[-1])
    if ISOLATE:
        assert exposed == []
    else:
        # Without a network namespace for the job, PRRTE's out-of-band listener (how prted
        # daemons on other hosts reach prterun) binds the wildcard address, IPv4 and IPv6,
        # whatever prte_if_include says; nothing else may.
        assert all(entry.startswith("prterun[") for entry in exposed), exposed


@pytest.mark.engine
@pytest.mark.skipif(bool(mpi_missing()), reason=str(mpi_missing()))
def test_an_mpi_spawn_listens_on_loopback_only(tmp_path):
    if not ISOLATE:
        pytest.skip(
            "a spawn's prte and TCP transport bind every interface (Open MPI has no setting "
            "against it); tests confine them to a network namespace, which needs root"
        )
    start = (
        'backend = shoal.get_backend("mpi", workers=2); shoal.map(probe, range(4), backend=backend)'
    )
    script = write(tmp_path, _MPI_PROBE.format(here=HERE, start=start, root="os.getpid()"))
    res = subprocess.run(
        [*ISOLATE, sys.executable, str(script)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
