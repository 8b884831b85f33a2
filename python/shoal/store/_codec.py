"""What a store writes: item identities, values (large buffers raw) and exceptions.

Identity. A store belongs to one function, named ``module:qualname`` (through
:class:`functools.partial` to the function inside). An item's identity is a 16-byte BLAKE2b
hash of the call's fixed part (fixed ``args``/``kwargs``, the partial's arguments, ``seed``, the
call mode) and the item's own arguments, pickled. With ``key=``, the user's key replaces the
item's arguments (the fixed part still counts).

Values are pickled with protocol 5; every buffer of :data:`RAW_MIN` bytes or more (a large numpy
array, wherever it sits in the value) is kept out of the pickle and stored raw, as its own BLOB.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable
from typing import Any

from .._errors import RemoteError, RemoteTraceback
from .._spec import MODE_KW

#: Buffers of this many bytes or more are stored raw, outside the pickle.
RAW_MIN = 2**20


def _cloudpickle() -> Any:
    import cloudpickle

    return cloudpickle


def unwrap_partial(fn: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The function inside nested partials, and their merged arguments."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        args = fn.args + args
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    return fn, args, kwargs


def function_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of ``fn`` (the function inside any partial)."""
    inner, _, _ = unwrap_partial(fn)
    module = getattr(inner, "__module__", None) or type(inner).__module__
    qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{module}:{qualname}"


def source_hash(fn: Callable[..., Any]) -> str | None:
    """A hash of the source of ``fn`` (inside any partial), or ``None`` if it has none."""
    inner, _, _ = unwrap_partial(fn)
    try:
        source = inspect.getsource(inner)
    except (OSError, TypeError):
        return None
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def pickled(obj: Any) -> bytes:
    """``obj`` pickled (protocol 5), with cloudpickle for what pickle cannot do."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        blob: bytes = _cloudpickle().dumps(obj, protocol=5)
        return blob


def call_key(
    fn: Callable[..., Any], mode: int, args: tuple[Any, ...], kwargs: dict[str, Any], seed: Any
) -> bytes:
    """A 32-byte hash of the fixed part of every item's identity: the key of the keyed BLAKE2b
    that hashes each item."""
    _, pargs, pkwargs = unwrap_partial(fn)
    fixed = (mode, args, sorted(kwargs.items()), pargs, sorted(pkwargs.items()), seed)
    return hashlib.blake2b(pickled(fixed), digest_size=32).digest()


def item_key(key: bytes, mode: int, item: Any) -> bytes:
    """The identity of one item (``key`` from :func:`call_key`)."""
    if mode == MODE_KW:
        item = (item[0], sorted(item[1].items()))
    return hashlib.blake2b(pickled(item), digest_size=16, key=key).digest()


def user_key(key: bytes, name: Any) -> bytes:
    """The identity of an item named by the user's ``key=``."""
    if isinstance(name, bool) or not isinstance(name, (str, int, bytes)):
        raise TypeError(f"key= must return a str, int or bytes, not {type(name).__name__}")
    data = b"user key" + pickle.dumps(name, protocol=5)
    return hashlib.blake2b(data, digest_size=16, key=key).digest()


#: Types whose pickles hold no buffer (their values are pickled without a buffer callback).
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


def encode_value(value: Any) -> tuple[bytes, list[bytes | memoryview]]:
    """``(pickle, raw buffers)``: buffers of :data:`RAW_MIN` bytes or more stay out."""
    if type(value) in PLAIN_TYPES:  # no buffers inside: skip the callback machinery
        return pickle.dumps(value, protocol=5), []
    raw: list[Any] = []

    def keep_out(buf: pickle.PickleBuffer) -> bool:
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: pickled in-band
            return True
        if view.nbytes >= RAW_MIN:
            raw.append(view)
            return False
        return True

    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=keep_out)
    except Exception:
        raw.clear()
        data = _cloudpickle().dumps(value, protocol=5, buffer_callback=keep_out)
    return data, raw


def decode_value(data: bytes, buffers: list[bytes]) -> Any:
    """The value written by :func:`encode_value`."""
    return pickle.loads(data, buffers=buffers)


def describe_error(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """``(type, message, traceback, pickled exception or None)`` of a failure."""
    etype = type(exc).__qualname__
    if isinstance(exc, RemoteError):
        etype = exc.type_name
    message = str(exc)
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb
    else:
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = pickled(exc)
        pickle.loads(data)  # one that cannot be rebuilt is kept as type and message only
        blob: bytes | None = data
    except Exception:
        blob = None
    return etype, message, tb, blob


def rebuild_error(etype: str, message: str, tb: str | None, blob: bytes | None) -> BaseException:
    """The stored exception with its original type where it can be, else a RemoteError."""
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(etype, message)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
