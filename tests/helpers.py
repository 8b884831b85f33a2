"""Module-level functions for the tests (picklable by reference in worker processes)."""

from __future__ import annotations

import os
import sys
import time


def square(x):
    return x * x


def add(x, y):
    return x + y


def affine(x, a=1, b=0):
    return a * x + b


def describe(*args, **kwargs):
    return (args, dict(sorted(kwargs.items())))


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def sleep_then(x, seconds=0.01):
    time.sleep(seconds)
    return x


def pid_of(_):
    return os.getpid()


def slow_pid(_):
    time.sleep(0.02)
    return os.getpid()


def exit_on(x, bad=3):
    if x == bad:
        sys.exit(5)
    return x


def crash_on(x, bad=3):
    if x == bad:
        os._exit(7)
    return x


def crash_late(x, bad=2, after=0.5):
    """Item ``bad`` kills its worker ``after`` seconds in (time for the next task to queue)."""
    if x == bad:
        time.sleep(after)
        os._exit(7)
    return x


def return_lambda(x):
    return lambda: x


def return_unpicklable(x):
    import threading

    return threading.Lock() if x == 2 else x


class UnbuildableError(Exception):
    """An exception that pickles but cannot be rebuilt from its pickle."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_unbuildable(x):
    raise UnbuildableError(x, "y")


def segfault_on(x, bad=(3,)):
    if x in bad:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x * 2


def sleep_on(x, bad=(2,), seconds=30.0):
    if x in bad:
        time.sleep(seconds)
    return x


def hold_array(x, arr=None, seconds=30.0):
    """Sleeps holding a (large, shared-memory) array argument."""
    time.sleep(seconds)
    return x + int(arr[0])


def hog_on(x, bad=(1,), megabytes=400, hold=3.0):
    if x in bad:
        block = bytearray(megabytes * 2**20)
        for i in range(0, len(block), 4096):  # touch every page so it is resident
            block[i] = 1
        time.sleep(hold)
    return x


_LEAK = []


def leak(x, megabytes=40):
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _LEAK.append(block)
    return os.getpid()


def busy(x, n=2000):
    total = 0
    for i in range(n):
        total += i
    return x + total - total


def fail_first_time(x, marker_dir, exc="crash"):
    """Fails on its first run for each x (marker files), succeeds afterwards."""
    marker = os.path.join(marker_dir, f"item-{x}")
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        if exc == "crash":
            os._exit(9)
        raise ValueError(f"transient failure of {x}")
    return x


def always_crash(x):
    os._exit(3)


def big_result(x, megabytes=3):
    return b"x" * (megabytes * 2**20)


def chatty(x, megabytes=2):
    sys.stdout.write("y" * (megabytes * 2**20) + "\n")
    sys.stdout.flush()
    return x


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout=10.0):
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def run_script(code: str, timeout: float = 60, env: dict | None = None):
    """Run Python ``code`` in a fresh interpreter that sees this test run's ``sys.path``."""
    import subprocess
    import textwrap

    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def thread_env(_=None):
    """The thread-limit variables a worker was started with."""
    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS")


def mark_after(x, marker_dir, seconds=0.0):
    """Leaves a marker when it starts, sleeps, then one when it ends: whether the task ran
    to its end."""
    with open(os.path.join(marker_dir, f"start-{x}"), "w"):
        pass
    time.sleep(seconds)
    with open(os.path.join(marker_dir, f"done-{x}"), "w"):
        pass
    return x


class Payload:
    """A result that can be watched with a weak reference (travels by reference)."""

    def __init__(self, x):
        self.x = x


def make_payload(x):
    return Payload(x)


class Holder:
    """An object whose bound method is submitted: the executor must not keep it alive."""

    def __init__(self, data):
        self.data = data

    def size(self):
        return len(self.data)


def logged_run(x, log_dir, seconds=0.05, crash=-1):
    """Appends a line to ``log_dir/run-x`` each time it runs, sleeps, and kills its worker
    when ``x == crash``."""
    with open(os.path.join(log_dir, f"run-{x}"), "a") as f:
        f.write("ran\n")
    time.sleep(seconds)
    if x == crash:
        os._exit(11)
    return x


def note_pid_then_sleep(x, marker_dir, seconds=0.01):
    """Leaves this worker's pid in ``marker_dir`` (for tests that kill workers), then sleeps."""
    with open(os.path.join(marker_dir, str(os.getpid())), "a"):
        pass
    time.sleep(seconds)
    return x


def log_then_sleep(x, path, seconds=0.2):
    """Appends ``x`` to ``path`` when it starts (shows what ran), then sleeps."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    time.sleep(seconds)
    return x


def slow_first_time(x, marker_dir, bad=(1,), seconds=60.0):
    """Item ``x`` in ``bad`` sleeps ``seconds`` on its first run only (marker files)."""
    marker = os.path.join(marker_dir, f"slow-{x}")
    if x in bad and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        time.sleep(seconds)
    return x


def worker_address_and_sum(x, seconds=0.02):
    """Where this item ran (the Dask worker's address) and ``x`` plus the shared array's sum."""
    import distributed

    import shoal

    time.sleep(seconds)
    return distributed.get_worker().address, x + int(shoal.shared().sum())
