"""The shim's own unix sockets: containerd's ``unix://`` addresses, bind, probe (stdlib ``_socket`` only).

Shared by `start` (hot path: no ``socket`` module, whose import pulls in ``enum`` and friends) and by
the daemon run with ``-socket``. See `shim.binary.flags` for where this sits in the import plan.
"""
from __future__ import annotations

import os

EADDRINUSE = 98


def socket_path(address: str) -> str:
    """The path to bind or connect for `address`: ``unix:///p`` -> ``/p``, anything else abstract."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return "\0" + address  # abstract socket


def can_connect(address: str, timeout: float = 0.1) -> bool:
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(socket_path(address))
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind_unix(address: str):
    """A listening ``_socket.socket`` on `address` (the file 0600, its directory made 0711 if missing)."""
    import _socket

    path = socket_path(address)
    if not path.startswith("\0"):
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o600)
        s.listen(128)
    except BaseException:
        s.close()
        raise
    return s


def remove_socket(address: str) -> None:
    path = socket_path(address)
    if not path.startswith("\0"):
        try:
            os.unlink(path)
        except OSError:
            pass
