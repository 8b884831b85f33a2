"""sciris' and scinexus' own parallel tests, run against shoal's adapters.

They come from the tools' sdists on PyPI, so this runs only when asked for
(``SHOAL_UPSTREAM_TESTS=1``); scripts/upstream_compat_tests.sh does the work.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "upstream_compat_tests.sh"


@pytest.mark.timeout(1000)
@pytest.mark.skipif(
    os.environ.get("SHOAL_UPSTREAM_TESTS") != "1",
    reason="needs PyPI to fetch the sciris and scinexus sdists; set SHOAL_UPSTREAM_TESTS=1",
)
def test_upstream_parallel_tests_pass_on_shoal():
    out = subprocess.run(
        [str(SCRIPT), sys.executable, "-k", "not test_get_size"],
        capture_output=True,
        text=True,
        timeout=950,
    )
    # scinexus' test_get_size expects cpu_count(); ShoalParallel reports 1 (issue 12 decision:
    # the driver is the master, rank 0, size 1).
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
