"""A misbehaving peer: each kind of bad input gets an error status or a closed connection and a log
line, and the server keeps serving everyone else."""
import asyncio
import logging
import struct

from ttrpc import Client, Code, Service
from ttrpc.framing import Flag, Frame, FrameType, MAX_MESSAGE_LENGTH, encode_frame
from ttrpc.messages import Request, Response

from ttrpc_harness import RawConnection, run, serving

SVC = "test.v1.Echo"
finished = []


def service() -> Service:
    async def echo(ctx, request):
        return request

    async def sleep(ctx, request):
        await asyncio.sleep(float(request.decode()))
        finished.append(request)
        return request

    return Service(SVC).add("Echo", echo).add("Sleep", sleep)


async def others_still_served(path: str) -> None:
    async with await Client.connect(path) as client:
        assert await client.call(SVC, "Echo", b"alive", timeout=3) == b"alive"


def messages(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_truncated_frame_then_hangup_is_logged(caplog):
    async def scenario():
        async with serving([service()]) as (_, path):
            raw = await RawConnection.open(path)
            raw.send(encode_frame(Frame(1, FrameType.REQUEST, Request(SVC, "Echo", b"x").encode()))[:-3])
            await asyncio.sleep(0.05)
            raw.close()
            await asyncio.sleep(0.05)
            await others_still_served(path)

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert "closed in the middle of a frame" in messages(caplog)


def test_oversized_incoming_frame_gets_resource_exhausted_then_close(caplog):
    async def scenario():
        async with serving([service()]) as (_, path):
            raw = await RawConnection.open(path)
            raw.send(struct.pack(">IIBB", MAX_MESSAGE_LENGTH + 1, 5, FrameType.REQUEST, 0) + b"\x00" * 1000)
            assert await raw.closed_by_peer()
            assert len(raw.frames) == 1
            frame = raw.frames[0]
            response = Response.decode(frame.data)
            assert frame.stream_id == 5 and response.status.code == Code.RESOURCE_EXHAUSTED
            raw.close()
            await others_still_served(path)

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert "exceeds the maximum message length" in messages(caplog)


def test_unknown_frame_type_closes_the_connection(caplog):
    async def scenario():
        async with serving([service()]) as (_, path):
            raw = await RawConnection.open(path)
            raw.send(struct.pack(">IIBB", 0, 1, 0x09, 0))
            assert await raw.closed_by_peer()
            raw.close()
            await others_still_served(path)

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert "unknown frame type 0x09" in messages(caplog)


def test_garbage_envelope_and_bad_stream_ids_get_invalid_argument(caplog):
    async def scenario():
        async with serving([service()]) as (_, path):
            raw = await RawConnection.open(path)
            raw.send(encode_frame(Frame(1, FrameType.REQUEST, b"\x0a\x7fgarbage")))
            stream_id, response = await raw.next_response()
            assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)
            assert "cannot decode request" in response.status.message
            raw.send_request(4, Request(SVC, "Echo", b"even"))
            stream_id, response = await raw.next_response()
            assert (stream_id, response.status.code) == (4, Code.INVALID_ARGUMENT)
            raw.send_request(1, Request(SVC, "Echo", b"reused"))
            stream_id, response = await raw.next_response()
            assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)
            raw.send_request(3, Request(SVC, "Echo", b"fine"))
            stream_id, response = await raw.next_response()
            assert (stream_id, response.status.code, response.payload) == (3, 0, b"fine")
            raw.close()

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert "undecodable request on stream 1" in messages(caplog)


def test_client_streaming_requests_are_unimplemented_and_their_data_ignored():
    async def scenario():
        async with serving([service()]) as (_, path):
            raw = await RawConnection.open(path)
            for stream_id, method in ((1, "Upload"), (3, "Echo")):
                raw.send_request(stream_id, Request(SVC, method), flags=Flag.REMOTE_OPEN)
                raw.send(encode_frame(Frame(stream_id, FrameType.DATA, b"chunk")))
                raw.send(encode_frame(Frame(stream_id, FrameType.DATA, b"", Flag.REMOTE_CLOSED | Flag.NO_DATA)))
                got_id, response = await raw.next_response()
                assert (got_id, response.status.code) == (stream_id, Code.UNIMPLEMENTED)
            raw.send(encode_frame(Frame(99, FrameType.DATA, b"stray")))
            raw.send(encode_frame(Frame(101, FrameType.RESPONSE, b"")))
            raw.send_request(5, Request(SVC, "Echo", b"unary"))
            got_id, response = await raw.next_response()
            assert (got_id, response.payload) == (5, b"unary")
            raw.close()

    run(scenario())


def test_client_vanishing_mid_request_cancels_it(caplog):
    finished.clear()

    async def scenario():
        async with serving([service()]) as (server, path):
            raw = await RawConnection.open(path)
            raw.send_request(1, Request(SVC, "Sleep", b"0.3"))
            await asyncio.sleep(0.05)
            assert server.requests_in_flight == 1
            raw.writer.transport.abort()
            await others_still_served(path)
            await asyncio.sleep(0.05)
            assert server.requests_in_flight == 0  # cancelled with its connection, not left to run
            await asyncio.sleep(0.4)
            assert finished == []  # the handler never ran to its end
            await others_still_served(path)

    with caplog.at_level(logging.INFO, logger="ttrpc"):
        run(scenario())
    assert "went away with 1 request(s) in flight: cancelling them" in messages(caplog)
