"""The mpi backend against a real Open MPI (the PyPI wheel): launch mode, the contract suite run
on MPI ranks, fault isolation, and the ends of a job (Ctrl-C, rank 0 killed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mpi_helpers import (
    ISOLATE,
    LAUNCH_ENV,
    MPIEXEC,
    env,
    kill_group,
    launch,
    mpiexec,
    needs_mpi,
    processes_named,
    write,
)

pytestmark = [*needs_mpi, pytest.mark.usefixtures("mpi_leftovers")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_mode_runs_the_script_on_rank_0_with_mpi_as_default(tmp_path):
    script = write(
        tmp_path,
        """
        import json, os, sys
        import shoal

        def square(x):
            return x * x

        def where(x):
            from shoal import _execute

            rank = int(os.environ.get("SHOAL_MPI_RANK", "-1"))
            return os.getpid(), rank, _execute.REPORT_INTERVAL

        if __name__ == "__main__":
            rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
            pool = shoal.get_backend().pool()
            places = shoal.map(where, range(300), chunksize=1)
            # The pool size on MPI is the relays' workers: rank 0's CPUs are not counted.
            import shoal._options as options
            counted, real_count = [], options.cpu_count
            options.cpu_count = lambda: counted.append(1) or real_count()
            with shoal.Executor() as ex:
                future = ex.submit(square, 9)
                got = future.result()
            options.cpu_count = real_count
            print(json.dumps({
                "executor_cpu_counts": len(counted),
                "argv": sys.argv,
                "backend": shoal.get_backend().name,
                "rank": rank,
                "map": shoal.map(square, range(500)) == [x * x for x in range(500)],
                "starmap": shoal.starmap(pow, [(2, 5), (3, 2)]),
                "imap": list(shoal.imap(square, iter(range(5)))),
                "executor": got,
                "relays": pool.relays,
                "ranks_used": sorted({r for _, r, _ in places}),
                "workers_used": len({p for p, _, _ in places}),
                "report_intervals": sorted({i for _, _, i in places}),
            }))
        """,
    )
    res = launch(script, "--flag", "x y")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["argv"] == [str(script), "--flag", "x y"]
    assert got["backend"] == "mpi"
    assert got["rank"] == 0
    assert got["map"] is True
    assert got["starmap"] == [32, 9]
    assert got["imap"] == [0, 1, 4, 9, 16]
    assert got["executor"] == 81
    assert got["executor_cpu_counts"] == 0
    assert sorted(r[0] for r in got["relays"]) == [1, 2]
    assert got["ranks_used"] == [1, 2]  # tasks ran on the serving ranks, never on rank 0
    assert got["workers_used"] >= 2
    # A relay's workers report a long chunk's finished items less often than local ones: each
    # report is a message to rank 0.
    from shoal.mpi._relay import REPORT_INTERVAL_S

    assert got["report_intervals"] == [REPORT_INTERVAL_S]


@pytest.mark.timeout(300)
def test_contract_suite_passes_on_the_mpi_backend():
    # The backend contract suite itself, run by pytest on rank 0 of a launched job.
    res = mpiexec(
        [
            sys.executable,
            "-m",
            "shoal.mpi",
            "-m",
            "pytest",
            "tests/test_contract.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "--color=no",
        ],
        # About 85 s on a loaded 2-core machine; kept below the test's own limit, so that a hung
        # job is killed here, by process group.
        timeout=280,
        cwd=ROOT,
        SHOAL_TEST_BACKENDS="mpi",
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "[mpi]" not in res.stdout or " passed" in res.stdout
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


def test_crash_timeout_memory_and_error_fail_only_their_item_and_name_rank_and_host(tmp_path):
    script = write(
        tmp_path,
        """
        import ctypes, json, os, socket, time
        import shoal

        def task(x):
            if x == 3:
                ctypes.string_at(0)  # segfault
            if x == 5:
                os._exit(7)
            if x == 7:
                time.sleep(60)
            if x == 9:
                raise KeyError(x)
            return x

        def hog(x):
            if x == 1:
                block = bytearray(400 * 2**20)  # resident: bytearray zero-fills
                time.sleep(2)
            return x

        memory = shoal.map(hog, range(3), on_error="return", max_worker_memory="200MB")
        print(json.dumps([type(v).__name__ for v in memory]))
        out = shoal.map(task, range(12), on_error="return", timeout=2.0)
        print(json.dumps([
            [type(v).__name__, getattr(v, "rank", None), getattr(v, "host", None),
             getattr(v, "__notes__", [])] if isinstance(v, BaseException) else v
            for v in out
        ] + [socket.gethostname()]))
        """,
    )
    res = launch(script, timeout=90)
    assert res.returncode == 0, res.stderr
    memory_line, last = res.stdout.strip().splitlines()[-2:]
    assert json.loads(memory_line) == ["int", "WorkerMemoryError", "int"]
    *out, host = json.loads(last)
    crashed, timed_out = "WorkerCrashedError", "TaskTimeoutError"
    failed = {3: crashed, 5: crashed, 7: timed_out, 9: "KeyError"}
    for i, value in enumerate(out):
        if i not in failed:
            assert value == i
            continue
        name, rank, where, notes = value
        assert name == failed[i]
        assert rank in (1, 2) and where == host
        assert f"shoal: on rank {rank} (host {host})" in notes
        assert any(f"item {i}" in note for note in notes)


def test_an_unhandled_error_prints_one_traceback_and_sets_the_exit_status(tmp_path):
    script = write(
        tmp_path,
        """
        import shoal

        def boom(x):
            if x == 4:
                raise ValueError("bad input four")
            return x

        shoal.map(boom, range(10))
        """,
    )
    res = launch(script)
    assert res.returncode != 0
    assert res.stderr.count("Traceback (most recent call last)") == 2  # remote cause + local
    assert res.stderr.count("ValueError: bad input four") == 2
    assert "shoal: on rank" in res.stderr and "raised by item 4" in res.stderr


def test_exit_status_of_rank_0_is_the_jobs(tmp_path):
    script = write(tmp_path, "import shoal, sys\nshoal.map(abs, [1])\nsys.exit(3)\n")
    assert launch(script).returncode == 3
    assert launch(write(tmp_path, "print('fine')\n", "ok.py")).returncode == 0


def test_missing_script_is_a_clear_error(tmp_path):
    res = launch(tmp_path / "nope.py")
    assert res.returncode == 2
    assert res.stderr.count("cannot open script") == 1  # printed once, by rank 0


def test_a_single_rank_warns_and_uses_local_processes(tmp_path):
    script = write(
        tmp_path,
        """
        import shoal
        print(shoal.get_backend().name, sum(shoal.map(abs, range(-50, 50))))
        """,
    )
    res = launch(script, n=1)
    assert res.returncode == 0, res.stderr
    assert "single MPI rank" in res.stderr
    assert res.stdout.split() == ["processes", "2500"]


def test_missing_mpi4py_says_how_to_install(tmp_path):
    # A site directory that shadows mpi4py with a module that fails to import.
    shadow = tmp_path / "shadow"
    (shadow / "mpi4py").mkdir(parents=True)
    (shadow / "mpi4py" / "__init__.py").write_text("raise ImportError('no mpi4py here')\n")
    code = (
        "import shoal\n"
        "try:\n    shoal.map(abs, [1], backend='mpi')\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env(), "PYTHONPATH": str(shadow)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "MPIUnavailableError" in out.stdout and "pip install shoal[mpi]" in out.stdout


def _start_job(tmp_path, marker):
    # mpiexec stops forwarding output once it is interrupted: rank 0 reports to a file.
    script = write(
        tmp_path,
        f"""
        import time
        import shoal

        def slow(x):
            time.sleep(30)
            return x

        try:
            open({str(tmp_path / "started")!r}, "w").close()
            shoal.map(slow, range(8), chunksize=1)
        except KeyboardInterrupt:
            with open({str(tmp_path / "seen")!r}, "w") as f:
                f.write("rank 0 saw KeyboardInterrupt")
            raise
        """,
    )
    proc = subprocess.Popen(
        [
            *ISOLATE,
            str(env()["PATH"].split(os.pathsep)[0] + "/mpiexec"),
            "-n",
            "3",
            sys.executable,
            "-m",
            "shoal.mpi",
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(SHOAL_TEST_JOB=marker, **LAUNCH_ENV),
        start_new_session=True,
    )
    # Wait until rank 0 runs the map and the slow tasks run on the relays' workers.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (tmp_path / "started").exists() and len(processes_named(marker)) >= 3 + 1 + 2:
            break  # mpiexec, 3 ranks, >= 2 workers
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def _gone_within(marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not processes_named(marker):
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_on_mpiexec_ends_every_rank_and_worker(tmp_path):
    marker = uuid.uuid4().hex
    proc = _start_job(tmp_path, marker)
    try:
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: mpiexec's process group
        out, err = proc.communicate(timeout=30)
        assert _gone_within(marker, 3.0), processes_named(marker)
        assert time.monotonic() - t0 < 5.0  # the 2 s, plus slack for a loaded machine
        assert (tmp_path / "seen").read_text() == "rank 0 saw KeyboardInterrupt", (out, err)
        assert proc.returncode != 0
    finally:
        kill_group(proc)


def test_rank_0_killed_ends_every_rank_and_worker(tmp_path):
    marker = uuid.uuid4().hex
    proc = _start_job(tmp_path, marker)
    try:
        rank0 = [
            pid
            for pid in processes_named(marker)
            if b"shoal.mpi" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"OMPI_COMM_WORLD_RANK=0\0" in Path(f"/proc/{pid}/environ").read_bytes()
        ]
        assert len(rank0) == 1
        os.kill(rank0[0], signal.SIGKILL)
        assert _gone_within(marker, 10.0), processes_named(marker)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
    finally:
        kill_group(proc)


def test_spawn_mode_from_plain_python(tmp_path):
    marker = uuid.uuid4().hex
    script = write(
        tmp_path,
        """
        import json, os
        import shoal

        def square(x):
            return x * x

        def crash(x):
            if x == 2:
                os._exit(3)
            return x

        if __name__ == "__main__":
            backend = shoal.get_backend("mpi", workers=2)
            pool = backend.pool()
            squares = shoal.map(square, range(200), backend=backend)
            crashed = shoal.map(crash, range(4), backend=backend, on_error="return")
            print(json.dumps({
                "relays": pool.relays,
                "squares": squares == [x * x for x in range(200)],
                "crashed": [type(v).__name__ for v in crashed],
            }))
            backend.shutdown()
        """,
    )
    res = subprocess.run(
        [*ISOLATE, sys.executable, str(script)],
        env=env(SHOAL_TEST_JOB=marker),
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(r[0], r[2]) for r in got["relays"]] == [(0, 1), (1, 1)]  # one worker per rank
    assert got["squares"] is True
    assert got["crashed"] == ["int", "int", "WorkerCrashedError", "int"]
    assert _gone_within(marker, 10.0), processes_named(marker)


def test_large_fixed_arguments_cross_as_raw_buffers(tmp_path):
    script = write(
        tmp_path,
        """
        import functools, json
        import numpy as np
        import shoal

        def pick(i, arr, scale=1.0):
            arr[i] += 1  # a task's copy is its own (copy-on-write), as on the processes backend
            return float(arr[i]) * scale

        arr = np.arange(2_000_000, dtype=np.float64)  # 16 MB: over the shared-memory threshold
        other = np.ones(500_000)
        print(json.dumps({
            "args": shoal.map(pick, range(0, 2_000_000, 250_000), args=(arr,), kwargs={"scale": 2}),
            "partial": shoal.map(functools.partial(pick, arr=arr), [5, 7]),
            "shared": shoal.map(pick, [1], args=(other,), shared=arr, initializer=None),
            "unchanged": bool(arr[5] == 5.0),
        }))
        """,
    )
    res = launch(script, timeout=90)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["args"] == [2 * (i + 1.0) for i in range(0, 2_000_000, 250_000)]
    assert got["partial"] == [6.0, 8.0]
    assert got["shared"] == [2.0]
    assert got["unchanged"] is True


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces); this test runs in .ci/run"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 (ip) and unshare are needed for simulated hosts"
    return None


#: The simulated hosts' private network (scripts/netns_hosts.sh).
BRIDGE = "10.201.0.0/24"


@pytest.fixture
def two_hosts():
    """Two simulated hosts (network namespaces on a private bridge), removed afterwards."""
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    prefix = f"shoal{os.getpid() % 100000}"
    script = os.path.join(ROOT, "scripts", "netns_hosts.sh")
    made = subprocess.run([script, "up", prefix, "2"], capture_output=True, text=True, timeout=30)
    try:
        if made.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
        yield [f"{prefix}-h1", f"{prefix}-h2"]
    finally:
        subprocess.run([script, "down", prefix, "2"], capture_output=True, timeout=30)


def test_ranks_on_two_simulated_hosts_talk_over_the_network(tmp_path, two_hosts):
    first, second = two_hosts
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{first} slots=1\n{second} slots=2\n")
    script = write(
        tmp_path,
        """
        import json, os, socket
        import numpy as np
        import shoal

        def where(x, arr):
            if x == 3:
                os._exit(1)
            return socket.gethostname(), float(arr[x])

        got = shoal.map(where, range(20), args=(np.arange(1e6),), on_error="return")
        print(json.dumps({
            "rank0": socket.gethostname(),
            "relays": shoal.get_backend().pool().relays,
            "ok": [v for i, v in enumerate(got) if i != 3],
            "crash": [type(got[3]).__name__, got[3].rank, got[3].host],
        }))
        """,
    )
    mpiexec_cmd = (
        f"hostname {first}; exec {MPIEXEC} -n 2 --hostfile {hostfile} --map-by node "
        f"{sys.executable} -m shoal.mpi {script}"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", first, "unshare", "--uts", "/bin/sh", "-c", mpiexec_cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(
            PRTE_MCA_plm_ssh_agent=os.path.join(ROOT, "scripts", "netns_rsh.sh"),
            # Ranks and daemons talk over the simulated hosts' private bridge only (their
            # namespaces have no other network but loopback).
            OMPI_MCA_btl_tcp_if_include=BRIDGE,
            PRTE_MCA_prte_if_include=BRIDGE,
        ),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"the two-host job hung\n{out}\n{err}")
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out + err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["rank0"] == first
    assert [(r[0], r[1]) for r in got["relays"]] == [(1, second)]
    assert got["ok"] == [[second, float(i)] for i in range(20) if i != 3]
    assert got["crash"] == ["WorkerCrashedError", 1, second]


def test_a_spawn_that_fails_names_the_mpi_library(tmp_path):
    # As root, Open MPI's runtime refuses to start without PRTE_ALLOW_RUN_AS_ROOT: a real spawn
    # failure, with nothing faked.
    if os.geteuid() != 0:
        pytest.skip("the spawn failure used here (prte refusing root) needs root")
    script = write(
        tmp_path,
        """
        import shoal
        from mpi4py import MPI
        try:
            shoal.map(abs, [1], backend="mpi", workers=2)
        except shoal.ShoalError as exc:
            print(type(exc).__name__, "|", exc, "|", MPI.Get_library_version().splitlines()[0])
        """,
    )
    run_env = env()
    for name in ("PRTE_ALLOW_RUN_AS_ROOT", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM"):
        run_env.pop(name)
    res = subprocess.run(
        [*ISOLATE, sys.executable, str(script)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    name, message, library = res.stdout.strip().splitlines()[-1].split(" | ")
    assert name == "MPIUnavailableError"
    assert "could not spawn 2 MPI ranks" in message and library.strip() in message


def test_a_task_may_use_mpi4py_itself(tmp_path):
    # Workers of a serving rank must not take themselves for that rank: MPI_Init would hang.
    script = write(
        tmp_path,
        """
        import shoal

        def world(x):
            from mpi4py import MPI
            return MPI.COMM_WORLD.Get_size()

        print(shoal.map(world, range(2), timeout=30))
        """,
    )
    res = launch(script, timeout=90)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[1, 1]"


def test_idle_ranks_do_not_spin(tmp_path):
    # Open MPI's blocking receives poll at 100 % CPU; relays, and rank 0's receiver thread, wait
    # with probes and sleeps (woken by doorbells on one host) instead.
    script = write(
        tmp_path,
        """
        import json, os, time
        import shoal, shoal.mpi

        def cpu(pid):
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        with shoal.Executor() as ex:  # an open session: the relays expect work
            ex.submit(abs, 1).result()
            shoal.map(abs, range(100))  # the relays have served: now they wait
            pids = [relay.pid for relay in shoal.mpi._launch.relays.values()] + [os.getpid()]
            before, start = [cpu(p) for p in pids], time.monotonic()
            time.sleep(3.0)
            wall = time.monotonic() - start
            shares = [(cpu(p) - b) / wall for p, b in zip(pids, before)]
            bells = [r.bell is not None for r in shoal.mpi._launch.relays.values()]
        print(json.dumps({"shares": shares, "bells": bells}))
        """,
    )
    res = launch(script, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["shares"]) == 3
    for share in got["shares"]:
        assert share < 0.10  # a spinning rank would use about 1.0
    assert got["bells"] == [True, True]  # relays of rank 0's host are rung, not only probed


def test_a_bell_wakes_its_waiter_and_a_missing_one_says_so(monkeypatch):
    from shoal.mpi import _wire
    from shoal.mpi._wire import Bell, Poller, Ringer

    bell = Bell.create()
    if bell is None:
        pytest.skip("doorbells are abstract Unix sockets: Linux only")
    ringer = Ringer()
    try:
        assert not bell.wait(0.0)
        assert ringer.ring(bell.name)
        assert ringer.ring(bell.name)
        assert bell.wait(5.0) == 2  # both rings, consumed by one wake
        assert not bell.wait(0.0)
        poller = Poller(shortest=1e-3, longest=30.0, bell=bell)
        poller.delay = 30.0
        ringer.ring(bell.name)
        began = time.monotonic()
        poller.sleep()
        assert time.monotonic() - began < 15.0  # woken by the ring, not the 30 s timeout
        assert poller.expected == 1  # its message is on its way: probe again very soon
        assert poller.delay < poller.shortest
        poller.received()
        assert (poller.expected, poller.delay) == (0, poller.shortest)
        # A process with over a thousand files open: the bell is beyond select(), and polled.
        monkeypatch.setattr(_wire, "SELECT_LIMIT", 0)
        assert not bell.wait(0.0)
        ringer.ring(bell.name)
        assert bell.wait(5.0) == 1
        gone = bell.name
    finally:
        bell.close()
    assert not ringer.ring(gone)
