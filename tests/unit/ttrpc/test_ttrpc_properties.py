"""Properties over arbitrary input: the decoders fail only with ProtocolError and never hold more
than one frame's worth of bytes; everything we encode decodes back to itself."""
from hypothesis import given, settings, strategies as st

from ttrpc import ProtocolError
from ttrpc.framing import Frame, FrameDecoder, FrameType, HEADER_LENGTH, encode_frame
from ttrpc.messages import AnyMessage, KeyValue, Request, Response, Status

LIMIT = 64
chunks = st.lists(st.binary(max_size=200), max_size=20)


@settings(max_examples=400, deadline=None)
@given(chunks)
def test_decoder_on_arbitrary_bytes_raises_only_protocol_error_and_stays_bounded(pieces):
    decoder = FrameDecoder(max_message_length=LIMIT)
    for piece in pieces:
        try:
            frames = decoder.feed(piece)
        except ProtocolError:
            assert decoder.buffered == 0
            return
        assert decoder.buffered < HEADER_LENGTH + LIMIT
        assert all(len(frame.data) <= LIMIT for frame in frames)


frames = st.builds(Frame, st.integers(0, 2**32 - 1), st.sampled_from(list(FrameType)),
                   st.binary(max_size=LIMIT), st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 2000), max_size=6))
def test_frames_survive_any_split(original, cuts):
    stream = b"".join(encode_frame(frame, LIMIT) for frame in original)
    points = sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]
    decoder, seen, start = FrameDecoder(LIMIT), [], 0
    for point in points:
        seen.extend(decoder.feed(stream[start:point]))
        start = point
    assert seen == original and decoder.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_envelope_decoders_raise_only_protocol_error(data):
    for message_type in (Request, Response, Status, KeyValue, AnyMessage):
        try:
            message_type.decode(data)
        except ProtocolError:
            pass


text = st.text(max_size=30)
requests = st.builds(Request, text, text, st.binary(max_size=50), st.integers(-2**63, 2**63 - 1),
                     st.lists(st.builds(KeyValue, text, text), max_size=4).map(tuple))
statuses = st.builds(Status, st.integers(-2**31, 2**31 - 1), text,
                     st.lists(st.builds(AnyMessage, text, st.binary(max_size=20)), max_size=3).map(tuple))


@settings(max_examples=300, deadline=None)
@given(requests, statuses, st.binary(max_size=50))
def test_envelope_round_trip(request, status, payload):
    assert Request.decode(request.encode()) == request
    assert Response.decode(Response(status, payload).encode()) == Response(status, payload)
