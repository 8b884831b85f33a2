"""Large buffers travel through shared memory instead of the channel.

Pickle protocol 5 can hand out-of-band buffers (numpy arrays, bytearrays, anything exporting a
contiguous buffer) to a callback instead of copying them into the pickle. When the driver pickles
a call's spec or a chunk, each such buffer of at least :data:`THRESHOLD` bytes is copied once
into a :class:`shoal._native.Segment` (an anonymous memfd), and the pickle carries only its
reference: ``(driver pid, fd, size)``. A worker maps the segment through
``/proc/<pid>/fd/<fd>`` privately (copy-on-write): the array it gets is writable, and writes
stay in that worker, so the caller's array never changes.

A :class:`SegmentCache` belongs to one call (session): the same buffer (one array passed as a
fixed argument, in a ``functools.partial``, a closure, or in many items) is copied at most once
per call, and every segment is closed when the call ends. A driver's cache also looks in
:func:`kept`, segments kept *across* calls and keyed by content: a call that passes the same
bytes as an earlier one (a sampler or an optimiser calling ``map`` at every step with the same
data) reuses that segment, paying a hash (memory speed) instead of a copy into fresh pages.
memfd segments have no file in ``/dev/shm``: the kernel frees their memory once no process
holds them, so crashes and Ctrl-C leave nothing behind. If a segment cannot be made (memory
limits, file descriptors), the buffer simply goes in-band, through the channel.

Results travel the same way in the other direction, with one difference: a worker may exit (or
be killed) right after answering, so the driver cannot rely on opening the worker's descriptors
later. A worker's :class:`ResultSegments` therefore copies each large buffer of a result into a
segment and the segments' descriptors are *passed* with the result frame (``SCM_RIGHTS``, see
``shoal-core``'s ``fdpass``). The driver maps them when it unpickles the result and closes the
descriptors at once: the memory lives exactly as long as the arrays built on it.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from collections import OrderedDict

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

#: Buffers at least this large go through shared memory (``SHOAL_SHM_THRESHOLD`` bytes).
THRESHOLD = int(os.environ.get("SHOAL_SHM_THRESHOLD", str(1 << 20)))
#: Prefix of a payload whose buffers are in shared memory (never the start of a pickle).
MAGIC = b"SHM\x00"
#: Prefix of a list in the compact plain encoding (``shoal_core::plain``): ints, floats,
#: strings, bytes, booleans and None, packed by Rust without pickle.
PLAIN = b"PLN\x01"
#: Most segments passed with one result frame (the protocol's limit); more go in-band.
MAX_RESULT_SEGMENTS = 64


class KeptSegments:
    """Segments kept across calls, keyed by ``(size, content hash)``; bounded and released
    when idle.

    A call acquires a segment for each large buffer it sends (made on a miss) and releases it
    when it ends. A segment no call uses stays for :attr:`idle` seconds, and the least
    recently used idle ones go first when the total would pass :attr:`budget` bytes. The kept
    bytes never change (the driver never writes into a segment), so a worker mapping one always
    sees the data it was sent, and changed data has another hash: it is never served stale.
    """

    def __init__(self, budget: int, idle: float) -> None:
        self.budget = budget
        self.idle = idle
        self._lock = threading.Lock()
        # key -> [segment, users, last release time]; least recently used first
        self._entries: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        self._bytes = 0
        self._timer: threading.Timer | None = None
        #: Lookups answered without a copy, and segments made (for tests and benchmarks).
        self.hits = 0
        self.made = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by kept segments."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, view: memoryview) -> tuple[tuple[int, int], Any, bool] | None:
        """``(key, segment, made)`` holding ``view``'s bytes, counted as in use until
        :meth:`release`; ``None`` if it should not be kept (too large for the budget)."""
        from . import _native

        if view.nbytes > self.budget:
            return None
        key = (view.nbytes, _native.content_hash(view))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                self._entries.move_to_end(key)
                self.hits += 1
                return key, entry[0], False
            self._make_room(view.nbytes)
            if self._bytes + view.nbytes > self.budget:
                return None  # the rest is in use: this call owns its own copy
        segment = _native.Segment(view)  # the copy, outside the lock
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # another thread made it meanwhile
                entry[1] += 1
                self.hits += 1
                segment.close()
                return key, entry[0], False
            self._entries[key] = [segment, 1, 0.0]
            self._bytes += view.nbytes
            self.made += 1
            return key, segment, True

    def release(self, key: tuple[int, int]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                entry[2] = time.monotonic()
                self._schedule_sweep()

    def _make_room(self, nbytes: int) -> None:
        for key, (segment, users, _) in list(self._entries.items()):
            if self._bytes + nbytes <= self.budget:
                return
            if users == 0:
                self._drop(key, segment)

    def _drop(self, key: tuple[int, int], segment: Any) -> None:
        del self._entries[key]
        self._bytes -= key[0]
        segment.close()  # workers that still map it keep their pages

    def _schedule_sweep(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.idle, self.sweep)
            self._timer.daemon = True
            self._timer.start()

    def sweep(self, older_than: float | None = None) -> None:
        """Drop segments no call has used for ``older_than`` seconds (default :attr:`idle`)."""
        limit = self.idle if older_than is None else older_than
        now = time.monotonic()
        with self._lock:
            self._timer = None
            for key, (segment, users, released) in list(self._entries.items()):
                if users == 0 and now - released >= limit:
                    self._drop(key, segment)
            if any(users == 0 for _, users, _ in self._entries.values()):
                self._schedule_sweep()

    def clear(self) -> None:
        """Drop every segment no call uses."""
        self.sweep(0.0)

    def _forget_after_fork(self) -> None:
        # A forked child inherits the entries (and copies of their descriptors) but none of the
        # calls that use them, nor the sweep thread: start empty.
        self._lock = threading.Lock()
        self._entries = OrderedDict()
        self._bytes = 0
        self._timer = None


def _default_budget() -> int:
    from . import _native

    configured = os.environ.get("SHOAL_SEGMENT_CACHE_BYTES")
    if configured is not None:
        return int(configured)
    total = _native.total_memory() or 8 * 2**30
    return min(total // 4, 16 * 2**30)


_kept: KeptSegments | None = None


def kept() -> KeptSegments:
    """The driver's segments kept across calls (made on first use: workers never need it)."""
    global _kept
    if _kept is None:
        _kept = KeptSegments(
            _default_budget(), float(os.environ.get("SHOAL_SEGMENT_CACHE_IDLE", "30"))
        )
        os.register_at_fork(after_in_child=_kept._forget_after_fork)
    return _kept


