"""Where the workers' time goes during one call: computing, or idle.

Each item reports when it started and ended in its worker (:func:`workloads.timed_spin`). Over a
call of wall time ``T`` on ``W`` workers, the workers had ``T * W`` of time; the items used
``busy`` of it; the rest was idle: before a worker's first item, between its items (waiting for
the next chunk, or for the tool's own work between items) and after its last one while others
still ran. Unlike a ratio to a serial loop, this share does not depend on how fast the machine
was that minute, so two tools compare in few calls; what it leaves out is how fast the items
themselves ran (two busy workers slow each other on this machine's shared cores, and a tool
that keeps both busy pays that more often).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any


def idle_shares(
    spans: list[tuple[float, float, int]], start: float, end: float, workers: int
) -> dict[str, float]:
    """The idle share of the time of ``workers`` workers during a call that ran from ``start``
    to ``end``, and its parts: ``first`` (before each worker's first item; all of the call for a
    worker that got none), ``gaps`` (between items) and ``last`` (after each worker's last
    item). ``spans`` are ``(start, end, pid)`` per item."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for began, ended, pid in spans:
        by_pid.setdefault(pid, []).append((began, ended))
    total = (end - start) * max(workers, len(by_pid))
    unused = max(0, workers - len(by_pid))
    first, gaps, last = unused * (end - start), 0.0, 0.0
    for items in by_pid.values():
        items.sort()
        first += items[0][0] - start
        last += end - items[-1][1]
        gaps += sum(b[0] - a[1] for a, b in itertools.pairwise(items))
    busy = sum(ended - began for began, ended, _ in spans)
    return {
        "idle": 1.0 - busy / total,
        "first": first / total,
        "gaps": gaps / total,
        "last": last / total,
    }


def measure(
    mappers: dict[str, Callable[[Callable[..., Any], list[Any]], list[Any]]],
    rows: dict[str, list[Any]],
    repeat: int,
    fn: Callable[..., Any],
    workers: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """For each row and tool (with ``workers`` workers), the median of each share over
    ``repeat`` calls."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, xs in rows.items():
        for tool, mapper in mappers.items():
            calls = []
            for _ in range(repeat):
                start = time.perf_counter()
                spans = mapper(fn, xs)
                calls.append(idle_shares(spans, start, time.perf_counter(), workers))
            out.setdefault(name, {})[tool] = {
                part: statistics.median(c[part] for c in calls) for part in calls[0]
            }
    return out
