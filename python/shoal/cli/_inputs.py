"""Reading the INPUTS of ``shoal run`` and ``shoal exec``: JSON lines, CSV, text.

Each record becomes ``(positional args, keyword args)``. A JSON list is positional arguments,
an object keyword arguments, anything else one argument; a CSV row is keyword arguments named
by the header (values stay strings); a text line is one string. Blank lines are skipped. A line
that cannot be parsed becomes a :class:`BadRecord`, which fails that item alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

FORMATS = ("jsonl", "csv", "txt")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "txt",
}


class BadRecord:
    """An input line that could not be read: its line number and why."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason

    @property
    def message(self) -> str:
        return f"line {self.line}: {self.reason}"


Record = tuple[tuple[Any, ...], dict[str, Any]]


def input_format(path: str, forced: str | None) -> str:
    """The format of ``path`` (``"-"`` is stdin) from ``forced`` or its extension.

    Raises
    ------
    ValueError
        For an extension shoal does not know (a usage error).
    """
    if forced:
        return forced
    if path == "-":
        return "jsonl"
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        known = ", ".join(sorted(_EXTENSIONS))
        raise ValueError(
            f"cannot tell the format of {path!r} from its extension (known: {known}); "
            f"give --format jsonl|csv|txt"
        )
    return _EXTENSIONS[ext]


def open_text(path: str) -> io.TextIOBase:
    if path == "-":
        return sys.stdin  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def _json_record(text: str) -> Record:
    value = json.loads(text)
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    return (value,), {}


def read_records(path: str, fmt: str) -> Iterator[Record | BadRecord]:
    """The records of ``path`` in order, blank lines skipped."""
    f = open_text(path)
    try:
        if fmt == "csv":
            yield from _csv_records(f)
            return
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if fmt == "txt":
                yield (text,), {}
                continue
            try:
                yield _json_record(text)
            except ValueError as exc:
                yield BadRecord(number, f"not valid JSON: {exc}")
    finally:
        if f is not sys.stdin:
            f.close()


def _csv_records(f: Any) -> Iterator[Record | BadRecord]:
    reader = csv.reader(f)
    header: list[str] | None = None
    for row in reader:
        number = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            continue
        if len(row) != len(header):
            yield BadRecord(number, f"{len(row)} values for {len(header)} columns")
            continue
        yield (), dict(zip(header, row, strict=True))
