"""Validation of the options every API shares, so bad input fails before any work starts."""

from __future__ import annotations

import numbers
from typing import Any

from . import _native

ON_ERROR_CHOICES = ("raise", "return")


def cpu_count() -> int:
    """Number of CPUs this process may use.

    Unlike :func:`os.cpu_count`, this honours the CPU affinity mask (``taskset``), cgroup v1/v2
    CPU quotas (containers) and a Slurm allocation (``SLURM_CPUS_PER_TASK``,
    ``SLURM_CPUS_ON_NODE``). A fractional quota is rounded up.

    Returns
    -------
    int
        At least 1.
    """
    return int(_native.cpu_count())


def resolve_workers(workers: Any) -> int:
    """Turn a ``workers`` option into a worker count.

    Parameters
    ----------
    workers : int, float or None
        ``None``: all usable CPUs; an int >= 1: that many; a float in (0, 1): that fraction of
        the usable CPUs (at least 1).

    Raises
    ------
    TypeError
        If ``workers`` is not a number (``True``/``False`` included).
    ValueError
        If it is 0, negative, or a float outside (0, 1).
    """
    if workers is None:
        return cpu_count()
    if isinstance(workers, bool) or not isinstance(workers, numbers.Real):
        raise TypeError(
            f"workers must be an int, a float in (0, 1) or None, not {type(workers).__name__}"
        )
    if isinstance(workers, numbers.Integral):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        return int(workers)
    if not 0.0 < float(workers) < 1.0:
        raise ValueError(
            f"a float workers is a fraction of the usable CPUs and must be in (0, 1), got {workers}"
        )
    return max(1, int(float(workers) * cpu_count()))


def check_chunksize(chunksize: Any) -> int | None:
    """Validate ``chunksize``: ``None`` (adaptive) or an int >= 1."""
    if chunksize is None:
        return None
    if isinstance(chunksize, bool) or not isinstance(chunksize, numbers.Integral):
        raise TypeError(f"chunksize must be an int or None, not {type(chunksize).__name__}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be at least 1, got {chunksize}")
    return int(chunksize)


def check_on_error(on_error: Any) -> str:
    """Validate ``on_error``: ``"raise"`` or ``"return"``."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
    return str(on_error)


def check_timeout(timeout: Any) -> float | None:
    """Validate a per-item ``timeout`` in seconds: ``None`` or a positive number."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if not float(timeout) > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return float(timeout)


def check_retries(retries: Any) -> int:
    """Validate ``retries``: an int >= 0."""
    if isinstance(retries, bool) or not isinstance(retries, numbers.Integral):
        raise TypeError(f"retries must be an int, not {type(retries).__name__}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    return int(retries)


def check_retry_on(retry_on: Any) -> tuple[type[BaseException], ...]:
    """Validate ``retry_on``: an exception type or a tuple of them."""
    if retry_on is None:
        return ()
    types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"retry_on must hold exception types, got {t!r}")
    return types


def check_int(value: Any, name: str, minimum: int) -> int | None:
    """Validate an optional int option: ``None``, or an int (not a bool) >= ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_max_tasks(n: Any, name: str = "max_tasks_per_worker") -> int | None:
    """Validate a count option such as ``max_tasks_per_worker``: ``None`` or an int >= 1."""
    return check_int(n, name, 1)


def check_seed(seed: Any) -> int | None:
    """Validate ``seed``: ``None`` or an int >= 0."""
    return check_int(seed, "seed", 0)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value: Any, name: str = "max_worker_memory") -> int | None:
    """Bytes from ``None``, an int, or a string such as ``"2GB"``, ``"512 MiB"`` or ``"1.5G"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GB', not a bool")
    if isinstance(value, numbers.Real):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            number = float(digits)
        except ValueError:
            raise ValueError(
                f"{name}: cannot read {value!r} as a size (try '2GB' or '512MiB')"
            ) from None
        if unit not in _UNITS:
            raise ValueError(
                f"{name}: unknown unit {unit!r} in {value!r} (use B, KB, MB, GB, KiB, MiB, GiB)"
            )
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a string like '2GB', not {type(value).__name__}"
        )
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


def check_max_load(value: Any) -> float | None:
    """Validate ``max_load``: ``None`` or a fraction of all CPUs in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"max_load must be a fraction of all CPUs, not {type(value).__name__}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"max_load is a fraction of all CPUs and must be in (0, 1], got {value}")
    return float(value)


def check_max_memory(value: Any) -> int | None:
    """``max_memory`` in bytes: a fraction in (0, 1] of the machine's RAM, or a size."""
    if value is None:
        return None
    if isinstance(value, float) and 0.0 < value <= 1.0:
        total = _native.total_memory()
        if not total:
            raise ValueError("max_memory as a fraction needs /proc/meminfo, which is unreadable")
        return int(value * total)
    return parse_memory(value, "max_memory")
