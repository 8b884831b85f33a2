"""What a call is, as every backend sees it: the data of the backend contract.

A :class:`CallSpec` holds what is the same for every item (the function, fixed arguments, how
an item maps to arguments). It is sent to each worker once per call. A chunk is a plain list of
items. A :class:`ChunkResult` is what comes back for one chunk.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

#: An item is the single positional argument: ``fn(item, *args, **kwargs)``.
MODE_SINGLE = 0
#: An item is a tuple of positional arguments: ``fn(*item, *args, **kwargs)``.
MODE_STAR = 1
#: An item is ``(positional_tuple, keyword_dict)``.
MODE_KW = 2


@dataclass(frozen=True)
class CallSpec:
    """Everything about a call that does not change from item to item."""

    fn: Callable[..., Any]
    mode: int = MODE_SINGLE
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Stop running a chunk at its first failing item (``on_error="raise"``).
    stop_on_error: bool = True

    @property
    def name(self) -> str:
        """A readable name of the function, for error notes."""
        fn = self.fn
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


@dataclass
class ItemError:
    """One item that raised."""

    offset: int
    exc: BaseException
    traceback: str
    arguments: str


@dataclass
class Crash:
    """The whole chunk failed: its worker died, or no worker could start."""

    pid: int | None
    exit: str
    start_failed: bool = False


@dataclass
class ChunkResult:
    """What a backend hands back for one submitted chunk.

    ``values`` has one entry per item that was run (fewer than the chunk when the chunk stopped at
    an error); entries at the offsets in ``errors`` are placeholders. ``crash`` is set when no
    value came back at all.
    """

    seq: int
    values: list[Any]
    errors: list[ItemError] = field(default_factory=list)
    crash: Crash | None = None
    elapsed_ns: int = 0


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
