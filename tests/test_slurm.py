"""The slurm backend against a real single-node Slurm (scripts/slurm_up.sh).

The contract suite also runs on Slurm (conftest.BACKENDS); these are Slurm's own cases: killed
array tasks, per-item timeouts, Ctrl-C, per-task resources, where the logs go. Tests that need
no running Slurm (options, refusals, state mapping) run everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import shoal
from shoal.backends._slurm_cli import (
    SlurmError,
    crash_of,
    format_time,
    parse_time,
    sbatch_options,
)

from conftest import slurm_unavailable
from helpers import hog_on, pid_of, segfault_on, sleep_on, sleep_then, square, wait_until


def _jobs(prefix: str) -> list[tuple[str, str]]:
    """``(job id, state)`` of queued array tasks whose job name starts with ``prefix``."""
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i %j %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines()]
    return [(r[0], r[2]) for r in rows if len(r) == 3 and r[1].startswith(prefix)]


def _only_run(root) -> str:
    if not os.path.isdir(root):
        return ""
    runs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    return runs[0] if len(runs) == 1 else ""


@pytest.fixture
def private_slurm(tmp_path):
    """A slurm backend with a run directory of its own, so a test can find its jobs."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    backend = shoal.get_backend("slurm", workers=2, run_dir=tmp_path / "runs")
    yield backend
    backend.shutdown()


def _names_prefix(root) -> str:
    run = _only_run(root)
    return f"shoal-{run}" if run else "\0"


def _kill_first_running_task(root, done: threading.Event) -> None:
    """Wait until a task of the only run under ``root`` runs, then scancel that one task."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done.is_set():
        running = [j for j, state in _jobs(_names_prefix(root)) if state == "RUNNING"]
        if running:
            subprocess.run(["scancel", running[0]], check=True, timeout=30)
            return
        time.sleep(0.1)


# -- against the real Slurm ----------------------------------------------------------------


@pytest.mark.engine
def test_a_scancelled_array_task_with_retries_loses_nothing(private_slurm, tmp_path):
    done = threading.Event()
    killer = threading.Thread(
        target=_kill_first_running_task, args=(tmp_path / "runs", done), daemon=True
    )
    killer.start()
    try:
        got = shoal.map(
            sleep_then,
            range(8),
            kwargs={"seconds": 2.0},
            chunksize=1,
            retries=1,
            backend=private_slurm,
        )
    finally:
        done.set()
        killer.join(30)
    assert got == list(range(8))


@pytest.mark.engine
def test_a_scancelled_task_fails_its_items_and_names_the_log(private_slurm, tmp_path):
    done = threading.Event()
    killer = threading.Thread(
        target=_kill_first_running_task, args=(tmp_path / "runs", done), daemon=True
    )
    killer.start()
    try:
        got = shoal.map(
            sleep_then,
            range(4),
            kwargs={"seconds": 3.0},
            chunksize=1,
            on_error="return",
            backend=private_slurm,
        )
    finally:
        done.set()
        killer.join(30)
    failed = [g for g in got if isinstance(g, BaseException)]
    assert failed, "the cancelled task's items fail"
    assert [g for g in got if not isinstance(g, BaseException)] == [
        i for i, g in enumerate(got) if not isinstance(g, BaseException)
    ]
    for exc in failed:
        assert isinstance(exc, shoal.WorkerCrashedError)
        assert "CANCELLED" in str(exc)
        log = [n for n in exc.__notes__ if ".err" in n]
        assert log, exc.__notes__
        path = log[0].rsplit(" and ", 1)[1]
        assert os.path.exists(path), "the task's log is kept after a failure"


@pytest.mark.engine
def test_an_item_past_its_timeout_fails_alone(slurm):
    started = time.monotonic()
    got = shoal.map(
        sleep_on,
        range(6),
        kwargs={"bad": (2,), "seconds": 60.0},
        timeout=1.5,
        on_error="return",
        backend=slurm,
    )
    assert time.monotonic() - started < 50, "the item was stopped, not waited for"
    assert [g for i, g in enumerate(got) if i != 2] == [0, 1, 3, 4, 5]
    assert isinstance(got[2], shoal.TaskTimeoutError)
    assert got[2].timeout == 1.5
    assert any(".err" in n for n in got[2].__notes__)


@pytest.mark.engine
def test_a_timed_out_item_is_retried_and_its_attempts_recorded(slurm):
    with pytest.raises(shoal.TaskTimeoutError) as info:
        shoal.map(
            sleep_on,
            range(3),
            kwargs={"bad": (1,), "seconds": 60.0},
            timeout=1.0,
            retries=1,
            backend=slurm,
        )
    assert len(info.value.attempts) == 1


@pytest.mark.engine
def test_a_crashing_item_fails_alone_and_its_neighbours_are_not_run_again(slurm, tmp_path):
    got = shoal.map(segfault_on, range(10), on_error="return", backend=slurm)
    assert isinstance(got[3], shoal.WorkerCrashedError)
    assert [g for i, g in enumerate(got) if i != 3] == [2 * i for i in range(10) if i != 3]


@pytest.mark.engine
def test_an_error_names_the_task_log_which_holds_its_output(slurm):
    def noisy(x):
        print(f"output of item {x}", flush=True)
        print(f"complaint of item {x}", file=sys.stderr, flush=True)
        if x == 1:
            raise ValueError("bad")
        return x

    with pytest.raises(ValueError) as info:
        shoal.map(noisy, range(2), chunksize=1, backend=slurm)
    note = next(n for n in info.value.__notes__ if "Slurm array task" in n)
    out_path, err_path = note.split(" is in ")[-1].split(" are in ")[-1].rsplit(" and ", 1)
    out_path = out_path.split()[-1]
    with open(out_path) as f:
        assert "output of item 1" in f.read()
    with open(err_path) as f:
        assert "complaint of item 1" in f.read()


@pytest.mark.engine
def test_ctrl_c_cancels_the_array_and_leaves_nothing_queued(tmp_path):
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / "runs"
    code = f"""
