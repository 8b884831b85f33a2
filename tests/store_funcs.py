"""Module-level functions for the store and CLI tests (picklable by reference in workers)."""

from __future__ import annotations

import os
import random
import sys
import threading
import time


def triple(x):
    return 3 * x


def other(x):
    return x


def fails_when_flagged(x, flag="", bad=(3, 5)):
    """Fails for ``bad`` inputs while the file ``flag`` exists."""
    if x in bad and flag and os.path.exists(flag):
        raise ValueError(f"flagged {x}")
    return x * 10


def counted(x, log):
    """Appends its input to the file ``log`` (one line per call), so tests count calls."""
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x + 1


def slow(x, seconds=0.05):
    time.sleep(seconds)
    return x * 2


def draw(_x):
    return random.random()


def noisy(x, lines=1):
    for i in range(lines):
        print(f"out {x} {i}")
    print(f"err {x}", file=sys.stderr)
    if x == 2:
        raise RuntimeError("noisy two")
    return x


def unpicklable(x):
    return threading.Lock() if x == 1 else x


def big_array(x):
    import numpy as np

    return {"x": x, "a": np.full(300_000, float(x))}  # 2.4 MB: stored raw


def text(x, suffix="!"):
    return f"{x}{suffix}"


def not_a_function():
    return 0


NOT_CALLABLE = 42


def echo(x):
    """Returns its input: plain values of every kind go through the store and come back."""
    return x


def echo_pair(x, s, extra):
    return (x, s, extra)
