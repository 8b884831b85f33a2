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
per call, and every segment is closed when the call ends. memfd segments have no file in
``/dev/shm``: the kernel frees their memory once no process holds them, so crashes and Ctrl-C
leave nothing behind. If a segment cannot be made (memory limits, file descriptors), the buffer
simply goes in-band, through the channel.

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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

#: Buffers at least this large go through shared memory (``SHOAL_SHM_THRESHOLD`` bytes).
THRESHOLD = int(os.environ.get("SHOAL_SHM_THRESHOLD", str(1 << 20)))
#: Prefix of a payload whose buffers are in shared memory (never the start of a pickle).
MAGIC = b"SHM\x00"
#: Most segments passed with one result frame (the protocol's limit); more go in-band.
MAX_RESULT_SEGMENTS = 64


class SegmentCache:
    """The segments of one call: one per distinct large buffer, closed together."""

    #: Most segments this cache makes; beyond, buffers go in-band.
    limit: int | None = None

    def __init__(self) -> None:
        # (id of the exporter, size) -> (segment, exporter, position in this cache)
        self._segments: dict[tuple[int, int], tuple[Any, Any, int]] = {}
        self._pid = os.getpid()
        self._kept: list[Any] = []
        self.failed = False
        #: Bytes copied into segments made so far (memory this cache holds).
        self.made_bytes = 0

    def _segment(self, view: memoryview) -> tuple[int, Any] | None:
        """``(position, segment)`` of the segment holding ``view``'s bytes, made on first use;
        ``None`` if none can be had."""
        from . import _native

        key = (id(view.obj), view.nbytes)
        hit = self._segments.get(key)
        if hit is None:
            position = len(self._segments)
            if self.limit is not None and position >= self.limit:
                return None
            try:
                segment = _native.Segment(view)
            except (OSError, ValueError):
                self.failed = True
                return None
            # Keep the exporter alive: its id must not be reused for another buffer.
            hit = self._segments[key] = (segment, view.obj, position)
            self.made_bytes += view.nbytes
        return hit[2], hit[0]

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
        segment = made[1]
        return (self._pid, segment.fd, segment.size)

    def close(self) -> None:
        for segment, _, _ in self._segments.values():
            segment.close()
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
        return [segment.fd for segment, _, _ in self._segments.values()]


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


def _map(pid: int, fd: int, size: int, offset: int = 0, length: int = -1) -> Any:
    from . import _native

    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    try:
        # Private and writable: a task may modify what it got; nobody else sees it.
        mapping = _native.Mapping(handle, size)
    finally:
        os.close(handle)
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
