"""Run only by tests/test_shm_check.py, in a pytest of its own: leaves a file in /dev/shm.

``SHOAL_SHM_PROBE`` names the file; ``SHOAL_SHM_PROBE_MODE`` says who makes it: ``leak`` (this
run, as a leaked named segment would be left) or ``foreign`` (a process that is not this run's,
as another test run's would be). The session check of tests/conftest.py must fail for the first
and pass for the second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shm_watch import TAG_VARIABLE

#: Makes the file, holds it while the session's watcher looks, and leaves it: closed, not
#: unlinked, and kept from multiprocessing's resource tracker, which would remove it at exit.
MAKE = """
import sys, time
from multiprocessing import resource_tracker, shared_memory

segment = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=64)
resource_tracker.unregister(segment._name, "shared_memory")
time.sleep(1.0)
segment.close()
"""

#: Detaches first (the process that makes the file is then no descendant of this run).
DETACHED = """
import os, subprocess, sys, time
if os.fork():
    os._exit(0)
time.sleep(0.3)
subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], check=True)
"""


def test_leave_a_file_behind():
    name = os.environ["SHOAL_SHM_PROBE"]
    if os.environ["SHOAL_SHM_PROBE_MODE"] == "leak":
        subprocess.run([sys.executable, "-c", MAKE, name], check=True, timeout=60)
        return
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    subprocess.run([sys.executable, "-c", DETACHED, MAKE, name], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 30
    while not os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # until its maker has left it
    assert os.path.exists(f"/dev/shm/{name}")