import sys, shoal
sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers import sleep_then
be = shoal.get_backend("slurm", workers=2, run_dir={str(root)!r})
shoal.map(sleep_then, range(6), kwargs={{"seconds": 60}}, chunksize=1, backend=be)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert wait_until(
            lambda: any(s == "RUNNING" for _, s in _jobs(_names_prefix(root))), timeout=60
        ), "no array task started"
        prefix = _names_prefix(root)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err
    assert wait_until(lambda: not _jobs(prefix), timeout=60), _jobs(prefix)
    assert wait_until(lambda: not _processes_mentioning(str(root)), timeout=30)


def _processes_where(what: str, holds: Callable[[bytes], bool]) -> list[int]:
    """Live processes whose ``/proc/<pid>/<what>`` file (cmdline, environ) ``holds``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                if holds(f.read()):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (an array task's batch dir)."""
    return _processes_where("cmdline", lambda data: text.encode() in data)


@pytest.mark.engine
def test_executor_submit_with_resources_runs_alone_with_them(slurm):
    def where(_):
        return os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_CPUS_PER_TASK")

    with shoal.Executor(backend=slurm) as ex:
        plain = ex.submit(where, 0)
        big = ex.submit(where, 1, resources={"cpus_per_task": 2, "time": "00:05:00"})
        plain_job, plain_cpus = plain.result(timeout=60)
        big_job, big_cpus = big.result(timeout=60)
    assert big_cpus == "2" and plain_cpus is None
    assert big_job != plain_job
    with shoal.Executor(backend=slurm) as ex, pytest.raises(ValueError, match="array"):
        ex.submit(where, 0, resources={"array": "0-3"})


@pytest.mark.engine
def test_a_dependant_task_keeps_its_resources(slurm):
    # It waits in the driver for its dependency, then is queued: with its resources, not with
    # a resources= keyword passed on to the function.
    def where(_):
        return os.environ.get("SLURM_CPUS_PER_TASK")

    with shoal.Executor(backend=slurm) as ex:
        first = ex.submit(where, 0)
        then = ex.submit(where, first, resources={"cpus_per_task": 2, "time": "00:05:00"})
        assert then.result(timeout=90) == "2"
        assert first.result() is None


@pytest.mark.engine
def test_a_map_submits_at_most_workers_array_tasks(private_slurm, tmp_path):
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(j for j, _ in _jobs(_names_prefix(tmp_path / "runs")))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        got = shoal.map(sleep_then, range(200), kwargs={"seconds": 0.01}, backend=private_slurm)
    finally:
        stop.set()
        watcher.join(30)
    assert got == list(range(200))
    assert 1 <= len(seen) <= 2, seen


@pytest.mark.engine
def test_the_run_directory_is_private_and_removed_after_a_clean_call(private_slurm, tmp_path):
    root = tmp_path / "runs"
    stream = shoal.imap(square, range(5), backend=private_slurm)
    run = root / _only_run(root)
    assert os.stat(root).st_mode & 0o777 == 0o700
    assert os.stat(run).st_mode & 0o777 == 0o700
    assert list(stream) == [x * x for x in range(5)]
    assert not run.exists()


@pytest.mark.engine
def test_an_item_over_max_worker_memory_fails_alone(slurm):
    got = shoal.map(
        hog_on,
        range(4),
        kwargs={"bad": (1,), "megabytes": 300, "hold": 2.0},
        max_worker_memory="150MB",
        on_error="return",
        backend=slurm,
    )
    assert isinstance(got[1], shoal.WorkerMemoryError)
    assert [g for i, g in enumerate(got) if i != 1] == [0, 2, 3]


