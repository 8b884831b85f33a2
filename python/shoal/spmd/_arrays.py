"""numpy arrays between the local ranks of one run, through shared memory: never pickled, and
never through the coordinator, which only sees a few bytes of description per rank.

Each rank's process owns one shared-memory segment (a memfd: no file in ``/dev/shm``, freed by
the kernel once no process holds it, crashes included). The peers of a collective map it by
``/proc/<pid>/fd/<fd>``. It is kept, mapped and already faulted in, across collectives and
across runs while the worker process lives (an idle worker exits after 30 s), because the first
touch of fresh shared pages costs more than the copy into them. It grows when an array does
not fit; older segments go once no peer maps them.

A ``bcast``, ``gather`` or ``allgather`` of an array is a copy into the sender's segment, an
exchange of shapes and dtypes through the coordinator, and a copy out by the receivers.
An ``allreduce`` on ``n`` ranks is a reduce-scatter followed by an allgather, all in place:

1. every rank copies the parts of its array that the others reduce (part ``s`` of ``n`` for
   every ``s`` other than its own rank) into its segment, at the same offsets;
2. it tells the coordinator its segment, dtype, shape and op; when every rank has, the
   coordinator checks that they agree (or raises :class:`ValueError` on every rank) and
   answers each with every segment;
3. rank ``r`` folds part ``r`` of every rank's array, in rank order (its own part from its own
   array), into part ``r`` of its own segment: the ``n`` parts are reduced in parallel;
4. a barrier; then each rank copies part ``s`` of segment ``s``, for every ``s``, into a new
   array of its own, which it returns.

Part ``s`` of segment ``s`` is the one part read after the barrier, and the next reduce writes
it only after its own exchange, which every rank has joined, so has finished reading: as long
as the parts fall where they did (the same number of items of the same size), the next reduce
places its parts before the exchange, with no extra wait. Otherwise, and when a ``bcast``,
``gather`` or ``allgather`` (which place a whole array before their exchange) follows a
reduce, the ranks first meet once more. Those three end with a barrier, after which nothing
reads the segments. The result is a fresh array in private memory: cheaper than mapping shared pages
(which fault one at a time), and it aliases nothing.
"""

from __future__ import annotations

import operator
import os
import sys
import uuid
from typing import Any

#: Smallest array that ``bcast``, ``gather`` and ``allgather`` place in a segment (bytes).
PLACE_MIN = 1 << 16
#: Segments are sized in whole multiples of this, so that slightly larger arrays reuse them.
_GRANULE = 2 * 2**20

# This process's segment: (segment, shared mapping, reference given to peers).
_own: tuple[Any, Any, tuple[int, int, int, str]] | None = None
# Peers' segments mapped here: token -> (pid, mapping), least recently used first.
_peers: dict[str, tuple[int, Any]] = {}
#: Most peers' segments kept mapped (the processes of earlier runs may be gone).
_MAPPED = 16
# (ufunc, dtype) -> whether the ufunc maps two arrays of that dtype to one of the same dtype.
_keeps_dtype: dict[tuple[Any, Any], bool] = {}


def _reset_after_fork() -> None:
    # A child of a rank is not that rank: it must not hand out the parent's segment.
    global _own
    _own = None
    _peers.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def ufunc_for(obj: Any, op: Any, size: int) -> Any | None:
    """The numpy ufunc that computes ``op`` elementwise on ``obj`` if ``obj`` is an array that
    can take the shared-memory path with it; ``None`` for the generic (pickled) path.

    ``op`` must be ``operator.add``, ``mul``, ``and_``, ``or_``, ``xor`` or a binary numpy
    ufunc that keeps the array's dtype (``np.maximum``, ``np.minimum``, ``np.add``...): then
    ``op(a, b)`` of two such arrays is exactly ``ufunc(a, b)``, so the fold gives the same
    values either way.
    """
    if size < 2 or not is_plain_array(obj):
        return None
    np = sys.modules["numpy"]
    if isinstance(op, np.ufunc):
        ufunc = op
    else:
        try:
            ufunc = _operator_ufuncs(np).get(op)
        except TypeError:  # an unhashable callable
            return None
    if ufunc is None or ufunc.nin != 2 or ufunc.nout != 1:
        return None
    key = (ufunc, obj.dtype)
    keeps = _keeps_dtype.get(key)
    if keeps is None:
        one = np.ones(1, obj.dtype)
        try:
            with np.errstate(all="ignore"):
                keeps = ufunc(one, one).dtype == obj.dtype
        except Exception:  # the ufunc has no loop for this dtype
            keeps = False
        _keeps_dtype[key] = keeps
    return ufunc if keeps else None


