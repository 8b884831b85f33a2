"""Failures of shoal's own MPI plumbing end the job or fail the call: never a hang.

Each test injects one fault into shoal's code (tests/mpi_faults.py) in a real ``mpiexec`` job;
the job runs under a hard timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

from mpi_helpers import mpiexec, needs_mpi, processes_named, write

pytestmark = [*needs_mpi, pytest.mark.usefixtures("mpi_leftovers")]

FAULTS = Path(__file__).with_name("mpi_faults.py")

#: Seconds a job may take before it counts as hung (start-up of 3 ranks on a busy 2-core
#: machine takes a few seconds).
HUNG_S = 40


def gone(marker: str, within: float = 10.0) -> bool:
    """Whether every process of the job (ranks and their workers) is gone within ``within`` s."""
    deadline = time.monotonic() + within
    while processes_named(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(tmp_path: Path, fault: str, script: Path, marker: str):
    return mpiexec(
        [sys.executable, str(FAULTS), fault, str(script)],
        timeout=HUNG_S,
        cwd=tmp_path,
        SHOAL_FAULT_MARKER=marker,
    )


@pytest.mark.parametrize("fault", ["link-early", "link-late"])
def test_rank_0_failing_to_set_up_its_link_ends_every_rank_with_its_error(tmp_path, fault):
    marker = uuid.uuid4().hex
    script = write(tmp_path, "import shoal\nprint('script ran')\n")
    res = run(tmp_path, fault, script, marker)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"InjectedFaultError: injected fault: {fault}" in res.stderr
    assert res.stderr.count("Traceback (most recent call last)") == 1
    assert "could not set up its link" in res.stderr
    assert "script ran" not in res.stdout
    assert gone(marker), processes_named(marker)


def test_a_relay_failing_to_start_ends_the_job_with_a_message(tmp_path):
    marker = uuid.uuid4().hex
    script = write(tmp_path, "import shoal\nprint(shoal.map(abs, [-1, -2]))\n")
    res = run(tmp_path, "relay-start", script, marker)
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert "relay on rank 2" in res.stderr
    assert "injected fault: relay-start" in res.stderr
    assert gone(marker), processes_named(marker)


CALL_FAILS = """
import json
import re
import shoal

def square(x):
    return x * x

try:
    shoal.map(square, range(40), chunksize=1)
except shoal.ShoalError as exc:
    failed = str(exc)
else:
    failed = None
# The job goes on: the next call works (the fault fires once per process).
again = shoal.map(square, range(40), chunksize=1) == [x * x for x in range(40)]
with shoal.Executor() as ex:
    future = ex.submit(square, 7)
    got = future.result()
print(json.dumps({"failed": failed, "again": again, "executor": got}))
"""


@pytest.mark.parametrize(
    ("fault", "says", "ranks"),
    [
        ("reply-thread", "the relay's reply thread failed: InjectedFaultError", "1"),
        ("rank0-receiver", "rank 0 could not take its results: InjectedFaultError", "12"),
    ],
)
def test_a_failing_helper_thread_fails_the_call_naming_rank_and_host(tmp_path, fault, says, ranks):
    marker = uuid.uuid4().hex
    script = write(tmp_path, CALL_FAILS)
    res = run(tmp_path, fault, script, marker)
    assert res.returncode == 0, (res.stdout, res.stderr)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["failed"] is not None, "the call should have failed"
    assert says in got["failed"]
    assert "injected fault" in got["failed"]
    assert re.search(rf"rank [{ranks}] \(host [^)]+\): ", got["failed"]), got["failed"]
    assert got["again"] is True
    assert got["executor"] == 49
    assert gone(marker), processes_named(marker)
