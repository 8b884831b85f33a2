"""Side-by-side benchmark of shoal and its peers, in one run, as ratios to a serial loop.

Workloads (see the engine issue): W1 100,000 no-op calls; W2 20,000 tasks of ~100 us; W3 200
tasks of ~10 ms; W4 400 heavy-tailed tasks (mean ~5 ms, fixed seed); W6 pool creation to
first result; and submit()+result() throughput of no-op futures.

Each map time is the best of ``--repeat`` runs on a warm pool (pools are created before timing,
except in W6), or of 10 for a row whose serial loop takes under 0.1 s (W1, W1r: a few ms, where
one late wake-up is a tenth of the time), divided by the best serial loop time of the same run.
The tools take turns: each round runs every tool once, after an untimed round that warms pools
and this process (the first 100,000-int result a process makes costs it ~1,700 page faults,
which would otherwise fall on whichever tool runs first). Every result list is checked against
the serial one. Ratios below 1 are faster than the loop; on 2 cores the ideal for CPU-bound work
is 0.50.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shoal

import workloads
from workloads import best_of, noop, spin

WORKERS = shoal.cpu_count()


class Peers:
    """Warm pools of every tool, created once."""

    def __init__(self, names: list[str]) -> None:
        self.mappers: dict[str, Callable[[Callable[[Any], Any], list[Any]], list[Any]]] = {}
        self._closers: list[Callable[[], None]] = []
        if "shoal" in names:
            self.mappers["shoal"] = lambda f, xs: shoal.map(f, xs, workers=WORKERS)
        if "shoal.Executor" in names:
            sx = shoal.Executor(workers=WORKERS)
            self._closers.append(sx.shutdown)
            self.mappers["shoal.Executor"] = lambda f, xs: list(sx.map(f, xs))
        if "mp.Pool" in names:
            pool = mp.Pool(WORKERS)
            self._closers.append(pool.terminate)
            self.mappers["mp.Pool"] = pool.map
        if "PPE" in names:
            ppe = cf.ProcessPoolExecutor(WORKERS)
            self._closers.append(ppe.shutdown)
            self.mappers["PPE"] = lambda f, xs: list(ppe.map(f, xs))
        if "loky" in names:
            import loky

            lk = loky.get_reusable_executor(max_workers=WORKERS)
            self.mappers["loky"] = lambda f, xs: list(lk.map(f, xs))
        if "joblib" in names:
            import joblib

            par = joblib.Parallel(n_jobs=WORKERS)
            self.mappers["joblib"] = lambda f, xs: par(joblib.delayed(f)(x) for x in xs)
        if "mpire" in names:
            import mpire

            wp = mpire.WorkerPool(n_jobs=WORKERS, keep_alive=True)
            self._closers.append(wp.terminate)
            self.mappers["mpire"] = lambda f, xs: wp.map(
                f, xs, progress_bar=False, concatenate_numpy_output=False
            )
        for mapper in self.mappers.values():  # warm up: start every pool
            mapper(noop, list(range(4 * WORKERS)))

    def close(self) -> None:
        for close in self._closers:
            close()


#: Rows whose serial loop takes less than this many seconds (W1, W1r) ...
SHORT_ROW_S = 0.1
#: ... get at least this many rounds.
SHORT_ROW_ROUNDS = 10


def interleaved(
    mappers: dict[str, Callable[[Callable[[Any], Any], list[Any]], list[Any]]],
    fn: Callable[[Any], Any],
    xs: list[Any],
    expected: list[Any],
    label: str,
    repeat: int,
    give_up_after: float = 5.0,
) -> dict[str, float]:
    """Best time of each tool on ``fn`` over ``xs``: an untimed round, then ``repeat`` rounds
    in which the tools take turns (so drifting load and a cold process fall on no tool in
    particular). A tool whose run took over ``give_up_after`` seconds runs no more."""
    best = dict.fromkeys(mappers, float("inf"))
    for round_ in range(repeat + 1):
        for name, mapper in mappers.items():
            if best[name] > give_up_after and best[name] != float("inf"):
                continue  # one run showed it
            start = time.perf_counter()
            got = mapper(fn, xs)
            took = time.perf_counter() - start
            if list(got) != list(expected):
                raise SystemExit(f"{name} returned wrong results for {label}")
            del got
            # The first round warms up, unless the tool is too slow to run twice.
            if round_ > 0 or took > give_up_after:
                best[name] = min(best[name], took)
    return best


def map_workloads(repeat: int) -> dict[str, tuple[Callable[[Any], Any], list[Any]]]:
    per_second = workloads.calibrate(1.0)
    return {
        "W1 100k no-op": (noop, list(range(100_000))),
        "W1r 100k no-op, range input": (noop, range(100_000)),
        "W2 20k x 100us": (spin, [per_second // 10_000] * 20_000),
        "W3 200 x 10ms": (spin, [per_second // 100] * 200),
        "W4 400 heavy-tailed ~5ms": (spin, workloads.heavy_tailed(400, 0.005, per_second)),
    }


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _shm_bytes() -> int:
    total = 0
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        with contextlib.suppress(OSError):
            total += os.stat(os.path.join("/dev/shm", name)).st_size
    return total


class PeakMemory:
    """Peak PSS of this process and all its descendants, and peak /dev/shm growth, sampled."""

    def __init__(self) -> None:
        import threading

        # Other tools' idle pools are in the tree too: count growth over this baseline.
        self.base_pss = sum(_pss_kb(p) for p in _tree(os.getpid())) * 1024
        self.peak_pss = 0
        self.peak_shm = 0
        self._shm0 = _shm_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pss = sum(_pss_kb(p) for p in _tree(os.getpid())) * 1024
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_shm = max(self.peak_shm, _shm_bytes() - self._shm0)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def w5_child(name: str, memory: bool = False) -> dict[str, float]:
    """W5 for one tool, in this (fresh) process: its own pool is the only one in the tree.

    With ``memory``, the same calls run under the PSS sampler and only the memory figures are
    returned; without it, only the times. The two are measured in separate processes because
    the sampler perturbs what it watches: reading ``smaps_rollup`` of a process that maps a
    200 MB shared segment walks its 51,200 page-table entries, 4 to 5 ms of kernel time per
    process every 20 ms, taken from the 2 cores the workers compute on (and with the mapping's
    lock held).
    """
    import contextlib
    import functools

    import numpy as np

    arr = np.arange(25_000_000, dtype=np.int64)  # 200 MB
    share_s = 0.0
    if name == "shoal+share":
        # The opt-in path: the array lives in shared memory before the calls (one copy, timed
        # apart), so no call copies it.
        start = time.perf_counter()
        arr = shoal.share(arr)
        share_s = time.perf_counter() - start
        name = "shoal"
    fn = functools.partial(workloads.array_sum, arr)
    xs = list(range(50))
    serial, expected = best_of(lambda: [fn(x) for x in xs], 2)
    peers = Peers([name])
    peak = PeakMemory() if memory else None
    try:
        mapper = peers.mappers[name]
        # Warm up with a small array too, so workers have imported numpy before timing.
        mapper(functools.partial(workloads.array_sum, np.ones(8, dtype=np.int64)), list(range(8)))
        with peak or contextlib.nullcontext():
            took, got = best_of(lambda: mapper(fn, xs), 1)
            # Real programs call map again and again with the same data (a sampler, an
            # optimiser): the later calls are a row of their own.
            later, again = best_of(lambda: mapper(fn, xs), 3)
    finally:
        peers.close()
    if list(got) != expected or list(again) != expected:
        raise SystemExit(f"{name} returned wrong results for W5")
    if peak is not None:
        return {
            # The caller's own array, plus whatever the run added at its peak.
            "peak_pss_x": 1 + (peak.peak_pss - peak.base_pss) / arr.nbytes,
            "shm_bytes": peak.peak_shm,
        }
    # Each against this process's own serial loop: the machine's memory bandwidth drifts over
    # minutes, and a child that ran in a slow minute has a slow loop too.
    return {
        "serial": serial,
        "ratio": took / serial,
        "later": later / serial,
        "share_s": share_s,
    }


def w5_floor() -> tuple[float, float]:
    """The W5 hardware floors: 2 lone processes each summing a 200 MB array 25 times, against
    one process summing its own array 50 times (memory-bound, unlike the CPU-bound floor
    above). First with each process's own array (numpy backs it with transparent huge pages,
    as it does the caller's array and a worker's private copy of it); then with the 2 processes
    summing one shared-memory segment mapped as shoal's workers map it (4 KiB pages: this
    machine's shared-memory huge pages are off), the floor of any tool that shares the array
    rather than forking or copying it."""
    import subprocess

    import numpy as np

    code = (
        "import mmap, os, sys, time, numpy as np\n"
        "if len(sys.argv) > 2:\n"
        "    fd = os.open(sys.argv[2], os.O_RDONLY)\n"
        "    m = mmap.mmap(fd, 200_000_000, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)\n"
        "    a = np.frombuffer(m, dtype=np.int64)\n"
        "else:\n"
        "    a = np.arange(25_000_000, dtype=np.int64)\n"
        "a.sum()\n"
        "t = time.perf_counter()\n"
        "for _ in range(int(sys.argv[1])): a.sum()\n"
        "print(time.perf_counter() - t)\n"
    )

    def run(copies: int, sums: int, *shared: str) -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(sums), *shared], stdout=subprocess.PIPE
            )
            for _ in range(copies)
        ]
        return max(float(p.communicate()[0]) for p in procs)

    segment = shoal._native.Segment(memoryview(np.arange(25_000_000, dtype=np.int64)).cast("B"))
    path = f"/proc/{os.getpid()}/fd/{segment.fd}"
    try:
        own, shared = float("inf"), float("inf")
        for _ in range(3):
            one = run(1, 50)
            own = min(own, run(WORKERS, 50 // WORKERS) / one)
            shared = min(shared, run(WORKERS, 50 // WORKERS, path) / one)
    finally:
        segment.close()
    return own, shared


#: W5 rounds: every tool runs once, then again in each later round (in the reverse order of
#: the round before) while it is still in the contest: the machine's memory bandwidth, which
#: W5 measures, drifts with its neighbours' traffic over tens of seconds, so a tool's one run
#: can land in a bad minute. Best of the rounds, as for the other rows.
W5_ROUNDS = 3
#: A tool whose best W5 later-calls ratio is above this after a round is out of the contest
#: (the copiers: 10x and more), and is not run again.
W5_CONTEST = 3.0


def _w5_in_child(name: str, memory: bool = False) -> dict[str, float]:
    """W5's times (or, with ``memory``, its memory figures) from one fresh process (see
    w5_child)."""
    import subprocess

    extra = ["--w5-memory"] if memory else []
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--w5-child", name, *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"W5 for {name} failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def w5_rounds(names: list[str]) -> tuple[dict[str, list[dict[str, float]]], float]:
    """Every W5 run of each tool in ``names`` over :data:`W5_ROUNDS` rounds, and the best
    serial time of them all."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    contest = list(names)
    serial = float("inf")
    for i in range(W5_ROUNDS):
        for name in contest if i % 2 == 0 else contest[::-1]:
            got = _w5_in_child(name)
            runs[name].append(got)
            serial = min(serial, got["serial"])
        contest = [name for name in contest if min(r["later"] for r in runs[name]) < W5_CONTEST]
        print(
            f"  W5 round {i + 1} of {W5_ROUNDS} done (load {os.getloadavg()[0]:.2f}); "
            f"next: {', '.join(contest) or 'none'}",
            flush=True,
        )
    return runs, serial


