"""The hand-written protobuf codec of ttrpc's envelope, checked against protobuf's own encoder."""
import pytest

from ttrpc import ProtocolError
from ttrpc import wire
from ttrpc.codes import Code
from ttrpc.messages import AnyMessage, KeyValue, Request, Response, Status

# protobuf is a hard dependency of the project (ttrpc itself is stdlib-only): a missing one is a failure
from proto.google.rpc import status_pb2
from proto.ttrpc import request_pb2


def sample_request(**changes):
    fields = dict(service="containerd.task.v2.Task", method="Create", payload=b"\x0a\x03abc",
                  timeout_nano=5_000_000_000,
                  metadata=(KeyValue("containerd-namespace", "default"), KeyValue("k", "v1"), KeyValue("k", "v2")))
    fields.update(changes)
    return Request(**fields)


def test_request_round_trip_and_protobuf_agrees():
    ours = sample_request()
    assert Request.decode(ours.encode()) == ours
    theirs = request_pb2.Request.FromString(ours.encode())
    assert theirs.service == ours.service and theirs.method == ours.method
    assert theirs.payload == ours.payload and theirs.timeout_nano == ours.timeout_nano
    assert [(kv.key, kv.value) for kv in theirs.metadata] == [(kv.key, kv.value) for kv in ours.metadata]
    assert theirs.SerializeToString() == ours.encode()


def test_negative_timeout_uses_ten_byte_varint_like_protobuf():
    ours = sample_request(timeout_nano=-1)
    assert Request.decode(ours.encode()).timeout_nano == -1
    assert request_pb2.Request(timeout_nano=-1).SerializeToString() == wire.encode_varint_field(4, -1)


def test_response_with_error_status_and_details_matches_protobuf():
    status = Status(Code.NOT_FOUND, "container x: not found", (AnyMessage("containerd.types.Foo", b"\x08\x01"),))
    ours = Response(status, b"payload")
    assert Response.decode(ours.encode()) == ours
    theirs = request_pb2.Response.FromString(ours.encode())
    assert theirs.status.code == 5 and theirs.status.message == status.message
    assert theirs.status.details[0].type_url == "containerd.types.Foo"
    decoded = Response.decode(theirs.SerializeToString())
    assert decoded == ours


def test_protobuf_encoded_response_without_status_means_ok():
    assert Response.decode(request_pb2.Response(payload=b"p").SerializeToString()) == Response(Status(), b"p")


def test_negative_status_code_decodes_as_int32():
    raw = status_pb2.Status(code=-3, message="odd").SerializeToString()
    assert Status.decode(raw).code == -3


def test_unknown_fields_of_every_wire_type_are_skipped():
    extra = (wire.encode_varint_field(99, 7) + wire.tag(98, wire.FIXED64) + b"\x00" * 8
             + wire.tag(97, wire.FIXED32) + b"\x00" * 4 + wire.encode_bytes_field(96, b"zz"))
    ours = sample_request()
    assert Request.decode(extra + ours.encode() + extra) == ours


@pytest.mark.parametrize("garbage, reason", [
    (b"\x0a\x05ab", "runs past the end"),               # length beyond the message
    (b"\x0a", "truncated varint"),                      # tag then nothing
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),   # endless varint
    (b"\x0b", "unsupported wire type 3"),               # group start
    (b"\x00\x00", "invalid field number 0"),
    (b"\x08\x01", "wire type 0, expected 2"),           # service as a varint
    (b"\x0a\x02\xff\xfe", "invalid UTF-8"),
    (b"\x21\x00\x00", "truncated fixed64"),
])
def test_garbage_is_a_protocol_error(garbage, reason):
    with pytest.raises(ProtocolError, match=reason):
        Request.decode(garbage)


def test_varint_round_trip_at_the_edges():
    for value in (0, 1, 127, 128, 2**31 - 1, 2**63 - 1, 2**64 - 1):
        assert wire.decode_varint(wire.encode_varint(value), 0) == (value, len(wire.encode_varint(value)))
    with pytest.raises(ProtocolError, match="exceeds 64 bits"):
        wire.decode_varint(b"\xff" * 9 + b"\x7f", 0)


def test_code_from_unknown_number_is_unknown():
    assert Code.from_wire(5) is Code.NOT_FOUND
    assert Code.from_wire(1234) is Code.UNKNOWN
