"""The slice of the protobuf wire format that ttrpc's envelope needs: varints, length-delimited
fields, and skipping of fields we do not know.

Hand-written so that the package needs no protobuf runtime: the shim's `start` path and third-party
users can speak ttrpc with the stdlib alone. Every decoding failure is a `ProtocolError`, never an
IndexError or UnicodeDecodeError, because the input comes from a peer we do not trust.
"""
from __future__ import annotations

import struct

from .protocol_errors import ProtocolError

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

_MAX_VARINT_BYTES = 10
_UINT64_MASK = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    """Negative numbers go out as 64-bit two's complement (10 bytes), as protobuf does for int32/int64."""
    value &= _UINT64_MASK
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    """Returns (unsigned value, next offset)."""
    result = 0
    shift = 0
    end = len(data)
    for i in range(_MAX_VARINT_BYTES):
        if offset >= end:
            raise ProtocolError("truncated varint")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _UINT64_MASK:
                raise ProtocolError("varint exceeds 64 bits")
            return result, offset
        shift += 7
    raise ProtocolError("varint longer than 10 bytes")


def to_int64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def to_int32(value: int) -> int:
    """protobuf truncates an int32 read from a wider varint to its low 32 bits."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def tag(field_number: int, wire_type: int) -> bytes:
    return encode_varint((field_number << 3) | wire_type)


def encode_bytes_field(field_number: int, value: bytes) -> bytes:
    return tag(field_number, LENGTH_DELIMITED) + encode_varint(len(value)) + value


def encode_string_field(field_number: int, value: str) -> bytes:
    return encode_bytes_field(field_number, value.encode("utf-8"))


def encode_varint_field(field_number: int, value: int) -> bytes:
    return tag(field_number, VARINT) + encode_varint(value)


def iter_fields(data: bytes | memoryview) -> "Generator[tuple[int, int, int | bytes]]":  # noqa: F821 - no typing import: on `start`'s path
    """Yields (field number, wire type, value): an int for VARINT/FIXED*, bytes for LENGTH_DELIMITED.

    Groups (wire types 3 and 4) are refused: proto3 never emits them and skipping them correctly
    needs nesting state that a hostile peer could exploit.
    """
    view = memoryview(data)
    offset = 0
    end = len(view)
    while offset < end:
        key, offset = decode_varint(view, offset)
        field_number, wire_type = key >> 3, key & 7
        if field_number == 0 or field_number > 0x1FFFFFFF:
            raise ProtocolError(f"invalid field number {field_number}")
        if wire_type == VARINT:
            value, offset = decode_varint(view, offset)
            yield field_number, wire_type, value
        elif wire_type == LENGTH_DELIMITED:
            length, offset = decode_varint(view, offset)
            if length > end - offset:
                raise ProtocolError(f"field {field_number}: length {length} runs past the end of the message "
                                    f"({end - offset} bytes left)")
            yield field_number, wire_type, bytes(view[offset:offset + length])
            offset += length
        elif wire_type == FIXED64:
            if end - offset < 8:
                raise ProtocolError(f"field {field_number}: truncated fixed64")
            yield field_number, wire_type, struct.unpack_from("<Q", view, offset)[0]
            offset += 8
        elif wire_type == FIXED32:
            if end - offset < 4:
                raise ProtocolError(f"field {field_number}: truncated fixed32")
            yield field_number, wire_type, struct.unpack_from("<I", view, offset)[0]
            offset += 4
        else:
            raise ProtocolError(f"field {field_number}: unsupported wire type {wire_type}")


def expect(field_number: int, wire_type: int, expected: int, value: int | bytes) -> None:
    """A known field with the wrong wire type is garbage, not something to skip."""
    if wire_type != expected:
        raise ProtocolError(f"field {field_number}: wire type {wire_type}, expected {expected}")


def as_text(field_number: int, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"field {field_number}: invalid UTF-8 in string") from exc
