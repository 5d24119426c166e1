"""The two ways a ttrpc exchange fails, kept apart because callers react differently.

`TTRPCError` is an answer: the peer understood the request and said no (a status). It is what
handlers raise and what `Client.call` raises. `ProtocolError` means the bytes themselves are wrong
(bad framing, garbage protobuf, a frame over the size limit): the connection can no longer be trusted.
"""
from __future__ import annotations

from typing import Any, Sequence

from .codes import Code


class TTRPCError(Exception):
    """A non-OK status. `details` are google.protobuf.Any-like objects (type_url, value)."""

    def __init__(self, code: Code | int, message: str = "", details: Sequence[Any] = ()):
        self.code = Code.from_wire(int(code))
        self.message = message
        self.details = tuple(details)
        super().__init__(f"ttrpc: {self.code.name}: {message}")


class ConnectionClosed(TTRPCError):
    """The connection went away before an answer came; UNAVAILABLE tells callers a retry may work."""

    def __init__(self, message: str = "connection closed"):
        super().__init__(Code.UNAVAILABLE, message)


class ProtocolError(Exception):
    """The peer sent bytes that are not ttrpc (or ours would not be)."""


class MessageTooLarge(ProtocolError):
    """A frame's data exceeds the limit. Carries the stream so the server can answer that stream
    with RESOURCE_EXHAUSTED before it closes the connection."""

    def __init__(self, length: int, limit: int, stream_id: int | None = None):
        self.length = length
        self.limit = limit
        self.stream_id = stream_id
        super().__init__(f"message of {length} bytes exceeds the maximum message length of {limit} bytes")
