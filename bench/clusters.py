"""shoal on Dask and on Ray, side by side with the same engine used directly, in one run.

For each engine, on a local cluster of ``WORKERS`` single-threaded workers started once (and
warm before timing): ``shoal.map(f, xs, backend=...)`` against the engine's own idiom, one task
per item (Dask: ``client.map`` + ``client.gather``; Ray: ``ray.get([f.remote(x) for x in xs])``).
Map times are ratios to a serial loop timed in the same run (lower is better; 0.50 is ideal on
2 cores); ``shoal/direct`` is shoal's time over the direct engine's. The first-result row is the
median latency, in ms, of one one-item call on the running cluster.

Targets (issue 10, on a 2-core machine): on W2, shoal at least 5x faster than the direct engine
and at most 0.75 of the serial loop; on W3, within 10 % of the direct engine; first result
<= 100 ms. Each engine runs alone (the other is stopped), so neither's idle daemons skew the
other. Run with ``python bench/clusters.py [--repeat N] [--engines dask,ray]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Engine workers import the workloads by name, as the tasks' functions are pickled by reference.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))

import shoal

import workloads
from workloads import best_of, noop, spin

WORKERS = shoal.cpu_count()


def median_ms(fn: Callable[[], Any], runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def dask_mappers() -> tuple[dict[str, Callable[..., Any]], Callable[[], None]]:
    backend = shoal.get_backend("dask", workers=WORKERS)
    client = backend.client()

    def direct(f: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        return client.gather(client.map(f, xs, pure=False))  # type: ignore[no-any-return]

    mappers = {
        "shoal": lambda f, xs: shoal.map(f, xs, backend=backend),
        "direct": direct,
        "shoal first": lambda: shoal.map(noop, [1], backend=backend),
        "direct first": lambda: client.submit(noop, 1, pure=False).result(),
    }
    return mappers, backend.shutdown


def ray_mappers() -> tuple[dict[str, Callable[..., Any]], Callable[[], None]]:
    backend = shoal.get_backend("ray", workers=WORKERS)
    ray = backend.connect()
    remote: dict[Any, Any] = {}

    def direct(f: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        rf = remote.get(f) or remote.setdefault(f, ray.remote(f))
        return ray.get([rf.remote(x) for x in xs])  # type: ignore[no-any-return]

    rnoop = ray.remote(noop)
    mappers = {
        "shoal": lambda f, xs: shoal.map(f, xs, backend=backend),
        "direct": direct,
        "shoal first": lambda: shoal.map(noop, [1], backend=backend),
        "direct first": lambda: ray.get(rnoop.remote(1)),
    }
    return mappers, backend.shutdown


ENGINES = {"dask": (dask_mappers, "client.map"), "ray": (ray_mappers, "ray.remote")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="dask,ray")
    args = parser.parse_args()
    per_second = workloads.calibrate(1.0)
    rows = {
        "W2 20k x 100us": (spin, [per_second // 10_000] * 20_000),
        "W3 200 x 10ms": (spin, [per_second // 100] * 200),
        "W4 400 heavy-tailed ~5ms": (spin, workloads.heavy_tailed(400, 0.005, per_second)),
    }
    print(
        f"shoal on clusters: {WORKERS} single-threaded workers, best of {args.repeat}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    cols = ["workload"]
    table: dict[str, list[str]] = {label: [] for label in rows}
    table["first result (ms)"] = []
    for engine in args.engines.split(","):
        make, direct_name = ENGINES[engine]
        cols += [f"serial ({engine})", f"shoal-{engine}", direct_name, "shoal/direct"]
        mappers, stop = make()
        try:
            for m in ("shoal", "direct"):
                mappers[m](noop, list(range(4 * WORKERS)))  # warm: workers up, imports done
            for label, (fn, xs) in rows.items():
                # The serial loop is timed next to the maps it is compared with: on a shared
                # machine, the speed of the moment moves more than the differences measured.
                base, expected = best_of(lambda fn=fn, xs=xs: [fn(x) for x in xs], args.repeat)
                ratios = []
                for m in ("shoal", "direct"):
                    mapper = mappers[m]
                    took, got = best_of(lambda f=mapper, fn=fn, xs=xs: f(fn, xs), args.repeat)
                    if list(got) != expected:
                        raise SystemExit(f"{engine} {m} returned wrong results for {label}")
                    ratios.append(took / base)
                table[label] += [
                    f"{base * 1000:.0f} ms",
                    f"{ratios[0]:.2f}",
                    f"{ratios[1]:.2f}",
                    f"{ratios[0] / ratios[1]:.3f}",
                ]
            first = [median_ms(mappers["shoal first"]), median_ms(mappers["direct first"])]
            table["first result (ms)"] += ["", f"{first[0]:.1f}", f"{first[1]:.1f}", ""]
        finally:
            stop()
    print("  ".join(f"{c:>12}" if i else f"{c:<26}" for i, c in enumerate(cols)))
    for label, cells in table.items():
        print("  ".join(f"{c:>12}" for c in cells).join([f"{label:<26}  ", ""]))
    print("map rows: time as a ratio to the serial loop (lower is better)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