def array_workloads(peers: Peers, names: list[str], results: dict[str, Any]) -> None:
    """W5: 50 tasks summing one 200 MB array passed as functools.partial(fn, arr), each tool
    in a fresh process so that the peak PSS of the process tree is that tool's alone (times
    over rounds, see :data:`W5_ROUNDS`; memory from one more process each). W7: 40 tasks each
    returning a 10 MB array."""

    import numpy as np

    tools = list(peers.mappers)
    runs, serial = w5_rounds([*tools, "shoal+share"] if "shoal" in tools else tools)
    row = ["W5 200MB array x 50", f"{serial * 1000:.1f} ms"]
    later = ["  W5 later calls, same array", ""]
    mem = ["  peak PSS / array (shm)", ""]
    results["w5"] = {}
    for name in tools:
        got = {
            "ratio": min(r["ratio"] for r in runs[name]),
            "later": min(r["later"] for r in runs[name]),
            "runs": len(runs[name]),
            **_w5_in_child(name, memory=True),
        }
        results["w5"][name] = got
        row.append(f"{got['ratio']:.2f}")
        later.append(f"{got['later']:.2f}")
        mem.append(f"{got['peak_pss_x']:.2f}({int(got['shm_bytes']) >> 20}M)")
    for line in (row, later, mem):
        print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(line)), flush=True)
    if "shoal" in tools:
        share = runs["shoal+share"]
        got = {
            "ratio": min(r["ratio"] for r in share),
            "share_s": min(r["share_s"] for r in share),
            **_w5_in_child("shoal+share", memory=True),
        }
        results["w5"]["shoal+share"] = got
        print(
            f"{'  shoal.share(arr) first':<26}  {'':>10}  {got['ratio']:>10.2f}  "
            f"(PSS {got['peak_pss_x']:.2f}x; the one share() copy took {got['share_s']:.2f} s)",
            flush=True,
        )
    print(
        "  W5 cells: best of the rounds each tool ran "
        + ", ".join(f"{name} {len(runs[name])}" for name in tools),
        flush=True,
    )
    floor, shared_floor = w5_floor()
    results["w5_floor"] = floor
    results["w5_shared_floor"] = shared_floor
    print(
        f"  W5 floor now: {floor:.2f} ({WORKERS} lone processes summing their own array, vs one);"
        f" {shared_floor:.2f} summing one shared-memory segment (4 KiB pages)",
        flush=True,
    )

    ys = list(range(40))
    serial, expected = best_of(lambda: [workloads.array_result(y) for y in ys], 1)
    row = ["W7 40 x 10MB results", f"{serial * 1000:.1f} ms"]
    for name, mapper in peers.mappers.items():
        took, got = best_of(lambda m=mapper: m(workloads.array_result, ys), 1)
        if not all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)):
            raise SystemExit(f"{name} returned wrong results for W7")
        row.append(f"{took / serial:.2f}")
    print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(row)), flush=True)


