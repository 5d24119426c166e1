"""The two ways a ttrpc exchange fails, kept apart because callers react differently.

`TTRPCError` is an answer: the peer understood the request and said no (a status). It is what
handlers raise and what `Client.call` raises. `ProtocolError` means the bytes themselves are wrong
(bad framing, garbage protobuf, a frame over the size limit): the connection can no longer be trusted.
"""
from __future__ import annotations


from .codes import Code
from .protocol_errors import MessageTooLarge, ProtocolError  # noqa: F401 - re-exported


class TTRPCError(Exception):
    """A non-OK status. `details` are google.protobuf.Any-like objects (type_url, value)."""

    def __init__(self, code: Code | int, message: str = "", details: "tuple | list" = ()):
        self.code = Code.from_wire(int(code))
        self.message = message
        self.details = tuple(details)
        super().__init__(f"ttrpc: {self.code.name}: {message}")


class ConnectionClosed(TTRPCError):
    """The connection went away before an answer came; UNAVAILABLE tells callers a retry may work."""

    def __init__(self, message: str = "connection closed"):
        super().__init__(Code.UNAVAILABLE, message)
