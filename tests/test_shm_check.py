"""The session check of tests/conftest.py (nothing left in /dev/shm by this run) can fail, and
does not blame this run for other processes' files."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")


def _run_leaking(name: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_TEST_BACKENDS"}
    env["SHOAL_SHM_PROBE"] = name
    env["SHOAL_SHM_PROBE_MODE"] = mode
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", os.path.join(HERE, "shm_probe.py"), "-q",
             "-p", "no:cacheprovider", "--color=no"],
            env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(HERE),
        )  # fmt: skip
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join("/dev/shm", name))


def test_a_segment_that_this_run_leaves_behind_fails_the_run():
    name = f"psm_leak_probe_{uuid.uuid4().hex[:12]}"
    res = _run_leaking(name, "leak")
    assert res.returncode != 0, res.stdout
    assert "files left in /dev/shm by this test run" in res.stdout, res.stdout
    assert name in res.stdout


def test_files_of_other_processes_do_not_fail_the_run():
    # What another test run or tool leaves (here: a process that is not this run's makes a
    # segment and leaves it) appears in /dev/shm during this run too: not this run's leak.
    name = f"psm_other_probe_{uuid.uuid4().hex[:12]}"
    res = _run_leaking(name, "foreign")
    assert res.returncode == 0, res.stdout + res.stderr
