"""A Dask worker on a second (simulated) host: data really crosses a network.

The second host is a Linux network namespace on a private bridge (``scripts/netns.sh``). The
scheduler and one worker run here at 10.201.0.254, the other worker in the namespace at
10.201.0.1. Needs root; elsewhere it skips, and fails with SHOAL_REQUIRE_ENGINES=1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

import shoal

from helpers import worker_address_and_sum

pytestmark = [pytest.mark.engine, pytest.mark.timeout(120)]

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "netns.sh")
HERE, THERE = "10.201.0.254", "10.201.0.1"
NETNS = "/run/netns/shoal-h1"


@pytest.fixture(scope="module")
def second_host():
    pytest.importorskip("distributed")
    if os.geteuid() != 0:
        pytest.skip("a simulated second host needs root (network namespaces)")
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("a simulated second host needs ip and nsenter (scripts/netns.sh install)")
    subprocess.run(["bash", SCRIPT, "up"], check=True, timeout=30)
    try:
        yield NETNS
    finally:
        subprocess.run(["bash", SCRIPT, "down"], timeout=30)


def _stop(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def two_host_cluster(second_host, tmp_path):
    """A scheduler and a worker here, a worker on the second host; stopped by pid."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    py = sys.executable
    info = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed below
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [py, "-m", "distributed.cli.dask_scheduler", "--host", HERE, "--port", "0",
                 "--dashboard-address", f"{HERE}:0", "--scheduler-file", str(info)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.exists(), "the scheduler did not start"
        address = __import__("json").loads(info.read_text())["address"]
        worker = [
            "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
            "--no-dashboard", "--local-directory", str(tmp_path),
        ]  # fmt: skip
        # Each on its host's bridge address only; --no-dashboard leaves the worker's HTTP server
        # (health, metrics) on, so it gets an address too.
        procs.append(
            subprocess.Popen(
                [py, *worker, "--host", HERE, "--dashboard-address", f"{HERE}:0"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                ["nsenter", f"--net={second_host}", py, *worker, "--host", THERE,
                 "--dashboard-address", f"{THERE}:0"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        )  # fmt: skip
        yield address
    finally:
        _stop(procs)
        log.close()


def test_a_worker_on_a_second_host_gets_the_spec_and_returns_results(two_host_cluster):
    np = pytest.importorskip("numpy")
    backend = shoal.get_backend("dask", address=two_host_cluster)
    try:
        backend.client().wait_for_workers(2, timeout=60)
        shared = np.ones(2_000_000, dtype=np.int64)  # 16 MB, scattered once to each host
        got = shoal.map(worker_address_and_sum, range(60), shared=shared, backend=backend)
    finally:
        backend.shutdown()
    assert [value for _, value in got] == [x + 2_000_000 for x in range(60)]
    hosts = {address.split("://")[1].rsplit(":", 1)[0] for address, _ in got}
    assert hosts == {HERE, THERE}, f"items ran on {hosts}"
