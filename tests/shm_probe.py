"""Run only by tests/test_shm_check.py, in a pytest of its own: leaves a file in /dev/shm.

``SHOAL_SHM_PROBE`` names the file (it is made with ``shm_open``, as a leaked named segment
would be). The session check of tests/conftest.py must then fail for a shoal-named file and
pass for anyone else's.
"""

from __future__ import annotations

import os
from multiprocessing import shared_memory


def test_leave_a_segment_behind():
    segment = shared_memory.SharedMemory(name=os.environ["SHOAL_SHM_PROBE"], create=True, size=64)
    # Closed but not unlinked, and kept out of multiprocessing's resource tracker, which would
    # otherwise remove it at exit: a leak, as a crashed creator would leave it.
    from multiprocessing import resource_tracker

    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    segment.close()
