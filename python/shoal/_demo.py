"""``python -m shoal demo``: real embarrassingly parallel work, timed serial versus shoal.

Three workloads a scientist meets first:

- *primes*: trial-division primality of large numbers, whose cost varies wildly (a prime
  costs a full scan, most composites stop at once), so load balancing matters;
- *Monte Carlo pi*: independent batches of random samples, one seed per batch;
- *tiny tasks*: a hundred thousand trivial calls, where only adaptive batching keeps a
  parallel map from being slower than a loop.

Each result list is checked against the serial one.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import shoal


def is_prime(n: int) -> bool:
    """Trial division by 6k +/- 1."""
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    limit = math.isqrt(n)
    k = 5
    while k <= limit:
        if n % k == 0 or n % (k + 2) == 0:
            return False
        k += 6
    return True


def pi_batch(seed: int, samples: int = 200_000) -> int:
    """Number of random points of the unit square that fall in the quarter disc."""
    rng = random.Random(seed)
    rand = rng.random
    hits = 0
    for _ in range(samples):
        x, y = rand(), rand()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


def double(x: int) -> int:
    return 2 * x


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _row(label: str, serial: float, parallel: float, note: str) -> str:
    speedup = serial / parallel if parallel > 0 else float("inf")
    return f"{label:<34}{serial:>9.3f} s{parallel:>9.3f} s{speedup:>9.2f}x   {note}"


def run(workers: int | None = None, scale: float = 1.0, out: Any = sys.stdout) -> bool:
    """Run the demo; return True if every parallel result matched the serial one."""
    n_workers = workers or shoal.cpu_count()
    print(
        f"shoal demo: {n_workers} workers ({shoal.cpu_count()} usable CPUs), processes backend",
        file=out,
    )
    # Start the pool first, as a long-running program would have it.
    shoal.map(double, range(n_workers * 4), workers=n_workers)
    print(f"{'workload':<34}{'serial':>11}{'shoal':>11}{'speedup':>10}", file=out)

    ok = True
    count = max(200, int(3_000 * scale))
    numbers = range(10**12, 10**12 + count)
    t_serial, expected = _time(lambda: [is_prime(n) for n in numbers])
    t_par, got = _time(lambda: shoal.map(is_prime, numbers, workers=n_workers))
    ok &= got == expected
    note = f"{sum(got)} primes, {'identical' if got == expected else 'MISMATCH'}"
    print(_row(f"primes ({count:,} numbers ~1e12)", t_serial, t_par, note), file=out)

    batches = max(4, int(40 * scale))
    seeds = range(batches)
    t_serial, expected = _time(lambda: [pi_batch(s) for s in seeds])
    t_par, got = _time(lambda: shoal.map(pi_batch, seeds, workers=n_workers))
    ok &= got == expected
    estimate = 4 * sum(got) / (batches * 200_000)
    note = f"pi ~ {estimate:.5f}, {'identical' if got == expected else 'MISMATCH'}"
    print(_row(f"Monte Carlo pi ({batches} x 200k)", t_serial, t_par, note), file=out)

    tiny = range(100_000)
    t_serial, expected = _time(lambda: [double(x) for x in tiny])
    t_par, got = _time(lambda: shoal.map(double, tiny, workers=n_workers))
    ok &= got == expected
    note = "adaptive batching; " + ("identical" if got == expected else "MISMATCH")
    print(_row("tiny tasks (100,000 calls)", t_serial, t_par, note), file=out)
    print("all results identical to the serial loop" if ok else "RESULTS DIFFER", file=out)
    return bool(ok)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m shoal``."""
    parser = argparse.ArgumentParser(prog="python -m shoal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="time real parallel work, serial versus shoal")
    demo.add_argument(
        "--workers", type=int, default=None, help="workers (default: all usable CPUs)"
    )
    demo.add_argument("--scale", type=float, default=1.0, help="work size factor (default 1.0)")
    sub.add_parser("info", help="print version, usable CPUs and backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(f"shoal {shoal.__version__}")
        print(f"usable CPUs: {shoal.cpu_count()}")
        print(f"backends: {', '.join(shoal.available_backends())}")
        return 0
    return 0 if run(args.workers, args.scale) else 1
