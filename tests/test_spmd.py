"""shoal.spmd: one function on N ranks with collectives, on local processes and under mpiexec."""

from __future__ import annotations

import json
import math
import operator
import os
import signal
import sys
import threading

import numpy as np
import pytest

import shoal
import shoal.spmd
from shoal.spmd import SpmdError

from mpi_helpers import mpi_missing, mpiexec, write

# A test below lets a rank die under mpiexec: its Open MPI segments are removed after the module.
pytestmark = pytest.mark.usefixtures("mpi_leftovers")


def step(data, scale):
    comm = shoal.spmd.comm()
    part = comm.scatter(np.array_split(data, comm.size) if comm.is_main else None)
    total = comm.allreduce(float(part.sum()) * scale, op=operator.add)
    return comm.rank, total


def every_collective(tag):
    comm = shoal.spmd.comm()
    out = {"rank": comm.rank, "size": comm.size, "main": comm.is_main, "tag": tag}
    out["bcast"] = comm.bcast({"from": comm.rank} if comm.rank == 1 else None, root=1)
    out["scatter"] = comm.scatter([[i] * i for i in range(comm.size)] if comm.is_main else None)
    out["gather"] = comm.gather(comm.rank * 2, root=2)
    out["allgather"] = comm.allgather(comm.rank)
    out["reduce"] = comm.reduce(comm.rank + 1, op=operator.mul)
    out["allreduce_max"] = comm.allreduce(comm.rank, op=max)
    out["allreduce_lambda"] = comm.allreduce([comm.rank], op=lambda a, b: a + b)
    comm.barrier()
    if comm.rank == 0:
        comm.send("to two", dest=2, tag=7)
        comm.send("to one", dest=1)
    if comm.rank in (1, 2):
        out["recv"] = comm.recv(source=0, tag=7 if comm.rank == 2 else None)
    out["on_main"] = comm.on_main(os.getpid)
    arr = comm.allreduce(np.full(1000, comm.rank, dtype=np.float64))
    out["array"] = float(arr[0])
    return out


def check_every_collective(results, size):
    assert [r["rank"] for r in results] == list(range(size))
    main_pid = results[0]["on_main"]
    for r in results:
        rank = r["rank"]
        assert r["size"] == size and r["main"] == (rank == 0) and r["tag"] == "t"
        assert r["bcast"] == {"from": 1}
        assert r["scatter"] == [rank] * rank
        assert r["gather"] == ([0, 2, 4, 6][:size] if rank == 2 else None)
        assert r["allgather"] == list(range(size))
        assert r["reduce"] == (math.factorial(size) if rank == 0 else None)
        assert r["allreduce_max"] == size - 1
        assert r["allreduce_lambda"] == list(range(size))
        assert r.get("recv") == {1: "to one", 2: "to two"}.get(rank)
        assert r["on_main"] == main_pid
        assert r["array"] == sum(range(size))


def test_the_issue_example():
    data = np.arange(1000.0)
    got = shoal.spmd.run(step, data, 2.0, ranks=4)
    assert got == [(r, data.sum() * 2.0) for r in range(4)]


def test_every_collective_on_local_processes():
    check_every_collective(shoal.spmd.run(every_collective, "t", ranks=4), 4)


def test_ranks_are_distinct_processes_and_default_to_the_cpus():
    pids = shoal.spmd.run(os.getpid)
    assert len(pids) == shoal.cpu_count() and len(set(pids)) == len(pids)
    assert os.getpid() not in pids


def test_one_rank_works():
    assert shoal.spmd.run(every_collective_one, ranks=1) == [[0]]


def every_collective_one():
    comm = shoal.spmd.comm()
    return comm.allgather(comm.rank) if comm.bcast(1) == 1 else None


def raise_on(bad):
    comm = shoal.spmd.comm()
    if comm.rank == bad:
        raise KeyError(f"rank {bad} failed")
    comm.barrier()  # the others wait here forever unless they are stopped
    return comm.rank


