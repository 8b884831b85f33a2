"""The shoal code blocks of docs/migrating.md run as written."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

PAGE = pathlib.Path(__file__).parent.parent / "docs" / "migrating.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S) if "shoal" in b]


def test_the_page_has_shoal_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=lambda code: code.split("\n")[0][:40])
def test_example_runs(code, tmp_path):
    pytest.importorskip("sciris")
    pytest.importorskip("scinexus")
    pytest.importorskip("sklearn")
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
