"""What one item of a function cost in its last call, to size the next call's first chunks.

Each call learns the cost of an item from the compute times its chunks report; until the first
report it can only send single items, which costs a few round trips: a large share of a short
call (100,000 no-op items take about 2 ms of work). Programs call ``map`` with the same function
again and again (a sampler every step, an optimiser every iteration), so a pool remembers the
last measured cost per function and starts the next call from it. The engine treats it as a
hint: chunks stay conservative until the new call's first chunk reports (see
``Scheduler::chunk_size`` in shoal-core).
"""

from __future__ import annotations

import functools
import threading
import types
from collections import OrderedDict
from typing import Any

#: Functions remembered per pool; the oldest is forgotten first.
MAX_FUNCTIONS = 64


def cost_key(fn: Any) -> Any:
    """What identifies ``fn``'s code across calls, or ``None``.

    The code object, not the function: a lambda or a ``functools.partial`` made anew for each
    call is still the same code. A callable object is keyed by its class's ``__call__``. Keys
    hold no reference to the user's objects beyond code (and builtin functions).
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        return code
    if isinstance(fn, types.BuiltinFunctionType):
        return fn
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the method itself is wanted
    code = getattr(call, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


class CostHints:
    """Nanoseconds per item of the functions a pool ran lately (bounded, most recent kept)."""

    def __init__(self) -> None:
        self._ns: OrderedDict[Any, float] = OrderedDict()
        self._lock = threading.Lock()  # calls on one pool may end in several threads at once

    def get(self, key: Any) -> float | None:
        return None if key is None else self._ns.get(key)

    def put(self, key: Any, per_item_ns: float | None) -> None:
        if key is None or per_item_ns is None:
            return
        with self._lock:
            self._ns[key] = per_item_ns
            self._ns.move_to_end(key)
            while len(self._ns) > MAX_FUNCTIONS:
                self._ns.popitem(last=False)
