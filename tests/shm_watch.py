"""Which files in /dev/shm this test run made: a watcher for the session check of conftest.py.

/dev/shm is shared by the whole machine: other test runs, loky's and multiprocessing's
semaphores and other tools' segments come and go in it while this run lasts, and a name says
nothing of who made it. So a thread looks at /dev/shm twice a second, and for each new file
finds the processes that hold it (open or mapped, as its maker does while it uses it; about
50 ms of /proc reading per look that finds new files). A
file is this run's when one of them is this process, a descendant of it, or a process whose
environment carries this run's tag (a Slurm job, which the test process did not start itself
but whose environment ``sbatch`` exported). A file that was made, abandoned and left within one
look is not seen held by anyone: it is not counted (see :meth:`ShmWatch.unattributed`).
"""

from __future__ import annotations

import contextlib
import os
import threading

SHM = "/dev/shm"
#: Environment variable that carries this run's tag to every process the run starts.
TAG_VARIABLE = "SHOAL_TEST_RUN"


def _listdir() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                out[int(entry)] = int(stat.rsplit(b")", 1)[1].split()[1])
    return out


def _holders(names: set[str]) -> dict[str, set[int]]:
    """For each of ``names``, the pids that have ``/dev/shm/<name>`` open or mapped."""
    paths = {f"{SHM}/{name}": name for name in names}
    found: dict[str, set[int]] = {name: set() for name in names}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        maps = _read(f"/proc/{pid}/maps").decode(errors="replace")
        for path, name in paths.items():
            if path in maps:
                found[name].add(pid)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in paths:
                        found[paths[target]].add(pid)
    return found


class ShmWatch:
    """Watches /dev/shm from :meth:`start` to :meth:`stop` (see the module docs)."""

    def __init__(self, tag: str, interval: float = 0.5) -> None:
        self.tag = f"{TAG_VARIABLE}={tag}".encode()
        self.interval = interval
        self.before: set[str] = set()
        self.ours: set[str] = set()
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shm-watch", daemon=True)

    def start(self) -> None:
        self.before = _listdir()
        self.seen = set(self.before)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.look()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.look()

    def _is_ours(self, pid: int, parents: dict[int, int]) -> bool:
        me, seen = os.getpid(), set()
        walk = pid
        while walk > 1 and walk not in seen:
            if walk == me:
                return True
            seen.add(walk)
            walk = parents.get(walk, 0)
        return self.tag in _read(f"/proc/{pid}/environ").split(b"\0")

    def look(self) -> None:
        """Attribute the files that appeared since the last look."""
        new = _listdir() - self.seen
        if not new:
            return
        self.seen |= new
        holders = _holders(new)
        parents = _parents()
        for name, pids in holders.items():
            if any(self._is_ours(pid, parents) for pid in pids):
                self.ours.add(name)

    def left(self) -> list[str]:
        """This run's files still in /dev/shm."""
        return sorted(self.ours & _listdir())

    def unattributed(self) -> list[str]:
        """Files that appeared during the run, are still there, and were never seen held."""
        return sorted((_listdir() - self.before) - self.ours)