class SegmentCache:
    """The segments of one call: one per distinct large buffer, closed together.

    With ``keep``, segments come from :func:`kept` (content-keyed, shared with later calls)
    when they fit its budget, and are released rather than closed when the call ends.
    """

    #: Most segments this cache makes; beyond, buffers go in-band.
    limit: int | None = None

    def __init__(self, keep: bool = False) -> None:
        # (id of the exporter, size) -> (segment, exporter, position in this cache, content
        # hash of a kept segment or None)
        self._segments: dict[tuple[int, int], tuple[Any, Any, int, int | None]] = {}
        self._pid = os.getpid()
        self._kept: list[Any] = []
        self._keep = keep
        self._acquired: list[tuple[int, int]] = []  # keys of kept segments in use
        self._borrowed: set[int] = set()  # positions of segments that are kept ones
        self.failed = False
        #: Bytes copied into segments made so far (memory this cache holds).
        self.made_bytes = 0

    def _segment(self, view: memoryview) -> tuple[int, Any, int | None] | None:
        """``(position, segment, content hash if kept)`` of the segment holding ``view``'s
        bytes, made on first use; ``None`` if none can be had."""
        from . import _native

        key = (id(view.obj), view.nbytes)
        hit = self._segments.get(key)
        if hit is None:
            position = len(self._segments)
            if self.limit is not None and position >= self.limit:
                return None
            content: int | None = None
            try:
                got = kept().acquire(view) if self._keep else None
                if got is None:
                    segment, made = _native.Segment(view), True
                else:
                    self._acquired.append(got[0])
                    self._borrowed.add(position)
                    segment, made, content = got[1], got[2], got[0][1]
            except (OSError, ValueError):
                self.failed = True
                return None
            # Keep the exporter alive: its id must not be reused for another buffer.
            hit = self._segments[key] = (segment, view.obj, position, content)
            if made:
                self.made_bytes += view.nbytes
        return hit[2], hit[0], hit[3]

    def ref(self, view: memoryview) -> tuple[int, ...] | None:
        """A reference to a segment holding ``view``'s bytes, or ``None`` to send it in-band."""
        if _SHARED:
            found = _find_shared(view)
            if found is not None:
                # Already in shared memory (shoal.share): no copy. The exporter stays alive
                # until the call ends, so the segment cannot go while a worker may open it.
                self._kept.append(view.obj)
                return (self._pid, *found)
        made = self._segment(view)
        if made is None:
            return None
        _, segment, content = made
        if content is not None:
            # A kept segment: its bytes never change, so a worker may keep its mapping for
            # later calls that send the same content (see _map).
            return (self._pid, segment.fd, segment.size, 0, -1, content)
        return (self._pid, segment.fd, segment.size)

    def close(self) -> None:
        for segment, _, position, _ in self._segments.values():
            if position not in self._borrowed:
                segment.close()
        for key in self._acquired:  # kept segments stay for later calls
            kept().release(key)
        self._acquired.clear()
        self._borrowed.clear()
        self._segments.clear()
        self._kept.clear()