@pytest.mark.engine
def test_max_tasks_per_worker_replaces_the_tasks_worker_processes(slurm):
    pids = shoal.map(pid_of, range(4), chunksize=4, max_tasks_per_worker=1, backend=slurm)
    assert len(set(pids)) == 4


def _job_of(_):
    return os.environ["SLURM_JOB_ID"]


@pytest.mark.engine
def test_the_arrays_time_limit_is_derived_from_timeout(slurm):
    # One item per task: 1 x 5 s + the 120 s margin, rounded up to whole minutes.
    jobs = shoal.map(_job_of, range(2), timeout=5, backend=slurm)
    record = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", jobs[0]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert " TimeLimit=00:03:00 " in record, record


def _env_of(name):
    return os.environ.get(name)


@pytest.mark.engine
def test_setup_lines_run_before_python_and_a_failing_one_fails_the_items(tmp_path):
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    good = shoal.get_backend(
        "slurm", workers=1, run_dir=tmp_path, setup=["export SHOAL_SETUP_CHECK=from-setup"]
    )
    assert shoal.map(_env_of, ["SHOAL_SETUP_CHECK"], backend=good) == ["from-setup"]
    bad = shoal.get_backend("slurm", workers=1, run_dir=tmp_path, setup=["exit 3"])
    got = shoal.map(square, range(2), on_error="return", backend=bad)
    for exc in got:
        # Slurm's record of the task, not shoal's own code, says what happened.
        assert isinstance(exc, shoal.WorkerCrashedError)
        assert "FAILED (exit status 3" in str(exc)
        assert any(".err" in note for note in exc.__notes__)


@pytest.mark.engine
def test_an_unknown_partition_is_a_clear_error(tmp_path):
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    backend = shoal.get_backend("slurm", partition="no-such-partition", run_dir=tmp_path)
    with pytest.raises(SlurmError, match=r"(?i)partition"):
        shoal.map(square, range(3), backend=backend)


def _draws(x):
    import random

    import numpy as np

    return (x, random.random(), float(np.random.random()))


@pytest.mark.engine
def test_seeded_streams_and_callbacks_match_a_serial_run(slurm):
    reference = shoal.map(_draws, range(30), seed=1234, backend="serial")
    seen = []
    got = shoal.map(_draws, range(30), seed=1234, callback=seen.append, backend=slurm)
    assert got == reference
    assert sorted(seen) == sorted(reference)


@pytest.mark.engine
def test_shared_and_initializer_reach_the_tasks(slurm):
    got = shoal.map(
        _with_shared, range(4), shared={"k": 10}, initializer=_init, initargs=(5,), backend=slurm
    )
    assert got == [15, 16, 17, 18]


def _init(extra):
    shoal.worker_state()["extra"] = extra


def _with_shared(x):
    return shoal.shared()["k"] + shoal.worker_state()["extra"] + x


# -- without a running Slurm ---------------------------------------------------------------


def test_missing_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = shoal.get_backend("slurm", workers=2, run_dir=tmp_path / "runs")
    with pytest.raises(SlurmError, match="sbatch"):
        shoal.map(square, range(3), backend=backend)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("option", "value"), [("max_load", 0.5), ("max_memory", "1GB")])
def test_limits_slurm_cannot_honour_are_refused(tmp_path, option, value):
    backend = shoal.get_backend("slurm", workers=2, run_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match=option):
        shoal.map(square, range(3), backend=backend, **{option: value})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"time": "soon"}, ValueError),
        ({"time": -3}, ValueError),
        ({"mem": "8 parsecs"}, ValueError),
        ({"cpus_per_task": 0}, ValueError),
        ({"gpus": -1}, ValueError),
        ({"partition": ""}, TypeError),
        ({"setup": "module load x"}, TypeError),
        ({"sbatch_args": [3]}, TypeError),
        ({"poll_interval": 0}, ValueError),
        ({"bogus": 1}, TypeError),
    ],
)
def test_bad_backend_options_fail_at_creation(kwargs, error):
    with pytest.raises(error):
        shoal.get_backend("slurm", **kwargs)


def test_sbatch_options_from_keywords():
    got = sbatch_options(
        {"cpus_per_task": 4, "mem": "8GB", "time": 90, "exclusive": True, "qos": None},
        what="resources",
    )
    assert got == ["--cpus-per-task=4", "--mem=7630M", "--time=00:02:00", "--exclusive"]
    with pytest.raises(ValueError, match="underscores"):
        sbatch_options({"cpus-per-task": 4}, what="resources")
    with pytest.raises(ValueError, match="itself"):
        sbatch_options({"output": "x"}, what="resources")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("05:30", 330), ("02:00:00", 7200), ("1-02", 93600), ("1-00:30:00", 88200)],
)
def test_slurm_time_syntax(text, seconds):
    assert parse_time(text) == seconds


