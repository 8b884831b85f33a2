"""Benchmark workloads, importable by every peer's worker processes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time


def noop(x):
    return x


def spin(n):
    """Pure-Python CPU work, about proportional to ``n``."""
    total = 0
    for i in range(n):
        total += i
    return total


def timed_spin(n):
    """:func:`spin`, returning when it ran and where: ``(start, end, pid)``, ``perf_counter``
    seconds, which every process of one host reads from the same clock."""
    start = time.perf_counter()
    spin(n)
    return start, time.perf_counter(), os.getpid()


def calibrate(seconds: float) -> int:
    """Iterations of :func:`spin` that take about ``seconds`` of CPU on this machine.

    CPU time, not wall time: on a machine other jobs load, wall time would count their share
    too, the items would come out smaller, and rows would not compare from run to run."""
    n = 10_000
    while True:
        start = time.process_time()
        spin(n)
        took = time.process_time() - start
        if took > 0.05:
            return max(1, int(n * seconds / took))
        n *= 2


def heavy_tailed(count: int, mean_s: float, per_second: int, seed: int = 42) -> list[int]:
    """Spin counts with log-normal durations (sigma 1.0) of the given mean; fixed seed."""
    rng = random.Random(seed)
    sigma = 1.0
    raw = [rng.lognormvariate(0.0, sigma) for _ in range(count)]
    scale = mean_s / (sum(raw) / count)
    return [max(1, int(r * scale * per_second)) for r in raw]


def array_sum(arr, i):
    """W5: sum a (large, shared) array."""
    return int(arr.sum()) + i


def array_result(i, n=1_310_720):
    """W7: return a 10 MB float64 array."""
    import numpy as np

    return np.full(n, float(i))


def best_of(fn, repeat, give_up_after=5.0):
    """``(best time, last result)`` of ``repeat`` runs of ``fn``; one run is enough once it
    took over ``give_up_after`` seconds (a very slow peer or row shows itself in one)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        if best > give_up_after:
            break
    return best, out


def hardware_floor(seconds: float, per_second: int, workers: int) -> float:
    """The best ratio this machine allows right now: ``workers`` independent processes, each
    spinning for ``seconds``, against one. No pool, no pickling: only the hardware and the
    neighbours of this machine."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import workloads; "
        f"workloads.spin({int(seconds * per_second)})"
    )

    def run(n: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
        for p in procs:
            p.wait()
        return time.perf_counter() - start

    one = min(run(1) for _ in range(2))
    many = min(run(workers) for _ in range(2))
    return many / (workers * one)
