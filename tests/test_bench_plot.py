"""bench/plot.py turns a bench/run.py --json file into the PNG and table of docs/performance.md."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

PLOT = pathlib.Path(__file__).parent.parent / "bench" / "plot.py"

RESULTS = {
    "workers": 2,
    "hardware_floor": 0.52,
    "maps": {
        "W1 100k no-op": {"serial_s": 0.003, "shoal": 1.9, "mp.Pool": 3.5},
        "W3 200 x 10ms": {"serial_s": 2.0, "shoal": 0.53, "mp.Pool": 0.6, "PPE": 0.61},
    },
    "w5": {"shoal": {"ratio": 0.7}, "PPE": {"ratio": 1.4}},
}


def test_plot_writes_a_png_and_a_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in requirements-dev.txt")
    src = tmp_path / "results.json"
    src.write_text(json.dumps(RESULTS))
    out = tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, str(PLOT), str(src), str(out), "--table"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| workload | shoal | mp.Pool | PPE |"
    # A tool missing from a workload is a dash, not a zero; W5 comes from its own section.
    assert rows[2] == "| W1 100k no-op | 1.90 | 3.50 | - |"
    assert rows[4] == "| W5 200MB array x 50 | 0.70 | - | 1.40 |"


def test_plot_refuses_results_without_map_workloads(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"workers": 2, "maps": {}}))
    run = subprocess.run(
        [sys.executable, str(PLOT), str(src), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "nothing to plot" in run.stderr
