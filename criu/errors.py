"""Exceptions of the criu package.

Kept in their own module so that every other module here (and the shim) can import them without
pulling in subprocess or filesystem code.
"""
from __future__ import annotations


class CriuError(Exception):
    """CRIU is missing, too old, or failed; the message is meant for an operator to act on."""


class CriuImageError(CriuError):
    """A checkpoint image directory cannot be restored from.

    ``reason`` is a short machine-readable word (``missing``, ``not-a-directory``, ``empty``,
    ``not-criu``, ``corrupt``, ``incomplete``) so callers can map it to a gRPC status without
    parsing the message; ``path`` is the directory concerned.
    """

    def __init__(self, reason: str, path: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path
