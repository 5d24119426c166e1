"""ttrpc framing, sans-IO: bytes in, frames out; frames in, bytes out.

A frame is a 10-byte header (data length u32 BE, stream id u32 BE, type u8, flags u8) and the data.
No socket is touched here, so the same code serves the asyncio server and client, the blocking
client, and tests and fuzzers that only have bytes. The size limit is enforced from the header alone,
before any data is buffered, so a hostile length cannot make us allocate.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import MessageTooLarge, ProtocolError

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
_HEADER = struct.Struct(">IIBB")


class FrameType(enum.IntEnum):
    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


class Flag(enum.IntFlag):
    """Request: REMOTE_CLOSED|REMOTE_OPEN say whether the client will send Data frames.
    Data: REMOTE_CLOSED ends the sender's side; NO_DATA marks a frame without payload."""

    NONE = 0
    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: FrameType
    data: bytes = b""
    flags: int = 0


def encode_frame(frame: Frame, max_message_length: int = MAX_MESSAGE_LENGTH) -> bytes:
    """Refuses to produce a frame the peer must refuse: raises MessageTooLarge instead."""
    length = len(frame.data)
    if length > max_message_length:
        raise MessageTooLarge(length, max_message_length, frame.stream_id)
    if not 0 <= frame.stream_id <= 0xFFFFFFFF:
        raise ValueError(f"stream id {frame.stream_id} does not fit in 32 bits")
    return _HEADER.pack(length, frame.stream_id, int(frame.type), int(frame.flags)) + frame.data


class FrameDecoder:
    """Accumulates bytes and splits them into frames.

    A bad header (oversized length, unknown type) poisons the decoder: the stream after it cannot be
    resynchronised. Frames decoded before the bad header in the same `feed` are still returned, and
    the error is raised at the next `feed`; when the bad header comes first it is raised at once.
    `error` exposes it for IO layers that want to act without another call.
    """

    def __init__(self, max_message_length: int = MAX_MESSAGE_LENGTH):
        self.max_message_length = max_message_length
        self._buffer = bytearray()
        self.error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame; never more than HEADER_LENGTH + the limit."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        if self.error is not None:
            raise self.error
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        available = len(buffer)
        while available - offset >= HEADER_LENGTH:
            length, stream_id, frame_type, flags = _HEADER.unpack_from(buffer, offset)
            problem = self._check_header(length, stream_id, frame_type)
            if problem is not None:
                self.error = problem
                buffer.clear()
                if frames:
                    return frames
                raise problem
            end = offset + HEADER_LENGTH + length
            if end > available:
                break
            frames.append(Frame(stream_id, FrameType(frame_type), bytes(buffer[offset + HEADER_LENGTH:end]), flags))
            offset = end
        if offset:
            del buffer[:offset]
        return frames

    def _check_header(self, length: int, stream_id: int, frame_type: int) -> ProtocolError | None:
        if length > self.max_message_length:
            return MessageTooLarge(length, self.max_message_length, stream_id)
        if frame_type not in _KNOWN_TYPES:
            return ProtocolError(f"unknown frame type 0x{frame_type:02x} on stream {stream_id}")
        return None


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