def test_an_exception_on_one_rank_stops_the_others_and_names_the_rank():
    with pytest.raises(KeyError, match="rank 2 failed") as info:
        shoal.spmd.run(raise_on, 2, ranks=3, timeout=60)
    assert "shoal.spmd: raised on rank 2 of 3" in info.value.__notes__
    assert isinstance(info.value.__cause__, shoal.RemoteTraceback)
    # The pool is usable afterwards.
    assert shoal.spmd.run(raise_on, -1, ranks=3) == [0, 1, 2]


def die_on(bad):
    comm = shoal.spmd.comm()
    if comm.rank == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return comm.allgather(comm.rank)


def test_a_dead_rank_gives_worker_crashed_error():
    with pytest.raises(shoal.WorkerCrashedError) as info:
        shoal.spmd.run(die_on, 1, ranks=3, timeout=60)
    assert info.value.index == 1
    assert "shoal.spmd: on rank 1 of 3" in info.value.__notes__


def recv_forever():
    comm = shoal.spmd.comm()
    if comm.rank == 1:
        return comm.recv(source=0, tag=99)
    return None


def swapped_order():
    comm = shoal.spmd.comm()
    if comm.rank == 0:
        comm.bcast(1)
        comm.gather(2)
    else:
        comm.gather(2)
        comm.bcast(None)


@pytest.mark.parametrize("fn", [recv_forever, swapped_order])
def test_unmatched_recv_or_collectives_in_another_order_time_out(fn):
    with pytest.raises(shoal.TaskTimeoutError) as info:
        shoal.spmd.run(fn, ranks=2, timeout=2.5)
    if fn is swapped_order:
        assert any("different collectives" in n for n in info.value.__notes__)


def bad_scatter():
    comm = shoal.spmd.comm()
    return comm.scatter(list(range(comm.size + 1)) if comm.is_main else None)


def test_scatter_with_the_wrong_number_of_parts_is_a_value_error():
    with pytest.raises(ValueError, match="gave 3 parts for 2 ranks"):
        shoal.spmd.run(bad_scatter, ranks=2, timeout=30)


def unpicklable_bcast():
    comm = shoal.spmd.comm()
    return comm.bcast(threading.Lock() if comm.is_main else None)


def test_an_unpicklable_object_in_a_collective_is_named():
    with pytest.raises(shoal.PicklingError, match=r"bcast on rank 0 \(<unlocked _thread.lock"):
        shoal.spmd.run(unpicklable_bcast, ranks=2, timeout=30)


def test_comm_outside_run_is_a_clear_error():
    with pytest.raises(SpmdError, match=r"outside shoal\.spmd\.run"):
        shoal.spmd.comm()


@pytest.mark.parametrize(
    ("ranks", "error"), [(0, ValueError), (-2, ValueError), (2.0, TypeError), ("2", TypeError)]
)
def test_bad_ranks(ranks, error):
    with pytest.raises(error, match="ranks"):
        shoal.spmd.run(os.getpid, ranks=ranks)


def test_bad_backend_and_timeout():
    with pytest.raises(ValueError, match="'processes' and 'mpi'"):
        shoal.spmd.run(os.getpid, ranks=2, backend="threads")
    with pytest.raises(ValueError, match="timeout"):
        shoal.spmd.run(os.getpid, ranks=2, timeout=0)


# -- under mpiexec ---------------------------------------------------------------------------

SPMD_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import numpy as np
import shoal, shoal.spmd
from test_spmd import every_collective, check_every_collective, raise_on, step, recv_forever
from test_spmd import bad_scatter, unpicklable_bcast

