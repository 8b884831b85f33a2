"""What every SPMD communicator offers, built on a few primitives each transport provides."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from functools import reduce as _fold
from typing import Any

from .._errors import PicklingError, ShoalError


class SpmdError(ShoalError):
    """Misuse of :mod:`shoal.spmd` (``comm()`` outside ``run``, a bad rank...)."""


def pickled(obj: Any, what: str, rank: int, segments: Any = None) -> bytes:
    """``obj`` pickled for another rank (large buffers into ``segments``, a
    :class:`shoal._shm.SegmentCache`, if given); a :class:`~shoal.PicklingError` naming it if it
    cannot be pickled."""
    from .._pickling import dumps

    try:
        return dumps(obj, segments)
    except Exception as exc:
        try:
            text = repr(obj)[:80]
        except Exception:
            text = f"<{type(obj).__name__} object>"
        raise PicklingError(
            f"shoal.spmd: the object passed to {what} on rank {rank} ({text}) cannot be "
            f"pickled: {exc}"
        ) from exc


class Comm:
    """The communicator of one SPMD rank (see :func:`shoal.spmd.comm`).

    Attributes
    ----------
    rank : int
        This rank, from 0.
    size : int
        Number of ranks.
    """

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    # -- primitives a transport implements --------------------------------------------------

    def _check_root(self, root: int, what: str) -> int:
        if isinstance(root, bool) or not isinstance(root, int):
            raise TypeError(f"{what}: root must be an int rank, not {type(root).__name__}")
        if not 0 <= root < self.size:
            raise ValueError(f"{what}: root {root} is not a rank (size {self.size})")
        return root

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """``obj`` of rank ``root``, on every rank."""
        raise NotImplementedError

    def scatter(self, seq: Sequence[Any] | None = None, root: int = 0) -> Any:
        """Part ``rank`` of ``seq`` (exactly ``size`` parts, given at ``root``)."""
        raise NotImplementedError

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Every rank's ``obj``, as a list by rank at ``root``; ``None`` elsewhere."""
        raise NotImplementedError

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send ``obj`` to rank ``dest``."""
        raise NotImplementedError

    def recv(self, source: int | None = None, tag: int | None = None) -> Any:
        """Receive an object sent to this rank (``None``: from any rank, with any tag)."""
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------------------

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, as a list by rank, on every rank."""
        return self.bcast(self.gather(obj, root=0), root=0)  # type: ignore[no-any-return]

    def reduce(self, obj: Any, op: Callable[[Any, Any], Any] = operator.add, root: int = 0) -> Any:
        """``op`` folded over every rank's ``obj`` in rank order, at ``root``; ``None`` elsewhere.

        ``op`` is any associative binary callable (``operator.add``, ``max``, a lambda).
        """
        if not callable(op):
            raise TypeError(f"reduce: op must be a binary callable, not {type(op).__name__}")
        parts = self.gather(obj, root=root)
        if parts is None:
            return None
        return _fold(op, parts)

    def allreduce(self, obj: Any, op: Callable[[Any, Any], Any] = operator.add) -> Any:
        """``op`` folded over every rank's ``obj``, on every rank."""
        return self.bcast(self.reduce(obj, op=op, root=0), root=0)

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
        self.allgather(None)

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on rank 0; return its result on every rank."""
        return self.bcast(fn(*args) if self.is_main else None, root=0)

    def __repr__(self) -> str:
        return f"<shoal.spmd comm rank {self.rank} of {self.size}>"