#: Arrays placed in shared memory by :func:`share`: mapping address -> (size, segment).
_SHARED: dict[int, tuple[int, Any]] = {}


def _find_shared(view: memoryview) -> tuple[int, int, int, int] | None:
    """``(fd, segment size, offset, length)`` if ``view`` lies in a :func:`share` segment."""
    from . import _native

    try:
        start, length = _native.buffer_span(view)
    except (BufferError, ValueError):
        return None
    for base, (size, segment) in _SHARED.items():
        if base <= start and start + length <= base + size:
            return (segment.fd, size, start - base, length)
    return None


def _forget(address: int) -> None:
    entry = _SHARED.pop(address, None)
    if entry is not None:
        entry[1].close()


def allocate(nbytes: int, data: Any = None) -> Any:
    """A writable buffer (a :class:`shoal._native.Mapping`) of ``nbytes`` in a new shared-memory
    segment, zero-filled or holding a copy of ``data``; it is registered so that calls pass it
    to workers by reference, without copying."""
    import weakref

    from . import _native

    segment = _native.Segment.zeroed(nbytes) if data is None else _native.Segment(data)
    mapping = _native.Mapping(segment.fd, nbytes, shared=True)
    _SHARED[mapping.address] = (nbytes, segment)
    # When the last array on this memory is gone, the segment goes too (workers that mapped it
    # keep their own mappings).
    weakref.finalize(mapping, _forget, mapping.address)
    return mapping


class ResultSegments(SegmentCache):
    """The segments of one result, in a worker: referenced by their position in :meth:`fds`,
    whose descriptors are passed with the result frame."""

    limit = MAX_RESULT_SEGMENTS

    def ref(self, view: memoryview) -> int | None:  # type: ignore[override]
        made = self._segment(view)
        return None if made is None else made[0]

    def fds(self) -> list[int]:
        """Descriptors of the segments, in reference order."""
        return [segment.fd for segment, _, _, _ in self._segments.values()]


def dumps(obj: Any, cache: SegmentCache | None, dump: Callable[..., bytes] = pickle.dumps) -> bytes:
    """Pickle ``obj`` (with ``dump``: pickle's or cloudpickle's), large buffers by reference."""
    if cache is None:
        return dump(obj, 5)
    refs: list[Any] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if view.nbytes < THRESHOLD:
            return True
        ref = cache.ref(view)
        if ref is None:
            return True
        refs.append(ref)
        return False

    body = dump(obj, 5, buffer_callback=out_of_band)
    if not refs:
        return body
    return MAGIC + pickle.dumps((refs, body), 5)


#: In a worker: mappings of kept segments (``(driver pid, size, content hash)`` -> ``[mapping,
#: last use, clean]``), reused when the same content arrives again. Mapping 200 MB afresh costs
#: a page fault per page at first touch (~30 ms), as much as the task itself; a reused mapping
#: has its page-table entries already, and only the pages a task wrote are dropped (to read as
#: the segment again). ``clean``: that was done since the mapping was last handed out (see
#: :func:`tidy_reused`). Bounded in count and bytes, and dropped after :data:`_REUSE_IDLE`
#: seconds unused (as the driver's kept segments are), by a timer thread.
_REUSED: OrderedDict[tuple[int, int, int], list[Any]] = OrderedDict()
_REUSE_MAX = 8
_REUSE_IDLE = float(os.environ.get("SHOAL_SEGMENT_CACHE_IDLE", "30"))
_reuse_lock = threading.Lock()
_reuse_timer: threading.Timer | None = None


