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
