"""Progress reporting for a call: ``progress=True`` or ``progress=callable``.

- ``True``: a live bar on stderr drawn by a Rust thread (the driver only sets counters, so it
  costs the hot path nothing). In a Jupyter notebook, a ``tqdm.auto`` bar if tqdm is installed.
- a callable: called with a :class:`ProgressInfo` after every finished chunk, in the driver.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _native


class ProgressInfo(NamedTuple):
    """What a ``progress=`` callable receives."""

    done: int
    failed: int
    total: int | None
    elapsed: float

    @property
    def rate(self) -> float:
        """Items finished per second."""
        return (self.done + self.failed) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, if the total is known."""
        if self.total is None or self.rate == 0:
            return None
        return max(0, self.total - self.done - self.failed) / self.rate


class _Callback:
    def __init__(self, fn: Callable[[ProgressInfo], Any], total: int | None) -> None:
        self.fn, self.total, self.start = fn, total, time.monotonic()

    def update(self, done: int, failed: int) -> None:
        self.fn(ProgressInfo(done, failed, self.total, time.monotonic() - self.start))

    def close(self) -> None:
        pass


class _Tqdm:
    def __init__(self, total: int | None, label: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=label or None)
        self.seen = 0

    def update(self, done: int, failed: int) -> None:
        self.bar.update(done + failed - self.seen)
        self.seen = done + failed
        if failed:
            self.bar.set_postfix(failed=failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules and not sys.stderr.isatty()


def make_progress(progress: Any, total: int | None, label: str) -> Any:
    """A progress sink for ``progress=`` (``None`` when it is off)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        if _in_notebook():
            try:
                return _Tqdm(total, label)
            except ImportError:
                pass
        return _native.ProgressBar(total, label)
    if callable(progress):
        return _Callback(progress, total)
    raise TypeError(f"progress must be True, False or a callable, not {type(progress).__name__}")
