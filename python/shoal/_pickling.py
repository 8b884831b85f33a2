"""Pickling for the processes backend, with errors that say exactly what could not be pickled.

Data goes through the standard :mod:`pickle` (protocol 5, fast C code). The standard pickler
stores classes and functions *by reference* (module and name), which the receiving process can
only resolve if it can import that module. Anything defined in ``__main__`` (a script, a
notebook) or in a module created at run time cannot be: such data must travel *by value*, which
cloudpickle does. So a payload that refers to such a module (found with a byte search for the
module's name as pickle writes it, far cheaper than a second pickling), or that the standard
pickler refuses (lambdas, closures), is pickled again with cloudpickle. Plain data keeps the fast
path. Functions always go through cloudpickle. When even cloudpickle fails, the offending item
is located and named in a :class:`~shoal.PicklingError`.
"""

from __future__ import annotations

import os
import pickle
import sys

from . import _native
from . import _shm as shm
from ._errors import PicklingError, RemoteError
from ._spec import CallSpec, ItemError

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from ._shm import SegmentCache

PROTOCOL = 5
#: Largest pickled message (a chunk of arguments or of results) the channel carries.
MAX_MESSAGE_BYTES = int(os.environ.get("SHOAL_MAX_MESSAGE_BYTES", str(8 * 2**30)))


def _cloudpickle() -> Any:
    import cloudpickle  # imported lazily: workers that never see a lambda never pay for it

    return cloudpickle


#: Byte strings whose presence in a standard pickle means it refers to a module the receiving
#: process cannot import; refreshed when the set of loaded modules changes.
_markers: tuple[bytes, ...] = ()
_markers_for = -1
#: Loaded modules made at run time (no import spec), other than ``__main__``.
_dynamic: tuple[str, ...] = ()


def _marker(name: str) -> bytes:
    # How protocol 5 writes a short str (a module name of STACK_GLOBAL among them): the
    # SHORT_BINUNICODE opcode, a length byte, the UTF-8 text. Longer names are rare; their bare
    # text is a superset test, which is all we need (a false hit only costs the slow path).
    raw = name.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else raw


def _refresh_markers() -> tuple[bytes, ...]:
    global _markers, _markers_for, _dynamic
    names = {"__main__"}
    for name, module in list(sys.modules.items()):
        # A module made at run time (types.ModuleType, exec'd code) has no import spec: no
        # other process can import it by name.
        if module is not None and getattr(module, "__spec__", False) is None:
            names.add(name)
    _dynamic = tuple(sorted(names - {"__main__"}))
    found = [_marker(n) for n in sorted(names)]
    # Modules the user registered with cloudpickle.register_pickle_by_value: as text, so that
    # their submodules match too.
    cp = sys.modules.get("cloudpickle.cloudpickle")
    found += [n.encode() for n in sorted(getattr(cp, "_PICKLE_BY_VALUE_MODULES", ()))]
    _markers, _markers_for = tuple(found), len(sys.modules)
    return _markers


def _current_markers() -> tuple[bytes, ...]:
    return _markers if len(sys.modules) == _markers_for else _refresh_markers()


def needs_by_value(blob: bytes) -> bool:
    """Whether a standard pickle refers by name to a class or function the receiving process
    could not import (defined in ``__main__`` or in a module made at run time)."""
    for marker in _current_markers():  # noqa: SIM110 - hot path: no generator per call
        if marker in blob:
            return True
    return False


def dumps(obj: Any, segments: SegmentCache | None = None) -> bytes:
    """Pickle data: standard pickle first, cloudpickle (by value) if that fails or if the
    standard pickle refers to ``__main__``. With ``segments``, large buffers go through shared
    memory (see :mod:`shoal._shm`)."""
    try:
        blob = shm.dumps(obj, segments)
    except Exception:
        return shm.dumps(obj, segments, _by_value_pickler().dumps)
    if needs_by_value(blob):
        return shm.dumps(obj, segments, _by_value_pickler().dumps)
    return blob