def _reused(key: tuple[int, int, int]) -> Any:
    """A kept mapping of ``key``'s content, its written pages dropped; ``None`` if there is
    none, or if arrays of an earlier call still use it (their pages must not change)."""
    with _reuse_lock:
        entry = _REUSED.get(key)
    if entry is None:
        return None
    mapping = entry[0]
    # References: the entry, ``mapping`` here and getrefcount's argument. Every buffer export
    # (an array made on it) holds one more.
    if sys.getrefcount(mapping) > 3:
        return None
    if not entry[2] and not _revert(key, mapping):
        return None
    with _reuse_lock:
        entry[1] = time.monotonic()
        entry[2] = False  # handed out: its tasks may write into it
        if key in _REUSED:
            _REUSED.move_to_end(key)
    return mapping


def _revert(key: tuple[int, int, int], mapping: Any) -> bool:
    """Drop the pages tasks wrote into ``mapping``; forget it if that fails."""
    try:
        mapping.revert_written()
    except OSError:
        with _reuse_lock:
            _REUSED.pop(key, None)
        return False
    return True


def tidy_reused() -> None:
    """Revert, now, the kept mappings that no array uses any more, so that the next call with
    the same data reuses them at once.

    A worker calls this when a call is released. The next call's setup usually follows at
    once, but the driver first hashes the data to find the kept segment (milliseconds for
    hundreds of MB): the worker's own check of the pages, about 2 ms for 200 MB, happens
    meanwhile instead of before the next call's first task.
    """
    with _reuse_lock:
        entries = [(key, entry) for key, entry in _REUSED.items() if not entry[2]]
    for key, entry in entries:
        mapping = entry[0]
        # As in _reused: no buffer export (array) holds it.
        if sys.getrefcount(mapping) <= 3 and _revert(key, mapping):
            entry[2] = True
        del mapping


def sweep_reused(budget: int | None = None) -> None:
    """Forget kept mappings unused for :data:`_REUSE_IDLE` seconds, and the oldest beyond
    :data:`_REUSE_MAX` or ``budget`` bytes (their memory goes when no array uses them)."""
    global _reuse_timer
    now = time.monotonic()
    limit = budget if budget is not None else _default_budget()
    dropped = []  # unmapped outside the lock
    with _reuse_lock:
        total = sum(key[1] for key in _REUSED)
        for key, (_, used, _clean) in list(_REUSED.items()):
            if now - used >= _REUSE_IDLE or len(_REUSED) > _REUSE_MAX or total > limit:
                dropped.append(_REUSED.pop(key))
                total -= key[1]
        _reuse_timer = None
        if _REUSED:
            _reuse_timer = threading.Timer(_REUSE_IDLE, sweep_reused)
            _reuse_timer.daemon = True
            _reuse_timer.start()
    dropped.clear()


def _map(
    pid: int, fd: int, size: int, offset: int = 0, length: int = -1, content: int | None = None
) -> Any:
    from . import _native

    key = (pid, size, content) if content is not None else None
    mapping = _reused(key) if key is not None else None
    if mapping is None:
        handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
        try:
            # Private and writable: a task may modify what it got; nobody else sees it.
            mapping = _native.Mapping(handle, size)
        finally:
            os.close(handle)
        if key is not None:
            with _reuse_lock:
                _REUSED[key] = [mapping, time.monotonic(), False]
                _REUSED.move_to_end(key)
                timer = _reuse_timer
            if timer is None:
                sweep_reused()  # starts the timer
    if offset == 0 and length in (-1, size):
        return mapping
    return memoryview(mapping)[offset : offset + length]


def _map_received(segment: Any) -> Any:
    from . import _native

    try:
        return _native.Mapping(segment.fd, segment.size)
    finally:
        # The mapping keeps the memory (and holds no descriptor): close ours now.
        segment.close()


def loads(data: bytes, received: Sequence[Any] = ()) -> Any:
    """Unpickle a payload made by :func:`dumps`, mapping its segments: the driver's (by
    ``/proc`` path) or those ``received`` with a result (by position)."""
    if not data.startswith(MAGIC):
        if data.startswith(PLAIN):
            from . import _native

            return _native.unpack_plain(data)  # (start index, values)
        return pickle.loads(data)
    refs, body = pickle.loads(memoryview(data)[len(MAGIC) :])
    buffers = []
    for ref in refs:
        if isinstance(ref, int):
            if not 0 <= ref < len(received):
                raise ValueError(f"result refers to segment {ref}; {len(received)} arrived")
            buffers.append(_map_received(received[ref]))
        else:
            buffers.append(_map(*ref))
    return pickle.loads(body, buffers=buffers)
