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