def test_format_time_rounds_up_to_minutes():
    assert format_time(61) == "00:02:00"
    assert format_time(86400 + 3600) == "1-01:00:00"


@pytest.mark.parametrize(
    ("record", "kind", "text"),
    [
        ({"JobState": "FAILED", "ExitCode": "0:9"}, "crashed", "signal 9"),
        ({"JobState": "FAILED", "ExitCode": "3:0"}, "crashed", "exit status 3"),
        ({"JobState": "CANCELLED", "ExitCode": "0:15"}, "crashed", "CANCELLED"),
        ({"JobState": "TIMEOUT", "TimeLimit": "00:01:00"}, "timed_out", "TIMEOUT"),
        ({"JobState": "OUT_OF_MEMORY", "ExitCode": "0:125"}, "memory", "OUT_OF_MEMORY"),
        ({"JobState": "NODE_FAIL"}, "crashed", "NODE_FAIL"),
    ],
)
def test_slurm_states_map_to_shoal_failures(record, kind, text):
    crash = crash_of(record, "Slurm array task 7_1", "/x/t1.out and /x/t1.err", 2**30)
    assert crash is not None and crash.kind == kind and text in crash.exit
    assert "/x/t1.err" in crash.note
    if kind == "timed_out":
        assert crash.limit == 60
    assert crash_of({"JobState": "COMPLETED"}, "t", "", None) is None


@pytest.mark.engine
@pytest.mark.timeout(240)
def test_dask_jobqueue_slurmcluster_runs_on_the_local_slurm(tmp_path):
    """The documented way to run Dask (and shoal's dask backend) inside Slurm."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    from distributed import Client

    name = f"shoal-djq-{os.getpid()}"
    cluster = dask_jobqueue.SLURMCluster(
        cores=1,
        processes=1,
        memory="1GB",
        walltime="00:05:00",
        job_name=name,
        python=sys.executable,
        # The test node declares no memory, so a --mem request could never be met.
        job_directives_skip=["--mem"],
        # No nanny: it would start the worker through multiprocessing, whose named semaphores
        # in /dev/shm outlive a worker killed by scancel (this node's /dev/shm is the tests').
        nanny=False,
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        # The worker's HTTP server (health, metrics; on even with --no-dashboard) on loopback too.
        worker_extra_args=[
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        local_directory=str(tmp_path),
        log_directory=str(tmp_path / "logs"),
    )
    try:
        cluster.scale(jobs=1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)

            # Defined here, so pickled by value: the worker cannot import the tests' helpers.
            def cube(x):
                return x**3

            assert client.submit(cube, 4).result(timeout=60) == 64
            if "dask" in shoal.available_backends():  # shoal's dask backend, where present
                assert shoal.map(cube, range(20), backend="dask") == [x**3 for x in range(20)]
    finally:
        cluster.close()
    assert wait_until(lambda: not _jobs(name), timeout=60), _jobs(name)
    # The job's Dask worker can outlive its job: its batch shell exits first, the worker is
    # reparented to init, and proctrack/linuxproc no longer finds it. Ours are those whose
    # environment names this test's job.
    for pid in _processes_of_job(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _processes_of_job(name: str) -> list[int]:
    """Processes whose environment says they belong to the Slurm job called ``name``."""
    wanted = f"SLURM_JOB_NAME={name}".encode()
    return _processes_where("environ", lambda data: wanted in data.split(b"\0"))


def test_a_skipped_engine_test_fails_when_engines_are_required(tmp_path):
    """The conftest hook CI relies on: SHOAL_REQUIRE_ENGINES=1 turns an engine skip into a
    failure, and leaves other skips alone."""
    conftest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
    # Only the hook, not the whole conftest (its session fixtures check this machine's state).
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('real', {conftest!r})\n"
        "real = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(real)\n"
        "pytest_runtest_makereport = real.pytest_runtest_makereport\n"
    )
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.engine\n"
        "def test_needs_engine():\n"
        "    pytest.skip('no engine here')\n"
        "def test_plain_skip():\n"
        "    pytest.skip('not an engine test')\n"
    )

    def run(require: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "SHOAL_REQUIRE_ENGINES": require}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )

    relaxed = run("0")
    assert relaxed.returncode == 0, relaxed.stdout
    assert "2 skipped" in relaxed.stdout
    strict = run("1")
    assert strict.returncode == 1, strict.stdout
    assert "1 failed" in strict.stdout and "1 skipped" in strict.stdout
    assert "no engine here" in strict.stdout