world = shoal.spmd.comm()  # outside run, inside an MPI job: the world
size = world.size
out = {{"world": [world.rank, size]}}
results = shoal.spmd.run(every_collective, "t")
check_every_collective(results, size)
out["collectives"] = True
data = np.arange(1000.0)
out["step"] = shoal.spmd.run(step, data, 2.0) == [(r, data.sum() * 2.0) for r in range(size)]
for name, fn, kwargs in [
    ("raise", raise_on, {{"bad": 1}}),
    ("timeout", recv_forever, {{"timeout": 1.0}}),
    ("scatter", bad_scatter, {{}}),
    ("pickle", unpicklable_bcast, {{"timeout": 30}}),
    ("ranks", os.getpid, {{"ranks": size + 1}}),
]:
    try:
        shoal.spmd.run(fn, **kwargs)
        out[name] = None
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc), getattr(exc, "__notes__", [])]
out["after"] = shoal.spmd.run(raise_on, -1)
try:
    out["map"] = shoal.map(abs, [-1, -2], backend="mpi")
except shoal.ShoalError as exc:
    out["map"] = str(exc)
out["launch"] = shoal.mpi.is_launch_mode()
print("RESULT", world.rank, json.dumps(out), flush=True)
"""


def _check_mpi_results(stdout, ranks):
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            _, rank, text = line.split(" ", 2)
            results[int(rank)] = json.loads(text)
    assert sorted(results) == ranks, stdout
    for rank, out in results.items():
        assert out["world"] == [rank, 3]
        assert out["collectives"] is True and out["step"] is True
        name, message, notes = out["raise"]
        assert name == "KeyError" and "rank 1 failed" in message  # the same type on every rank
        assert "shoal.spmd: raised on rank 1 of 3" in notes
        assert out["timeout"][0] == "TaskTimeoutError"
        assert out["scatter"][0] == "ValueError" and "gave 4 parts for 3 ranks" in out["scatter"][1]
        assert out["ranks"][0] == "ValueError" and "must be None or 3" in out["ranks"][1]
        assert out["pickle"][0] == "PicklingError" and "bcast on rank 0" in out["pickle"][1]
        assert out["after"] == [0, 1, 2]
        if out["launch"]:
            assert out["map"] == [1, 2]
        else:  # plain mpiexec: every rank runs the script, so no rank serves map()
            assert "needs launch mode" in out["map"]


@pytest.mark.engine
@pytest.mark.skipif(bool(mpi_missing()), reason=str(mpi_missing()))
@pytest.mark.parametrize("launcher", ["plain", "shoal.mpi"])
def test_spmd_under_mpiexec_runs_on_every_rank(tmp_path, launcher):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = write(tmp_path, SPMD_SCRIPT.format(tests=tests))
    prefix = [] if launcher == "plain" else ["-m", "shoal.mpi"]
    res = mpiexec([sys.executable, *prefix, str(script)], n=3, timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    # Plain mpiexec: every rank runs the script; launch mode: rank 0 only.
    _check_mpi_results(res.stdout, [0, 1, 2] if launcher == "plain" else [0])


@pytest.mark.engine
@pytest.mark.skipif(bool(mpi_missing()), reason=str(mpi_missing()))
def test_spmd_unhandled_error_prints_once_and_a_dead_rank_ends_the_job(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = write(
        tmp_path,
        f"""
        import sys
        sys.path.insert(0, {tests!r})
        import shoal.spmd
        from test_spmd import raise_on, die_on
        if sys.argv[1] == "raise":
            shoal.spmd.run(raise_on, 2)
        else:
            shoal.spmd.run(die_on, 1)
        """,
    )
    res = mpiexec([sys.executable, str(script), "raise"], n=3, timeout=60)
    assert res.returncode != 0
    assert res.stderr.count("KeyError: 'rank 2 failed'") == 2  # the cause and the error, once
    assert res.stderr.count("The above exception was the direct cause") == 1
    res = mpiexec([sys.executable, str(script), "die"], n=3, timeout=60)
    assert res.returncode != 0
    assert "process rank 1 " in res.stdout + res.stderr, res.stderr


def test_shoal_spmd_is_there_after_a_plain_import_shoal():
    import subprocess

    code = "import os, shoal; print(len(set(shoal.spmd.run(os.getpid, ranks=2))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2", out.stderr