def w6_first_result(name: str) -> float:
    """Seconds from creating a fresh pool to the first result."""
    start = time.perf_counter()
    if name == "shoal":
        ex = shoal.Executor(workers=WORKERS)
        ex.submit(noop, 1).result()
        took = time.perf_counter() - start
        ex.shutdown()
    elif name == "mp.Pool":
        pool = mp.Pool(WORKERS)
        pool.apply(noop, (1,))
        took = time.perf_counter() - start
        pool.terminate()
    elif name == "PPE":
        ppe = cf.ProcessPoolExecutor(WORKERS)
        ppe.submit(noop, 1).result()
        took = time.perf_counter() - start
        ppe.shutdown()
    elif name == "loky":
        import loky

        ex = loky.ProcessPoolExecutor(WORKERS)
        ex.submit(noop, 1).result()
        took = time.perf_counter() - start
        ex.shutdown()
    elif name == "joblib":
        import joblib

        with joblib.Parallel(n_jobs=WORKERS, backend="multiprocessing") as par:
            par([joblib.delayed(noop)(1)])
        took = time.perf_counter() - start
    elif name == "mpire":
        import mpire

        with mpire.WorkerPool(n_jobs=WORKERS) as wp:
            wp.map(noop, [1], progress_bar=False)
            took = time.perf_counter() - start
    else:
        raise ValueError(name)
    return took


