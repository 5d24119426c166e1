"""Unix socket details: containerd's address spellings and SO_PEERCRED.

containerd writes addresses as `unix:///run/containerd/s/<hex>`, users type bare paths, and older
shims used abstract sockets (`@name`, or `unix://@name`); all map to one AF_UNIX address here.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Optional

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def socket_address(address: str) -> str:
    """The string to hand to socket.connect/bind: a path, or "\\0name" for an abstract socket."""
    if address.startswith("unix://"):
        address = address[len("unix://"):]
    elif "://" in address:
        raise ValueError(f"unsupported ttrpc address {address!r}: only unix sockets are supported")
    if address.startswith("@"):
        return "\0" + address[1:]
    if not address:
        raise ValueError("empty ttrpc address")
    return address


def is_abstract(address: str) -> bool:
    return address.startswith("\0")


def peer_credentials(sock: Optional[socket.socket]) -> Optional[PeerCredentials]:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return PeerCredentials(*_UCRED.unpack(raw))


def bind_unix(address: str, backlog: int = 128) -> socket.socket:
    """Binds and listens. A leftover socket file that nobody answers on is removed (a crashed
    predecessor); one that still answers is someone else's, so EADDRINUSE."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not is_abstract(address):
            _remove_stale(address)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a live server")
