"""What a call is, as every backend sees it: the data of the backend contract.

A :class:`CallSpec` holds what is the same for every item (the function, fixed arguments, how
an item maps to arguments). It is sent to each worker once per call. A chunk is a plain list of
items. A :class:`ChunkResult` is what comes back for one chunk.
"""

from __future__ import annotations

import reprlib

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:  # kept out of the worker's import path, which must start fast
    from collections.abc import Callable
    from typing import Any

#: An item is the single positional argument: ``fn(item, *args, **kwargs)``.
MODE_SINGLE = 0
#: An item is a tuple of positional arguments: ``fn(*item, *args, **kwargs)``.
MODE_STAR = 1
#: An item is ``(positional_tuple, keyword_dict)``.
MODE_KW = 2

# Plain classes with __slots__ rather than dataclasses: importing dataclasses (and inspect)
# would add ~8 ms to every worker start.


class CallSpec:
    """Everything about a call that does not change from item to item.

    Attributes
    ----------
    fn : callable
        The function.
    mode : int
        How an item maps to arguments (``MODE_SINGLE``, ``MODE_STAR`` or ``MODE_KW``).
    args, kwargs
        Fixed arguments passed to every call.
    stop_on_error : bool
        Stop running a chunk at its first failing item (``on_error="raise"``).
    """

    __slots__ = ("args", "fn", "kwargs", "mode", "stop_on_error")

    def __init__(
        self,
        fn: Callable[..., Any],
        mode: int = MODE_SINGLE,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        stop_on_error: bool = True,
    ) -> None:
        self.fn = fn
        self.mode = mode
        self.args = args
        self.kwargs = kwargs or {}
        self.stop_on_error = stop_on_error

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallSpec, (self.fn, self.mode, self.args, self.kwargs, self.stop_on_error))

    @property
    def name(self) -> str:
        """A readable name of the function, for error notes."""
        fn = self.fn
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class ItemError:
    """One item that raised: its offset in the chunk, the exception, the formatted traceback
    and a short repr of its arguments."""

    __slots__ = ("arguments", "exc", "offset", "traceback")

    def __init__(self, offset: int, exc: BaseException, traceback: str, arguments: str) -> None:
        self.offset = offset
        self.exc = exc
        self.traceback = traceback
        self.arguments = arguments


class Crash:
    """The whole chunk failed: its worker died (``pid``, ``exit``), or none could start."""

    __slots__ = ("exit", "pid", "start_failed")

    def __init__(self, pid: int | None, exit: str, start_failed: bool = False) -> None:
        self.pid = pid
        self.exit = exit
        self.start_failed = start_failed


class ChunkResult:
    """What a backend hands back for one submitted chunk.

    ``values`` has one entry per item that was run (fewer than the chunk when the chunk stopped at
    an error); entries at the offsets in ``errors`` are placeholders. ``crash`` is set when no
    value came back at all.
    """

    __slots__ = ("crash", "elapsed_ns", "errors", "seq", "values")

    def __init__(
        self,
        seq: int,
        values: list[Any],
        errors: list[ItemError] | None = None,
        crash: Crash | None = None,
        elapsed_ns: int = 0,
    ) -> None:
        self.seq = seq
        self.values = values
        self.errors = errors or []
        self.crash = crash
        self.elapsed_ns = elapsed_ns


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_MAX_ARGS_REPR = 200


def describe_item(spec: CallSpec, item: Any) -> str:
    """Short repr of the arguments an item stands for (used in error notes)."""
    try:
        if spec.mode == MODE_SINGLE:
            parts = [_short.repr(item)]
        elif spec.mode == MODE_STAR:
            parts = [_short.repr(a) for a in item]
        else:
            pos, kw = item
            parts = [_short.repr(a) for a in pos] + [f"{k}={_short.repr(v)}" for k, v in kw.items()]
        text = ", ".join(parts)
    except Exception:  # a broken __repr__ must not hide the real error
        text = "<unrepresentable>"
    if len(text) > _MAX_ARGS_REPR:
        text = text[: _MAX_ARGS_REPR - 3] + "..."
    return text
