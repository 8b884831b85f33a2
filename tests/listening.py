"""The listening TCP sockets of given processes, read from /proc (no ``ss`` needed)."""

from __future__ import annotations

import ipaddress
import os
import socket

_FAMILIES = (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6))
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _address(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp{,6} prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)


def _listening_inodes(pid: int) -> dict[int, tuple[str, int]]:
    """Inode -> (address, port) of the listening sockets in ``pid``'s network namespace."""
    found: dict[int, tuple[str, int]] = {}
    for name, family in _FAMILIES:
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == _LISTEN:
                address, port = fields[1].split(":")
                found[int(fields[9])] = (_address(address, family), int(port, 16))
    return found


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """``(pid, address, port)`` of every listening TCP socket that one of ``pids`` holds."""
    got = []
    for pid in sorted(pids):
        table = _listening_inodes(pid)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                entry = table.get(int(target[8:-1]))
                if entry is not None:
                    got.append((pid, *entry))
    return sorted(set(got))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def loopback_only_network(pid: int) -> bool:
    """Whether ``pid`` lives in a network namespace whose only interface is loopback (there, a
    socket on the wildcard address can be reached from that namespace alone)."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            rows = f.read().splitlines()[2:]
    except OSError:
        return False
    return {row.split(":", 1)[0].strip() for row in rows} == {"lo"}


def not_on_loopback(pids: set[int]) -> list[str]:
    """The listening sockets of ``pids`` that others could reach: ``"name[pid] address:port"``."""
    return [
        f"{command(pid)}[{pid}] {address}:{port}"
        for pid, address, port in listeners(pids)
        if not is_loopback(address) and not loopback_only_network(pid)
    ]
