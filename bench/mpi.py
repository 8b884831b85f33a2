"""MPI rows: shoal's ``mpi`` backend against ``mpi4py.futures.MPIPoolExecutor``, and SPMD
``allreduce`` against mpi4py, as ratios to a serial loop timed in the same job.

``python bench/mpi.py`` starts the jobs itself, one after the other, and prints one table:

- ``mpiexec -n 3 python -m shoal.mpi bench/mpi.py --tool shoal`` (rank 0 plus 2 serving ranks;
  also shoal's local processes backend with 2 workers from rank 0, for reference);
- ``mpiexec -n 3 python -m mpi4py.futures bench/mpi.py --tool futures`` (MPIPoolExecutor on the
  2 other ranks, default ``chunksize`` and the best of a few);
- ``mpiexec -n 2 python bench/mpi.py --tool allreduce`` (mpi4py ``Allreduce`` of a 100 MB
  float64 array) and the same with ``shoal.spmd.run(..., ranks=2)`` on local processes.

``--only pools``, ``--only allreduce`` or ``--only timeline`` runs one part; the timeline part
(not run by default) shows the idle share of the workers' time on W2 to W4 per tool (see
``bench/timeline.py``): a measure that does not depend on the machine's speed that minute.
``--rounds N`` interleaves the tools over N rounds (pool rows: shoal's job and
MPIPoolExecutor's, in alternating order: A B, B A, ...), prints each round with the load average
after it, then the best and the median of each cell, and in how many rounds shoal's ratio was at
or below MPIPoolExecutor's best in that round. Each job divides its times by its own serial loop.
``--rows W2,W4`` times only those rows (prefixes; ``first`` for the first result): shorter jobs,
so the two tools' turns come closer together on a machine whose speed drifts.

Rows: W1 (100,000 no-op calls), W2 (20,000 x ~100 us), W3 (200 x ~10 ms), W4 (400 heavy-tailed,
mean ~5 ms) and first result (ms from a new executor to its first result).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads
from workloads import noop, spin

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1",
    "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    # One machine: ranks talk through shared memory. Open MPI's TCP transport would make every
    # rank listen on all interfaces (it binds the wildcard address whatever its settings).
    "OMPI_MCA_btl": "^tcp",
}
ARRAY_BYTES = 100 * 2**20
#: The key of a row's serial time in a job's result.
SERIAL = "serial"
#: Samples of the time to first result (the median is shown).
FIRST_SAMPLES = 21


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        if best > 10.0:  # a very slow row: one run shows it
            break
    return best, out


#: The first-result row's name.
FIRST = "first result (ms)"


def wanted(name: str, only: list[str]) -> bool:
    """Whether row ``name`` is among the ``--rows`` prefixes ``only`` (all rows if empty)."""
    return not only or any(name.startswith(prefix) for prefix in only)


def rows(only: list[str]) -> dict[str, tuple[Callable[..., Any], list[Any]]]:
    per_second = workloads.calibrate(1.0)
    everything: dict[str, tuple[Callable[..., Any], Callable[[], list[Any]]]] = {
        "W1 100k no-op": (noop, lambda: list(range(100_000))),
        "W2 20k x 100us": (spin, lambda: [per_second // 10_000] * 20_000),
        "W3 200 x 10ms": (spin, lambda: [per_second // 100] * 200),
        "W4 400 heavy-tailed ~5ms": (
            spin,
            lambda: workloads.heavy_tailed(400, 0.005, per_second),
        ),
    }
    return {name: (fn, xs()) for name, (fn, xs) in everything.items() if wanted(name, only)}


def measure(
    mappers: dict[str, Callable[..., list[Any]]],
    first: Callable[[], Any],
    repeat: int,
    only: list[str],
):
    """Seconds per row and tool (best of ``repeat``), with the row's serial loop as ``SERIAL``;
    the parent divides each by this job's serial time (see :func:`pool_rows`)."""
    out: dict[str, Any] = {}
    for name, (fn, xs) in rows(only).items():
        serial, expected = best_of(lambda fn=fn, xs=xs: [fn(x) for x in xs], repeat)
        out.setdefault(name, {})[SERIAL] = serial
        for tool, mapper in mappers.items():
            took, got = best_of(lambda fn=fn, xs=xs, m=mapper: m(fn, xs), repeat)
            assert got == expected, f"{tool} gave wrong results on {name}"
            out[name][tool] = took
    if not wanted(FIRST, only):
        return out
    times = []
    # A median of many: one start-up is a fraction of a millisecond, easily hit by a wake-up
    # that comes late on a busy machine.
    for _ in range(max(FIRST_SAMPLES, repeat)):
        start = time.perf_counter()
        first()
        times.append((time.perf_counter() - start) * 1e3)
    out[FIRST] = {"value": sorted(times)[len(times) // 2]}
    return out


def tool_shoal(repeat: int, only: list[str]) -> dict[str, Any]:
    import shoal

    def first() -> None:
        with shoal.Executor() as ex:
            ex.submit(noop, 0).result()

    local = shoal.get_backend("processes")
    mappers = {
        "shoal": shoal.map,
        # The local engine with as many workers, for reference (the relays idle meanwhile).
        "shoal local": lambda f, xs: shoal.map(f, xs, backend=local, workers=2),
    }
    res = measure(mappers, first, repeat, only)
    if FIRST in res:
        res[FIRST] = {"shoal": res[FIRST]["value"]}
    return res


def tool_futures(repeat: int, only: list[str]) -> dict[str, Any]:
    from mpi4py.futures import MPIPoolExecutor

    ex = MPIPoolExecutor()
    ex.submit(noop, 0).result()  # warm
    chunks = {"MPIPool": 1, "MPIPool cs=64": 64, "MPIPool cs=512": 512}
    mappers = {
        name: (lambda f, xs, cs=cs: list(ex.map(f, xs, chunksize=cs)))
        for name, cs in chunks.items()
    }

    def first() -> None:
        with MPIPoolExecutor() as fresh:
            fresh.submit(noop, 0).result()

    res = measure(mappers, first, repeat, only)
    if FIRST in res:
        res[FIRST] = {"MPIPool": res[FIRST]["value"]}
    ex.shutdown()
    return res


def tool_timeline(tool: str, repeat: int, only: list[str]) -> dict[str, Any]:
    """The idle shares of each tool's workers on the rows of timed items (W1's no-ops are too
    short to time one by one)."""
    import timeline

    data = {name: xs for name, (fn, xs) in rows(only).items() if fn is spin}
    if tool == "shoal":
        import shoal

        shoal.map(noop, range(8))  # the relays' workers start before the first call is timed
        workers = sum(count for _, _, count in shoal.get_backend().pool().relays)
        return timeline.measure({"shoal": shoal.map}, data, repeat, workloads.timed_spin, workers)
    from mpi4py import MPI
    from mpi4py.futures import MPIPoolExecutor

    workers = MPI.COMM_WORLD.Get_size() - 1  # every rank but 0 is a worker

    with MPIPoolExecutor() as ex:
        ex.submit(noop, 0).result()
        mappers = {
            f"MPIPool{'' if cs == 1 else f' cs={cs}'}": (
                lambda f, xs, cs=cs: list(ex.map(f, xs, chunksize=cs))
            )
            for cs in (1, 64, 512)
        }
        return timeline.measure(mappers, data, repeat, workloads.timed_spin, workers)


def allreduce_mpi(repeat: int) -> float:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    arr = np.full(ARRAY_BYTES // 8, float(comm.rank))
    out = np.empty_like(arr)
    best = float("inf")
    for _ in range(repeat):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(arr, out, op=MPI.SUM)
        best = min(best, time.perf_counter() - start)
    assert out[0] == sum(range(comm.size))
    return best


def _spmd_allreduce() -> float:
    import numpy as np

    import shoal.spmd

    comm = shoal.spmd.comm()
    arr = np.full(ARRAY_BYTES // 8, float(comm.rank))
    comm.barrier()
    start = time.perf_counter()
    total = comm.allreduce(arr)
    took = time.perf_counter() - start
    assert total[0] == sum(range(comm.size))
    return took


def allreduce_shoal(repeat: int) -> float:
    import shoal.spmd

    return min(max(shoal.spmd.run(_spmd_allreduce, ranks=2)) for _ in range(repeat))


def job(args: list[str], n: int) -> Any:
    # Open MPI's shared-memory transport puts its sm_segment.* files in /dev/shm, where they
    # outlive a job that ends abruptly, unless told otherwise: a directory of this job's own,
    # removed after it.
    segments = tempfile.mkdtemp(prefix="shoal-bench-mpi-sm-")
    env = {
        **os.environ,
        **ENV,
        "OMPI_MCA_btl_sm_backing_directory": segments,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
    }
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(n), sys.executable, *args]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        shutil.rmtree(segments, ignore_errors=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


def allreduce_rows(repeat: int, rounds: int) -> None:
    """mpi4py and shoal side by side, interleaved over ``rounds`` (the best of each is shown,
    with the load average of the machine after each round)."""
    me = os.path.abspath(__file__)
    print("allreduce of a 100 MB float64 array on 2 ranks (s, best of each round)")
    print(f"{'round':>6}{'mpi4py Allreduce':>18}{'shoal.spmd':>12}{'ratio':>8}{'load':>7}")
    best_mpi = best_shoal = float("inf")
    for i in range(rounds):
        mpi_s = job([me, "--tool", "allreduce", "--repeat", str(repeat)], 2)
        shoal_s = allreduce_shoal(repeat)
        best_mpi, best_shoal = min(best_mpi, mpi_s), min(best_shoal, shoal_s)
        load = os.getloadavg()[0]
        print(f"{i + 1:>6}{mpi_s:>18.3f}{shoal_s:>12.3f}{shoal_s / mpi_s:>8.2f}{load:>7.2f}")
    print(f"{'best':>6}{best_mpi:>18.3f}{best_shoal:>12.3f}{best_shoal / best_mpi:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", default="")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=["pools", "allreduce", "timeline"],
        help="run only the pool rows, the allreduce or the timeline part (not run by default)",
    )
    parser.add_argument("--timeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (default: 1 for the pool rows, 3 for the allreduce)",
    )
    parser.add_argument(
        "--rows",
        default="",
        help="comma-separated prefixes of the pool rows to time (W1,...,W4, first); default all",
    )
    opts = parser.parse_args()
    only = [r.strip() for r in opts.rows.split(",") if r.strip()]
    me = os.path.abspath(__file__)
    if opts.tool:
        if opts.timeline:
            result: Any = tool_timeline(opts.tool, opts.repeat, only)
        elif opts.tool == "shoal":
            result = tool_shoal(opts.repeat, only)
        elif opts.tool == "futures":
            result = tool_futures(opts.repeat, only)
        else:
            result = allreduce_mpi(opts.repeat)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if opts.only == "timeline":
        timeline_rows(me, opts.repeat, opts.rounds or 1, only)
        return
    if opts.only != "allreduce":
        pool_rows(me, opts.repeat, opts.rounds or 1, only)
    if opts.only != "pools":
        print()
        allreduce_rows(opts.repeat, opts.rounds or 3)


def _tool_jobs(me: str, args: list[str]) -> dict[str, list[str]]:
    """The command lines (after ``mpiexec -n 3 python``) of shoal's job and MPIPoolExecutor's."""
    return {
        "shoal": ["-m", "shoal.mpi", me, "--tool", "shoal", *args],
        "futures": ["-m", "mpi4py.futures", me, "--tool", "futures", *args],
    }


def pool_rows(me: str, repeat_n: int, rounds: int = 1, only: list[str] | None = None) -> None:
    """The pool rows: shoal's job and MPIPoolExecutor's, interleaved over ``rounds`` (each
    round's ratios with the load average after it, then the best and median of each cell)."""
    args = ["--repeat", str(repeat_n)]
    if only:
        args += ["--rows", ",".join(only)]
    tools = ["shoal", "MPIPool", "MPIPool cs=64", "MPIPool cs=512", "shoal local"]
    jobs = _tool_jobs(me, args)
    each: list[dict[str, dict[str, float]]] = []  # every round's ratios
    print("ratio to a serial loop (lower is better); mpiexec -n 3: rank 0 + 2 serving ranks")
    print(
        "each job times the serial loop too, and its ratios divide by its own serial time: this"
        " machine's speed drifts over minutes, and a job that ran in a slow minute has a slow"
        " loop too"
    )
    per_second = workloads.calibrate(1.0)
    for i in range(rounds):
        # What 2 lone processes (the serving ranks' workers) get against one, right now: the
        # ratio no tool can beat on W2 to W4 in this round.
        floor = workloads.hardware_floor(1.0, per_second, 2)
        print(f"round {i + 1}: hardware floor {floor:.3f} (2 lone processes vs one)", flush=True)
        # A B, then B A: a machine that slows down (or speeds up) over a round favours neither.
        order = ["shoal", "futures"] if i % 2 == 0 else ["futures", "shoal"]
        table: dict[str, dict[str, float]] = {}
        for which in order:
            for name, cells in _ratios(job(jobs[which], 3)).items():
                table.setdefault(name, {}).update(cells)
        title = f"round {i + 1} (load {os.getloadavg()[0]:.2f})" if rounds > 1 else "row"
        each.append(table)
        _print_table(title, table, tools)
    if rounds > 1:
        _print_table(f"best of {rounds}", _best(each), tools)
        _print_table(f"median of {rounds}", _medians(each), tools)
        _print_wins(each)


def timeline_rows(me: str, repeat_n: int, rounds: int, only: list[str]) -> None:
    """The idle share of the workers' time, shoal's job and MPIPoolExecutor's taking turns over
    ``rounds``; each cell is the median over ``repeat_n`` calls, then the median over rounds."""
    args = ["--timeline", "--repeat", str(repeat_n)]
    if only:
        args += ["--rows", ",".join(only)]
    jobs = _tool_jobs(me, args)
    tools = ["shoal", "MPIPool", "MPIPool cs=64", "MPIPool cs=512"]
    print(
        "idle share of the workers' time, % (before the first item + between items + after the"
        " last); mpiexec -n 3: rank 0 + 2 serving ranks"
    )
    each: list[dict[str, dict[str, dict[str, float]]]] = []
    for i in range(rounds):
        order = ["shoal", "futures"] if i % 2 == 0 else ["futures", "shoal"]
        table: dict[str, dict[str, dict[str, float]]] = {}
        for which in order:
            for name, cells in job(jobs[which], 3).items():
                table.setdefault(name, {}).update(cells)
        each.append(table)
        _print_shares(f"round {i + 1}" if rounds > 1 else "row", table, tools)
    if rounds > 1:
        middle = {
            name: {
                tool: {
                    part: statistics.median(t[name][tool][part] for t in each)
                    for part in each[0][name][tool]
                }
                for tool in each[0][name]
            }
            for name in each[0]
        }
        _print_shares(f"median of {rounds}", middle, tools)


def _print_shares(
    title: str, table: dict[str, dict[str, dict[str, float]]], tools: list[str]
) -> None:
    print(f"{title:28}" + "".join(f"{t:>24}" for t in tools))
    for name, cells in table.items():
        line = f"{name:28}"
        for tool in tools:
            c = cells.get(tool)
            text = (
                ""
                if c is None
                else f"{100 * c['idle']:.1f} ({100 * c['first']:.1f}+{100 * c['gaps']:.1f}"
                f"+{100 * c['last']:.1f})"
            )
            line += f"{text:>24}"
        print(line)


def _best(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each cell's best (lowest) over the rounds."""
    out: dict[str, dict[str, float]] = {}
    for table in rounds:
        for name, cells in table.items():
            row = out.setdefault(name, {})
            for tool, value in cells.items():
                row[tool] = min(row.get(tool, value), value)
    return out


def _medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each cell's median over the rounds."""
    out: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        tools = {tool for table in rounds for tool in table.get(name, {})}
        for tool in tools:
            values = [t[name][tool] for t in rounds if tool in t.get(name, {})]
            out.setdefault(name, {})[tool] = statistics.median(values)
    return out


def _print_wins(rounds: list[dict[str, dict[str, float]]]) -> None:
    """In how many rounds shoal's cell was at or below MPIPoolExecutor's best chunksize."""
    print("rounds in which shoal <= MPIPoolExecutor's best chunksize of that round")
    for name in rounds[0]:
        wins = 0
        for table in rounds:
            cells = table[name]
            theirs = min(v for tool, v in cells.items() if tool.startswith("MPIPool"))
            wins += cells["shoal"] <= theirs
        print(f"{name:28}{wins:>6} of {len(rounds)}")


def _ratios(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """One job's times divided by its row's serial time in that job (rows without one, such
    as the first result in ms, as they are)."""
    out = {}
    for name, cells in table.items():
        serial = cells.get(SERIAL)
        out[name] = {
            tool: value if serial is None else value / serial
            for tool, value in cells.items()
            if tool != SERIAL
        }
    return out


def _print_table(title: str, table: dict[str, dict[str, float]], tools: list[str]) -> None:
    print(f"{title:28}" + "".join(f"{t:>16}" for t in tools))
    for name, cells in table.items():
        line = f"{name:28}"
        for t in tools:
            value = cells.get(t)
            line += f"{'' if value is None else f'{value:.3f}':>16}"
        print(line)


if __name__ == "__main__":
    main()
