"""Framing: the exact 10-byte header, splitting and joining of frames, and the size limit."""
import struct

import pytest

from ttrpc import MAX_MESSAGE_LENGTH, Frame, FrameDecoder, FrameType, ProtocolError, encode_frame
from ttrpc.errors import MessageTooLarge
from ttrpc.framing import Flag, HEADER_LENGTH


def test_header_layout_is_big_endian_length_stream_type_flags():
    data = encode_frame(Frame(0x01020305, FrameType.RESPONSE, b"abc", 0x05))
    assert data == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x05" + b"\x02" + b"\x05" + b"abc"
    assert HEADER_LENGTH == 10 and MAX_MESSAGE_LENGTH == 4 << 20


def test_decoder_reassembles_frames_fed_one_byte_at_a_time():
    frames = [Frame(1, FrameType.REQUEST, b"x" * 300), Frame(3, FrameType.DATA, b"", int(Flag.REMOTE_CLOSED)),
              Frame(5, FrameType.RESPONSE, b"yz")]
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    seen = []
    for i in range(len(stream)):
        seen.extend(decoder.feed(stream[i:i + 1]))
    assert seen == frames
    assert decoder.buffered == 0


def test_decoder_returns_every_frame_of_one_chunk_and_keeps_the_partial_rest():
    one, two = Frame(1, FrameType.REQUEST, b"a"), Frame(3, FrameType.REQUEST, b"bcd")
    stream = encode_frame(one) + encode_frame(two)
    decoder = FrameDecoder()
    assert decoder.feed(stream[:-2]) == [one]
    assert decoder.buffered == HEADER_LENGTH + 1
    assert decoder.feed(stream[-2:]) == [two]


def test_oversized_length_is_refused_from_the_header_alone():
    decoder = FrameDecoder()
    header = struct.pack(">IIBB", MAX_MESSAGE_LENGTH + 1, 7, 1, 0)
    with pytest.raises(MessageTooLarge) as raised:
        decoder.feed(header)
    assert raised.value.stream_id == 7
    assert "exceeds the maximum message length" in str(raised.value)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):  # poisoned: the stream cannot be resynchronised
        decoder.feed(b"\x00" * 20)


def test_exactly_the_limit_is_accepted():
    decoder = FrameDecoder(max_message_length=16)
    frame = Frame(1, FrameType.REQUEST, b"z" * 16)
    assert decoder.feed(encode_frame(frame, 16)) == [frame]


def test_encoder_refuses_to_produce_an_oversized_frame():
    with pytest.raises(MessageTooLarge):
        encode_frame(Frame(1, FrameType.RESPONSE, b"z" * 17), max_message_length=16)
    with pytest.raises(MessageTooLarge):
        encode_frame(Frame(1, FrameType.RESPONSE, bytes(MAX_MESSAGE_LENGTH + 1)))


def test_unknown_frame_type_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown frame type 0x07"):
        FrameDecoder().feed(struct.pack(">IIBB", 0, 1, 7, 0))


def test_frames_before_a_bad_header_are_delivered_then_the_error():
    good = Frame(1, FrameType.REQUEST, b"ok")
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(good) + struct.pack(">IIBB", 0, 3, 9, 0)) == [good]
    assert isinstance(decoder.error, ProtocolError)
    with pytest.raises(ProtocolError):
        decoder.feed(b"")