def _operator_ufuncs(np: Any) -> dict[Any, Any]:
    return {
        operator.add: np.add,
        operator.mul: np.multiply,
        operator.and_: np.bitwise_and,
        operator.or_: np.bitwise_or,
        operator.xor: np.bitwise_xor,
    }


def is_plain_array(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty numpy array of plain (not object, not structured) items."""
    np = sys.modules.get("numpy")  # no array can exist without numpy imported
    return (
        np is not None
        and type(obj) is np.ndarray
        and obj.size > 0
        and not obj.dtype.hasobject
        and obj.dtype.fields is None
    )


def worth_placing(obj: Any) -> bool:
    """Whether ``bcast``/``gather``/``allgather`` should pass ``obj`` through the segments: an
    array of at least :data:`PLACE_MIN` bytes (smaller ones are cheaper pickled, in the
    coordinator's one round trip, than placed and waited for)."""
    return is_plain_array(obj) and obj.nbytes >= PLACE_MIN


def describe(obj: Any) -> str:
    """A few words on ``obj`` for an error message that compares ranks."""
    if is_plain_array(obj):
        return f"a {obj.dtype} array of shape {obj.shape}"
    return f"a {type(obj).__name__}"


def bounds(count: int, size: int) -> list[int]:
    """Where each rank's part of ``count`` items starts (and, last, where the parts end)."""
    return [count * s // size for s in range(size + 1)]


def own(nbytes: int) -> tuple[Any, tuple[int, int, int, str]]:
    """This process's segment (at least ``nbytes``): its shared mapping and the reference that
    peers map it by."""
    global _own
    if _own is None or _own[0].size < nbytes:
        from .. import _native

        _own = None  # the old one goes once no peer maps it
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        segment = _native.Segment.zeroed(size)
        mapping = _native.Mapping(segment.fd, size, shared=True)
        _own = (segment, mapping, (os.getpid(), segment.fd, size, uuid.uuid4().hex))
    return _own[1], _own[2]


def peers(refs: list[tuple[int, int, int, str] | None], rank: int) -> list[Any]:
    """The mappings of the segments ``refs`` (by rank; this rank's own at ``rank``; None where
    a rank named none). Peers' segments stay mapped for the next collectives; one that a peer
    replaced is unmapped, and so are the oldest beyond :data:`_MAPPED`."""
    mappings: list[Any] = []
    for r, ref in enumerate(refs):
        if ref is None:
            mappings.append(None)
        elif r == rank:
            assert _own is not None
            mappings.append(_own[1])
        else:
            pid, fd, size, token = ref
            mapping = _peers.pop(token, None)
            if mapping is None:
                for old in [t for t, m in _peers.items() if m[0] == pid]:
                    del _peers[old]  # the peer's earlier, smaller segment
                mapping = (pid, _map(pid, fd, size))
            _peers[token] = mapping  # the most recently used last
            mappings.append(mapping[1])
    while len(_peers) > _MAPPED:
        del _peers[next(iter(_peers))]
    return mappings


def _map(pid: int, fd: int, size: int) -> Any:
    from .. import _native

    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        return _native.Mapping(handle, size, shared=True)
    finally:
        os.close(handle)


def flat(buffer: Any, dtype: Any, count: int) -> Any:
    """The first ``count`` items of ``buffer`` as a 1-d array of ``dtype``."""
    np = sys.modules["numpy"]
    return np.frombuffer(buffer, dtype=dtype, count=count)
