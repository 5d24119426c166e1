"""Bytes that are not ttrpc: the errors of the sans-IO wire layer, in a module with no imports so
that `ttrpc.wire` (also the protobuf field reader on the shim's `start` path) stays cheap to import."""
from __future__ import annotations


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
