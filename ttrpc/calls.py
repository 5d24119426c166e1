"""The client half of a unary call, sans-IO: request frame out, result or error in.

Shared by the asyncio `Client` and the `BlockingClient` so both send the same bytes and raise the
same errors.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from .codes import Code
from .errors import ProtocolError, TTRPCError
from .framing import Flag, Frame, FrameType, encode_frame
from .messages import KeyValue, Request, Response

Metadata = Mapping[str, Union[str, Sequence[str]]]


def serialize(message: Any) -> bytes:
    """Accepts raw bytes or anything with SerializeToString (protobuf messages)."""
    if message is None:
        return b""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    return message.SerializeToString()


def metadata_pairs(metadata: Optional[Metadata]) -> tuple[KeyValue, ...]:
    """Keys are lowercased as Go's ttrpc.MD does, so lookups match on both sides."""
    if not metadata:
        return ()
    pairs = []
    for key, values in metadata.items():
        if isinstance(values, str):
            values = [values]
        pairs.extend(KeyValue(key.lower(), value) for value in values)
    return tuple(pairs)


def request_frame(stream_id: int, service: str, method: str, request: Any, timeout: Optional[float],
                  metadata: Optional[Metadata], max_message_length: int, flags: int = 0) -> bytes:
    """Raises TTRPCError(RESOURCE_EXHAUSTED) for a request the server would have to refuse, so the
    caller learns it without the connection being torn down."""
    timeout_nano = 0 if timeout is None else max(1, int(timeout * 1e9))
    data = Request(service, method, serialize(request), timeout_nano, metadata_pairs(metadata)).encode()
    if len(data) > max_message_length:
        raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                         f"{service}/{method}: request of {len(data)} bytes exceeds the maximum message "
                         f"length of {max_message_length} bytes")
    return encode_frame(Frame(stream_id, FrameType.REQUEST, data, flags), max_message_length)


def unary_result(frame_data: bytes, response_type: Any, name: str) -> Any:
    """Decodes a Response frame's data: the response message, or raises the status as TTRPCError."""
    response = Response.decode(frame_data)
    return payload_result(response, response_type, name)


def payload_result(response: Response, response_type: Any, name: str) -> Any:
    status = response.status
    if status.code != Code.OK:
        raise TTRPCError(status.code, status.message, status.details)
    return decode_payload(response.payload, response_type, name)


def decode_payload(payload: bytes, response_type: Any, name: str) -> Any:
    if response_type is None:
        return payload
    try:
        return response_type.FromString(payload)
    except Exception as exc:
        raise ProtocolError(f"{name}: cannot decode response: {exc}") from exc


def deadline_error(name: str, timeout: float) -> TTRPCError:
    return TTRPCError(Code.DEADLINE_EXCEEDED, f"{name}: no response within {timeout:g}s")


STREAM_REQUEST_FLAGS = int(Flag.REMOTE_CLOSED)
