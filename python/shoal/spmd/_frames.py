"""Length-prefixed messages on a stream socket: a small pickled head and raw byte parts.

Parts (pickled user objects) are written and read as they are, without being pickled again, so
a large array crosses each socket once.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_LEN = struct.Struct("!Q")


def send(sock: socket.socket, head: Any, parts: list[bytes] = ()) -> None:  # type: ignore[assignment]
    header = pickle.dumps((head, [len(p) for p in parts]), 5)
    sock.sendall(_LEN.pack(len(header)) + header)
    for part in parts:
        sock.sendall(part)


def _exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the other side closed the connection")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[Any, list[bytearray]]:
    (n,) = _LEN.unpack(_exact(sock, _LEN.size))
    head, sizes = pickle.loads(_exact(sock, n))
    return head, [_exact(sock, size) for size in sizes]
