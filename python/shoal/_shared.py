"""Arrays that live in shared memory from the start, passed to workers without any copy.

By default, a large array argument is copied into shared memory once per call (see
:mod:`shoal._shm`). That copy is cheap compared with pickling it per task, but it is not free:
the kernel has to allocate and zero every page (about 0.3-0.5 s per GB on a typical VM). An
array made by :func:`share` or :func:`shared_zeros` already lives in a shared-memory segment, so
every later call passes a reference to it and workers map the same pages: no copy at all, however
many calls use it.

What writes do:

- A task's writes to such an array stay in its own worker (copy-on-write), as for any argument.
- The caller's writes go to the shared pages. Tasks that have not read those pages yet see the
  new values, so treat the array as read-only while calls that use it are running (as with a
  ``multiprocessing`` shared array or a joblib memmap).
- A process forked from the caller (``multiprocessing`` with the fork start method) shares the
  pages too: writes on either side are seen by the other.

The memory is freed when the last array (or view) on it is gone and no worker maps it any more;
nothing is ever left in ``/dev/shm``.
"""

from __future__ import annotations

from . import _shm

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any


def share(data: Any) -> Any:
    """Copy ``data`` into shared memory once, and return the copy.

    Parameters
    ----------
    data : numpy.ndarray or bytes-like
        A numpy array (any shape, any non-object dtype; a non-contiguous one is made contiguous)
        or any object exporting a buffer (``bytes``, ``bytearray``, ``memoryview``...).

    Returns
    -------
    numpy.ndarray or memoryview
        An array of the same shape, dtype and values (or, for other buffers, a writable
        ``memoryview`` of their bytes) whose memory workers map directly: passing it to
        :func:`shoal.map` and friends, as an item, a fixed argument, in a ``functools.partial``
        or a closure, never copies it again.

    Raises
    ------
    TypeError
        For an object-dtype array (its elements are Python objects, which cannot be shared) or
        an object that exports no buffer.
    OSError
        If the segment cannot be created (memory limit).
    """
    numpy = _numpy_of(data)
    if numpy is not None:
        if data.dtype.hasobject:
            raise TypeError(
                "shoal.share() cannot share an array of Python objects (dtype=object); "
                "pass it as a normal argument instead"
            )
        source = numpy.ascontiguousarray(data)
        if source.nbytes == 0:
            return source.copy()
        mapping = _shm.allocate(source.nbytes, memoryview(source).cast("B"))
        return numpy.ndarray(source.shape, source.dtype, buffer=mapping)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"shoal.share() needs a numpy array or a bytes-like object, not {type(data).__name__}"
        ) from None
    raw = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    if raw.nbytes == 0:
        return memoryview(bytearray())
    return memoryview(_shm.allocate(raw.nbytes, raw))


def shared_zeros(shape: int | tuple[int, ...], dtype: Any = float) -> Any:
    """A new zero-filled numpy array in shared memory (like :func:`numpy.zeros`).

    Fill it in place; every call that gets it passes it to workers without copying. Pages are
    allocated as they are first written. See :func:`share` for what writes do.
    """
    import numpy

    probe = numpy.empty(0, dtype=dtype)
    if probe.dtype.hasobject:
        raise TypeError("shoal.shared_zeros() cannot hold Python objects (dtype=object)")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(numpy.prod(dims, dtype=numpy.int64)) * probe.dtype.itemsize
    if nbytes == 0:
        return numpy.zeros(dims, dtype=dtype)
    return numpy.ndarray(dims, probe.dtype, buffer=_shm.allocate(nbytes))


def _numpy_of(data: Any) -> Any:
    """The numpy module if ``data`` is a numpy array (without importing numpy otherwise)."""
    import sys

    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(data, numpy.ndarray):
        return numpy
    return None
