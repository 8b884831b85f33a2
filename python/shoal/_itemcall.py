"""The worker side of ``store=`` and ``capture=True``: per-item provenance and captured output.

:class:`ItemCall` wraps the user's function. It runs in the worker (process, thread or
in-process) and returns ``(value, pid, host, started, finished)`` (plus ``stdout, stderr`` with
``capture``), which the driver unwraps before anyone sees the value. A failing item carries the
same facts on the exception, as the attribute ``_shoal_item``.

Captured output is what the item writes to :data:`sys.stdout` and :data:`sys.stderr` (Python
level, so ``print`` and logging to those streams, not writes of C code or child processes to the
file descriptors). It is bounded: the first and the last :data:`HALF` characters of each stream.
Streams are switched per thread, so the threads backend keeps each item's output apart.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself costs ~7 ms at worker start-up

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TextIO

#: Characters kept at the start and at the end of each captured stream.
HALF = 64 * 1024

_host: str | None = None
_local = threading.local()
_install_lock = threading.Lock()


def hostname() -> str:
    """This machine's host name (cached)."""
    global _host
    if _host is None:
        import socket

        _host = socket.gethostname()
    return _host


#: This process's pid, cached: ``os.getpid()`` is a system call, a third of the cost of a
#: stored item's facts. A forked child forgets it (see below).
_pid = 0


def _this_pid() -> int:
    global _pid
    _pid = os.getpid()
    return _pid


def _forget_pid() -> None:
    global _pid
    _pid = 0


os.register_at_fork(after_in_child=_forget_pid)


class Bounded:
    """A text sink keeping the first and the last :data:`HALF` characters written to it."""

    __slots__ = ("dropped", "head", "kept", "tail")

    def __init__(self) -> None:
        self.head: list[str] = []
        self.kept = 0  # characters in head
        self.tail = ""
        self.dropped = 0

    def write(self, text: str) -> int:
        n = len(text)
        room = HALF - self.kept
        if room > 0:
            self.head.append(text[:room])
            self.kept += min(room, n)
            text = text[room:]
        if text:
            self.tail += text
            if len(self.tail) > 2 * HALF:
                cut = len(self.tail) - HALF
                self.dropped += cut
                self.tail = self.tail[cut:]
        return n

    def getvalue(self) -> str:
        head = "".join(self.head)
        if len(self.tail) > HALF:
            self.dropped += len(self.tail) - HALF
            self.tail = self.tail[-HALF:]
        if self.dropped:
            return f"{head}\n[... shoal: {self.dropped} characters left out ...]\n{self.tail}"
        return head + self.tail


class _Switch:
    """Installed as ``sys.stdout``/``sys.stderr``: writes of a capturing thread go to its
    :class:`Bounded` sink, all others to the original stream."""

    def __init__(self, original: TextIO, slot: str) -> None:
        self._original = original
        self._slot = slot

    def write(self, text: str) -> int:
        sink = getattr(_local, self._slot, None)
        if sink is None:
            return int(self._original.write(text))
        return int(sink.write(text))

    def flush(self) -> None:
        if getattr(_local, self._slot, None) is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _install() -> None:
    with _install_lock:
        if not isinstance(sys.stdout, _Switch):
            sys.stdout = _Switch(sys.stdout, "out")
        if not isinstance(sys.stderr, _Switch):
            sys.stderr = _Switch(sys.stderr, "err")


class ItemCall:
    """``fn`` with the facts of each call attached to its result (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], capture: bool, name: str) -> None:
        self.fn = fn
        self.capture = capture
        # Error messages name the user's function, not this wrapper (see CallSpec.name).
        self.__qualname__ = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (ItemCall, (self.fn, self.capture, self.__qualname__))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.capture:
            return self._captured(args, kwargs)
        started = time.time()
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as exc:
            _attach(exc, (os.getpid(), hostname(), started, time.time(), None, None))
            raise
        return (value, _pid or _this_pid(), _host or hostname(), started, time.time())

    def _captured(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _install()
        out, err = Bounded(), Bounded()
        _local.out, _local.err = out, err
        started = time.time()
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as exc:
            _local.out = _local.err = None
            facts = (os.getpid(), hostname(), started, time.time(), out.getvalue(), err.getvalue())
            _attach(exc, facts)
            raise
        _local.out = _local.err = None
        finished = time.time()
        return (value, os.getpid(), hostname(), started, finished, out.getvalue(), err.getvalue())


def _attach(exc: BaseException, facts: tuple[Any, ...]) -> None:
    # An exception type that refuses attributes keeps no facts.
    with contextlib.suppress(Exception):
        exc._shoal_item = facts  # type: ignore[attr-defined]
