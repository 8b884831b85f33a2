"""Dask and Ray started by the tests themselves, on 127.0.0.1, and stopped by process id.

Each engine is one shoal backend that starts its own cluster (Dask's ``LocalCluster`` of worker
processes, a local Ray). After it is shut down, every process it started (found as descendants
of this test process that appeared with it) must be gone; stragglers are killed by pid, and the
fixture fails, since nothing may outlive a test run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

#: Set in CI: an engine test that cannot run fails instead of skipping.
REQUIRED = os.environ.get("SHOAL_REQUIRE_ENGINES") == "1"


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is gone, only not yet reaped
            out[int(entry)] = int(fields[1])
    return out


def descendants(root: int | None = None) -> set[int]:
    """Live (non-zombie) processes below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    parents = _parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _trackers() -> set[int]:
    return {p for p in descendants() if "multiprocessing.resource_tracker" in _cmdline(p)}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def stop_leftovers(pids: set[int], grace: float = 5.0) -> set[int]:
    """Wait up to ``grace`` s for ``pids`` to end; SIGKILL those still alive. Returns them."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = pids & descendants()
        if not alive:
            return set()
        time.sleep(0.1)
    alive = pids & descendants()
    for pid in sorted(alive):
        print(f"killing leftover {pid}: {_cmdline(pid)}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def engine_backend(name: str, **options):
    """Start a backend on its own local engine; yield it; stop it and check nothing is left."""
    module = {"dask": "distributed", "ray": "ray"}[name]
    try:
        __import__(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed (pip install 'shoal[{name}]'): {exc}")
    import shoal

    before = descendants()
    backend = shoal.get_backend(name, **options)
    backend.cluster_slots()  # start it now, not inside the first test's time limit
    started = descendants() - before - _trackers()
    try:
        yield backend
    finally:
        # The engine's processes now: those it started and their children, and (Dask) the
        # worker processes its nannies started again after a test killed one.
        mine = set(started)
        for pid in started:
            mine |= descendants(pid)
        if name == "dask":
            with contextlib.suppress(Exception):
                mine |= set(backend.client().run(os.getpid).values())
        backend.shutdown(kill=True)
        # Ray's GCS ignores SIGTERM for a long while: a few seconds, then SIGKILL.
        left = stop_leftovers(mine)
    assert not left, f"{name} processes still alive after shutdown (killed now): {sorted(left)}"
