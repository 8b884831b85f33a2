"""What ``shoal exec`` runs for each input line: one shell command, GNU parallel-style."""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Any

from .._errors import ShoalError
from .._itemcall import Bounded


class CommandFailedError(ShoalError):
    """A command of ``shoal exec`` exited with a non-zero status.

    Attributes
    ----------
    result : dict
        ``returncode``, ``stdout``, ``stderr`` and ``duration`` of the command.
    """

    def __init__(self, command: str, result: dict[str, Any]) -> None:
        super().__init__(f"exit status {result['returncode']}: {command}")
        self.command = command
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandFailedError, (self.command, self.result))


def command_line(template: str, line: str, number: int | None) -> str:
    """``template`` with ``{}`` the shell-quoted line and ``{#}`` its number (from 1); without
    ``{}``, the quoted line is appended."""
    quoted = shlex.quote(line)
    text = template
    if number is not None:
        text = text.replace("{#}", str(number))
    if "{}" in text:
        return text.replace("{}", quoted)
    return f"{text} {quoted}"


def _bounded(data: bytes) -> str:
    sink = Bounded()
    sink.write(data.decode("utf-8", errors="replace"))
    return sink.getvalue()


def run_command(line: str, number: int | None, template: str) -> dict[str, Any]:
    """Run the command for one input line with ``sh -c``; its result, or
    :class:`CommandFailedError` for a non-zero exit status."""
    command = command_line(template, line, number)
    started = time.perf_counter()
    proc = subprocess.run(["sh", "-c", command], capture_output=True, stdin=subprocess.DEVNULL)
    result = {
        "returncode": proc.returncode,
        "stdout": _bounded(proc.stdout),
        "stderr": _bounded(proc.stderr),
        "duration": time.perf_counter() - started,
    }
    if proc.returncode != 0:
        raise CommandFailedError(command, result)
    return result
