"""Slurm row of the benchmark: shoal on Slurm against a bare ``sbatch --array``, one item a task.

Workload: N items (default 1,000) of 10 ms each (``time.sleep``), with at most ``--workers``
array tasks running at once in both cases. Both run on the same Slurm (start the local one with
``scripts/slurm_up.sh``), side by side in one run:

- ``shoal``: ``shoal.map(f, range(N), backend=slurm)``; the row also counts the array tasks the
  call submitted (the target is at most ``workers``).
- ``bare``: one ``sbatch --array=0-(N-1)%workers`` job whose every task starts Python, runs one
  item and writes its result to a file; the time runs until every result file is there.

Each time is wall-clock from the call (or ``sbatch``) to the last result, and the results of both
are checked against a serial loop. Times depend on the scheduler's settings (the local Slurm
schedules with ``batch_sched_delay=0``; a production cluster is usually slower per task, which
favours shoal further). ``--bare-items M`` times the bare array on M items and scales it to N
(a bare array of 1,000 tasks takes about 10 minutes on the 2-CPU test bed).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import shoal


def item(x: int) -> int:
    time.sleep(0.01)
    return x * x


BARE_TASK = """\
import os, time
x = int(os.environ["SLURM_ARRAY_TASK_ID"])
time.sleep(0.01)
with open(os.path.join({out!r}, f"r{{x}}.tmp"), "w") as f:
    f.write(str(x * x))
os.replace(os.path.join({out!r}, f"r{{x}}.tmp"), os.path.join({out!r}, f"r{{x}}"))
"""


def run_shoal(n: int, workers: int, root: str) -> tuple[float, int]:
    backend = shoal.get_backend("slurm", workers=workers, run_dir=root, keep_files=True)
    start = time.perf_counter()
    got = shoal.map(item, range(n), backend=backend)
    elapsed = time.perf_counter() - start
    assert got == [x * x for x in range(n)], "shoal on Slurm gave wrong results"
    tasks = len(glob.glob(os.path.join(root, "*", "b*", "t*.in")))
    return elapsed, tasks


def run_bare(n: int, workers: int, root: str) -> float:
    out = os.path.join(root, "bare")
    os.makedirs(out, mode=0o700)
    script = os.path.join(root, "bare.py")
    with open(script, "w") as f:
        f.write(BARE_TASK.format(out=out))
    start = time.perf_counter()
    subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--array=0-{n - 1}%{workers}",
            "--job-name=shoal-bench-bare",
            f"--output={out}/%a.log",
            f"--wrap={sys.executable} {script}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    while len([f for f in os.listdir(out) if f.startswith("r") and "." not in f]) < n:
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    for x in range(n):
        with open(os.path.join(out, f"r{x}")) as f:
            assert int(f.read()) == x * x, "bare array gave wrong results"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--bare-items", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("bench/slurm.py needs Slurm: run scripts/slurm_up.sh (root) first")
    root = tempfile.mkdtemp(prefix="shoal-bench-slurm-", dir=os.getcwd())
    try:
        serial_start = time.perf_counter()
        [item(x) for x in range(args.items)]
        serial = time.perf_counter() - serial_start
        shoal_time, tasks = run_shoal(args.items, args.workers, os.path.join(root, "shoal"))
        bare_n = args.bare_items or args.items
        bare_time = run_bare(bare_n, args.workers, root) * args.items / bare_n
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scaled = "" if bare_n == args.items else f" (measured on {bare_n}, scaled)"
    print(f"Slurm: {args.items} items of 10 ms, workers={args.workers}")
    print(f"  serial loop              {serial:8.2f} s")
    print(f"  bare sbatch --array      {bare_time:8.2f} s{scaled}")
    print(f"  shoal backend='slurm'    {shoal_time:8.2f} s   array tasks submitted: {tasks}")
    print(f"  shoal / bare             {shoal_time / bare_time:8.3f}   (target < 2)")
    print(f"  array tasks <= workers   {'yes' if tasks <= args.workers else 'NO'}")


if __name__ == "__main__":
    main()
