"""Just enough protobuf wire format for `start`, `delete` and `-info`, which must not import protobuf,
and for the few messages the `kybernate` command decodes by hand (containerd's namespace list).

They run on every ``ctr run``; importing the protobuf runtime costs tens of milliseconds there. They
read runtime options (`shim.runtime.options`) and write a DeleteResponse or a RuntimeInfo: a few varints and
length-delimited fields.

The reader checks every bound (a truncated varint, a length past the end, a varint over 64 bits, a
field number protobuf cannot have): the bytes come from containerd's stdin or socket, and a bad
message must be a WireError, never an IndexError or a silently short field. ttrpc/wire.py has the
same rules for ttrpc's envelope; it is not reused here because importing `ttrpc.wire` runs
ttrpc/__init__, which loads asyncio and the server (120-180 ms measured with ``python -X importtime``
against 2-4 ms for this module), too much for `start`.
"""
from __future__ import annotations

class WireError(ValueError):
    """Bytes that are not the protobuf message they claim to be."""


_UINT64_MAX = (1 << 64) - 1
_MAX_FIELD_NUMBER = (1 << 29) - 1


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result > _UINT64_MAX:
                raise WireError("varint exceeds 64 bits")
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints/fixed, bytes for length-delimited (wire type 2).

    Groups (wire types 3, 4) and unknown wire types are refused: proto3 never writes them."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wtype = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise WireError(f"invalid field number {number}")
        if wtype == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wtype == 2:
            length, pos = _varint(data, pos)
            if length > end - pos:
                raise WireError(f"field {number}: length {length} runs past the end of the message "
                                f"({end - pos} bytes left)")
            out.append((number, data[pos:pos + length]))
            pos += length
        elif wtype == 1:
            if end - pos < 8:
                raise WireError(f"field {number}: truncated fixed64")
            out.append((number, int.from_bytes(data[pos:pos + 8], "little")))
            pos += 8
        elif wtype == 5:
            if end - pos < 4:
                raise WireError(f"field {number}: truncated fixed32")
            out.append((number, int.from_bytes(data[pos:pos + 4], "little")))
            pos += 4
        else:
            raise WireError(f"field {number}: unsupported wire type {wtype}")
    return out


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_bytes_field(number: int, value: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value


def encode_varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value) if value else b""


def runtime_info(name: str, version: str, revision: str = "") -> bytes:
    """``containerd.types.RuntimeInfo{name=1, version=2 RuntimeVersion{version=1, revision=2}}``."""
    ver = encode_bytes_field(1, version.encode())
    if revision:
        ver += encode_bytes_field(2, revision.encode())
    return encode_bytes_field(1, name.encode()) + encode_bytes_field(2, ver)


def timestamp(nanos: int) -> bytes:
    """google.protobuf.Timestamp{seconds=1, nanos=2}."""
    return encode_varint_field(1, nanos // 1_000_000_000) + encode_varint_field(2, nanos % 1_000_000_000)


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3} (what `delete` prints)."""
    return (encode_varint_field(1, pid) + encode_varint_field(2, exit_status)
            + encode_bytes_field(3, timestamp(exited_at_ns)))
