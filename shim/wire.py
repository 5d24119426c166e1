"""Just enough protobuf wire format for `start`, `delete` and `-info`, which must not import protobuf,
and for the few messages the `kybernate` command decodes by hand (containerd's namespace list).

They run on every ``ctr run``; importing the protobuf runtime costs tens of milliseconds there. They
read runtime options (`shim.runtime.options`) and write a DeleteResponse or a RuntimeInfo: a few varints and
length-delimited fields.

The reader checks every bound (a truncated varint, a length past the end, a varint over 64 bits, a
field number protobuf cannot have): the bytes come from containerd's stdin or socket, and a bad
message must be a WireError, never an IndexError or a silently short field. ttrpc/wire.py has the
rules as ttrpc's envelope because it IS ttrpc's reader (`ttrpc.wire.iter_fields`): ttrpc/__init__
loads its names lazily and ttrpc.wire imports only `struct`, so the one bounds-checked reader costs
`start` about a millisecond instead of the 120-180 ms of asyncio and the server.
"""
from __future__ import annotations

class WireError(ValueError):
    """Bytes that are not the protobuf message they claim to be."""


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints/fixed, bytes for length-delimited (wire type 2).

    The reader is ttrpc's (`ttrpc.wire.iter_fields`: bounds-checked, groups and unknown wire types
    refused); its ProtocolError becomes a WireError here."""
    from ttrpc.protocol_errors import ProtocolError
    from ttrpc.wire import iter_fields

    try:
        return [(number, value) for number, _wire_type, value in iter_fields(data)]
    except ProtocolError as exc:
        raise WireError(str(exc)) from None


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