def submit_throughput(name: str, n: int) -> float:
    """Futures per second for n submit() calls followed by every result()."""
    if name == "shoal":
        ex: cf.Executor = shoal.Executor(workers=WORKERS)
    elif name == "PPE":
        ex = cf.ProcessPoolExecutor(WORKERS)
    elif name == "loky":
        import loky

        ex = loky.ProcessPoolExecutor(WORKERS)
    else:
        raise ValueError(name)
    with ex:
        ex.submit(noop, 0).result()  # pool started
        start = time.perf_counter()
        futures = [ex.submit(noop, i) for i in range(n)]
        results = [f.result() for f in futures]
        took = time.perf_counter() - start
    assert results == list(range(n)), f"{name}: wrong futures results"
    return n / took


DEFAULT_PEERS = "shoal,shoal.Executor,mp.Pool,PPE,loky,joblib,mpire"
#: The tools of a scaling run: shoal's two entry points, and the peer to beat at scale.
SCALING_PEERS = ["shoal", "shoal.Executor", "mp.Pool"]


def scaling(sizes: list[int], names: list[str], repeat: int) -> dict[str, Any]:
    """W2, W3 and W4 at each pool size in ``sizes``, every tool side by side, as ratios to one
    serial loop timed once per size; with the hardware floor for that many processes (on a
    machine with fewer cores than workers, the floor is about 1/cores, not 1/workers)."""
    global WORKERS
    per_second = workloads.calibrate(1.0)
    rows = {k: v for k, v in map_workloads(repeat).items() if k[:2] in ("W2", "W3", "W4")}
    out: dict[str, Any] = {"cpus": os.cpu_count(), "usable": shoal.cpu_count(), "sizes": {}}
    print(f"scaling: pool sizes {sizes} on {shoal.cpu_count()} usable CPUs, best of {repeat}")
    header = ["workers", "floor", *[f"{w[:2]} {n}" for w in rows for n in names]]
    print("  ".join(f"{c:>16}" for c in header), flush=True)
    for size in sizes:
        WORKERS = size
        floor = workloads.hardware_floor(0.5, per_second, size)
        entry: dict[str, Any] = {"floor": floor, "load": os.getloadavg()[0]}
        peers = Peers(names)
        try:
            for label, (fn, xs) in rows.items():
                serial, expected = best_of(lambda fn=fn, xs=xs: [fn(x) for x in xs], repeat)
                entry[label] = {}
                for name, mapper in peers.mappers.items():
                    took, got = best_of(lambda m=mapper, fn=fn, xs=xs: m(fn, xs), repeat)
                    if list(got) != list(expected):
                        raise SystemExit(f"{name} returned wrong results for {label}")
                    entry[label][name] = took / serial
        finally:
            peers.close()
        out["sizes"][str(size)] = entry
        cells = [str(size), f"{floor:.3f}"]
        cells += [f"{entry[w][n]:.3f}" for w in rows for n in names]
        print("  ".join(f"{c:>16}" for c in cells), flush=True)
    print("cells: time / serial loop (lower is better); ideal 1/min(workers, cores)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", default=DEFAULT_PEERS)
    parser.add_argument("--only", default="", help="comma-separated workload prefixes (W1,W2,...)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument(
        "--workers", type=int, default=0, help="pool size of every tool (default: CPUs usable)"
    )
    parser.add_argument(
        "--scaling",
        default="",
        help="instead of the full table: W2-W4 at each of these pool sizes (e.g. 1,2,4,8,16)",
    )
    parser.add_argument("--w5-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--w5-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global WORKERS
    if args.workers:
        WORKERS = args.workers
    if args.w5_child:
        print(json.dumps(w5_child(args.w5_child, memory=args.w5_memory)))
        return 0
    if args.scaling:
        sizes = [int(n) for n in args.scaling.split(",")]
        names = args.peers.split(",") if args.peers != DEFAULT_PEERS else SCALING_PEERS
        results = scaling(sizes, names, args.repeat)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    names = args.peers.split(",")
    only = [p for p in args.only.split(",") if p]
    results: dict[str, Any] = {"workers": WORKERS, "maps": {}, "w6_ms": {}, "futures_per_s": {}}
    print(f"shoal bench: {WORKERS} workers, best of {args.repeat}", flush=True)

    floor = workloads.hardware_floor(1.0, workloads.calibrate(1.0), WORKERS)
    results["hardware_floor"] = floor
    print(f"hardware floor now: {floor:.3f} ({WORKERS} lone processes vs one; ideal 1/{WORKERS})")
    peers = Peers(names)
    try:
        header = ["workload", "serial", *peers.mappers]
        print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(header)), flush=True)
        for label, (fn, xs) in map_workloads(args.repeat).items():
            if only and not any(label.startswith(p) for p in only):
                continue
            serial, expected = best_of(lambda fn=fn, xs=xs: [fn(x) for x in xs], args.repeat)
            row = [label, f"{serial * 1000:.1f} ms"]
            results["maps"][label] = {"serial_s": serial}
            # A row of a few ms is noisy (one late wake-up is a tenth of it) and cheap to
            # repeat: every tool gets more rounds there.
            rounds = args.repeat if serial >= SHORT_ROW_S else max(args.repeat, SHORT_ROW_ROUNDS)
            times = interleaved(peers.mappers, fn, xs, expected, label, rounds)
            for name, took in times.items():
                results["maps"][label][name] = took / serial
                row.append(f"{took / serial:.2f}")
            print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(row)), flush=True)
        if not only or "W5" in only:
            array_workloads(peers, names, results)
    finally:
        peers.close()

    # shoal's W6 and futures/s rows already time its Executor.
    names = [name for name in names if name != "shoal.Executor"]
    if not only or "W6" in only:
        row = ["W6 first result (ms)", ""]
        for name in names:
            w6_first_result(name)  # cold run: page cache, imports
            times = [w6_first_result(name) for _ in range(max(3, args.repeat))]
            results["w6_ms"][name] = statistics.median(times) * 1000
            row.append(f"{results['w6_ms'][name]:.0f}")
        print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(row)), flush=True)

    if not only or "F" in only:
        row = ["futures/s (submit+result)", ""]
        for name in names:
            if name in ("shoal", "PPE", "loky"):
                rate = max(submit_throughput(name, 20_000) for _ in range(2))
                results["futures_per_s"][name] = rate
                row.append(f"{rate:,.0f}")
            else:
                row.append("-")
        print("  ".join(f"{c:>10}" if i else f"{c:<26}" for i, c in enumerate(row)), flush=True)

    print("columns after 'serial': time as a ratio to the serial loop (lower is better)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