def _by_value_pickler() -> Any:
    """cloudpickle, told that the modules made at run time travel by value (it already does so
    for ``__main__``, but treats a module found in ``sys.modules`` as importable)."""
    cp = _cloudpickle()
    _current_markers()  # brings the list of modules made at run time up to date
    registered = getattr(cp.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
    for name in _dynamic:
        module = sys.modules.get(name)
        if module is not None and (registered is None or name not in registered):
            try:  # noqa: SIM105 - contextlib would cost every worker's start-up an import
                cp.register_pickle_by_value(module)
            except ValueError:  # gone from sys.modules meanwhile
                pass
    return cp


def dumps_spec(spec: CallSpec, segments: SegmentCache | None = None) -> bytes:
    """Pickle a call spec; the error names the function or the fixed argument that failed."""
    cp = _by_value_pickler()
    try:
        return shm.dumps(spec, segments, cp.dumps)
    except Exception as exc:
        try:
            cp.dumps(spec.fn, PROTOCOL)
        except Exception as fn_exc:
            raise PicklingError(
                f"the function {spec.name!r} cannot be pickled, so it cannot be sent to worker "
                f"processes: {fn_exc}. Use backend='threads', or make it picklable."
            ) from fn_exc
        for i, a in enumerate(spec.args):
            _check(a, f"fixed positional argument {i} ({_brief(a)})")
        ctx = spec.context
        if ctx is not None:
            _check(ctx.initializer, f"the initializer {_brief(ctx.initializer)}")
            for i, a in enumerate(ctx.initargs):
                _check(a, f"initializer argument {i} ({_brief(a)})")
            _check(ctx.shared, f"the shared object ({_brief(ctx.shared)})")
        for k, v in spec.kwargs.items():
            _check(v, f"fixed keyword argument {k!r} ({_brief(v)})")
        raise PicklingError(f"the call to {spec.name!r} cannot be pickled: {exc}") from exc


def dumps_items(items: list[Any], start: int, segments: SegmentCache | None = None) -> bytes:
    """Pickle ``(start, items)``; on failure the error names the first item (by input index)
    that fails."""
    try:
        return dumps((start, items), segments)
    except Exception as exc:
        for offset, item in enumerate(items):
            _check(item, f"the argument(s) of item {start + offset} ({_brief(item)})")
        raise PicklingError(f"a chunk of arguments cannot be pickled: {exc}") from exc


def _check(obj: Any, what: str) -> None:
    try:
        dumps(obj)
    except Exception as exc:
        raise PicklingError(f"{what} cannot be pickled: {exc}") from exc


def _brief(obj: Any) -> str:
    from ._spec import _short

    try:
        return _short.repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object>"


def _portable_exception(exc: BaseException) -> BaseException:
    """``exc`` itself if it survives a pickle round trip, else a :class:`RemoteError`."""
    try:
        pickle.loads(dumps(exc))
        return exc
    except Exception:
        return RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))


def encode_outcome(
    values: list[Any], errors: list[ItemError], segments: SegmentCache | None = None
) -> bytes:
    """Pickle a chunk's outcome in a worker; with ``segments`` (a
    :class:`~shoal._shm.ResultSegments`), large buffers go into shared memory.

    A result that cannot be pickled, or whose pickle is over the channel's limit, becomes an
    error of its own item (naming it) instead of failing the whole chunk.
    """
    if not errors:
        packed = _native.pack_plain(0, values)  # plain results skip pickle both ways
        if packed is not None and len(packed) <= MAX_MESSAGE_BYTES:
            return packed
    wire = [(e.offset, _portable_exception(e.exc), e.traceback, e.arguments) for e in errors]
    try:
        blob = dumps((values, wire), segments)
        if len(blob) <= MAX_MESSAGE_BYTES:
            return blob
    except Exception:
        pass
    if segments is not None:
        segments.close()  # made for the failed attempt; the retry below makes its own
    failed = {e.offset for e in errors}
    for offset, value in enumerate(values):
        if offset in failed:
            continue
        try:
            size = len(dumps(value))
        except Exception as exc:
            err: PicklingError | None = PicklingError(
                f"the result of this item ({type(value).__qualname__} object) cannot be pickled "
                f"to travel back from the worker: {exc}"
            )
        else:
            err = None
            if size > MAX_MESSAGE_BYTES // 2:
                err = PicklingError(
                    f"the result of this item pickles to {size} bytes, too large for the channel "
                    f"(limit {MAX_MESSAGE_BYTES} bytes per message, SHOAL_MAX_MESSAGE_BYTES)"
                )
        if err is not None:
            values[offset] = None
            wire.append((offset, err, "", ""))
    wire.sort(key=lambda w: w[0])
    return dumps((values, wire), segments)


def plain_values(payload: bytes) -> list[Any]:
    """The values of an outcome that Rust packed (it starts with ``_shm.PLAIN``)."""
    return _native.unpack_plain(payload)[1]


def decode_outcome(
    payload: bytes, segments: Sequence[Any] = ()
) -> tuple[list[Any], list[ItemError]]:
    """Unpickle a chunk's outcome in the driver, mapping the ``segments`` that came with it."""
    if payload.startswith(shm.PLAIN):
        return plain_values(payload), []
    values, wire = shm.loads(payload, segments)
    if not wire:
        return values, []
    return values, [ItemError(off, exc, tb, args) for off, exc, tb, args in wire]
