"""Server and client together over real unix sockets: calls, statuses, deadlines, concurrency,
size limits, credentials and shutdown."""
import asyncio
import logging
import os
import socket
import uuid

import pytest

from ttrpc import BlockingClient, Client, Code, ProtocolError, Server, Service, TTRPCError
from ttrpc.errors import ConnectionClosed
from ttrpc.messages import AnyMessage

from google.protobuf import empty_pb2, wrappers_pb2  # a hard dependency of the project, not of ttrpc

from ttrpc_harness import run, serving

SVC = "test.v1.Echo"


def echo_service(**extra_handlers) -> Service:
    service = Service(SVC)

    async def echo(ctx, request):
        return request

    async def whoami(ctx, request):
        return repr((ctx.service, ctx.method, ctx.metadata, ctx.uid, ctx.pid, ctx.deadline is not None)).encode()

    async def sleep(ctx, request):
        await asyncio.sleep(float(request.decode()))
        return b"slept " + request

    service.add("Echo", echo).add("WhoAmI", whoami).add("Sleep", sleep)
    for name, handler in extra_handlers.items():
        service.add(name, handler)
    return service


def test_unary_call_with_protobuf_types_and_metadata():
    async def upper(ctx, request):
        assert ctx.get("Containerd-Namespace") == ["default"]
        return wrappers_pb2.StringValue(value=request.value.upper())

    service = Service(SVC).add("Upper", upper, request_type=wrappers_pb2.StringValue,
                               response_type=wrappers_pb2.StringValue)

    async def scenario():
        async with serving([service]) as (_, path):
            async with await Client.connect("unix://" + path) as client:
                reply = await client.call(SVC, "Upper", wrappers_pb2.StringValue(value="abc"),
                                          wrappers_pb2.StringValue, timeout=5,
                                          metadata={"containerd-namespace": ["default"]})
                assert reply == wrappers_pb2.StringValue(value="ABC")

    run(scenario())


def test_context_carries_metadata_deadline_and_peer_credentials():
    async def scenario():
        async with serving([echo_service()]) as (_, path):
            async with await Client.connect(path) as client:
                text = await client.call(SVC, "WhoAmI", b"", timeout=5, metadata={"k": ["a", "b"], "X": "y"})
                assert text.decode() == repr((SVC, "WhoAmI", {"k": ["a", "b"], "x": ["y"]},
                                              os.geteuid(), os.getpid(), True))

    run(scenario())


def test_handler_error_becomes_status_with_details():
    async def fail(ctx, request):
        raise TTRPCError(Code.NOT_FOUND, "container c1: not found", [AnyMessage("t.Detail", b"\x01")])

    async def scenario():
        async with serving([echo_service(Fail=fail)]) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Fail", b"")
                assert raised.value.code is Code.NOT_FOUND
                assert raised.value.message == "container c1: not found"
                assert raised.value.details == (AnyMessage("t.Detail", b"\x01"),)

    run(scenario())


def test_unexpected_exception_is_internal_with_a_log_line(caplog):
    async def crash(ctx, request):
        raise KeyError("boom")

    async def scenario():
        async with serving([echo_service(Crash=crash)]) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Crash", b"")
                assert raised.value.code is Code.INTERNAL and "boom" in raised.value.message
                assert await client.call(SVC, "Echo", b"still up") == b"still up"

    with caplog.at_level(logging.ERROR, logger="ttrpc"):
        run(scenario())
    assert any("test.v1.Echo/Crash failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_unknown_service_and_method_are_unimplemented():
    async def scenario():
        async with serving([echo_service()]) as (_, path):
            async with await Client.connect(path) as client:
                for service, method, text in ((SVC, "Nope", "method Nope"), ("no.Such", "Echo", "service no.Such")):
                    with pytest.raises(TTRPCError) as raised:
                        await client.call(service, method, b"")
                    assert raised.value.code is Code.UNIMPLEMENTED and raised.value.message == text

    run(scenario())


def test_garbage_request_payload_is_invalid_argument():
    service = Service(SVC).add("Typed", lambda ctx, r: r, request_type=wrappers_pb2.StringValue,
                               response_type=wrappers_pb2.StringValue)

    async def scenario():
        async with serving([service]) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Typed", b"\x0a\x7f")
                assert raised.value.code is Code.INVALID_ARGUMENT

    run(scenario())


def test_handler_overrunning_its_timeout_gets_deadline_exceeded():
    async def scenario():
        async with serving([echo_service()]) as (_, path):
            async with await Client.connect(path) as client:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Sleep", b"5", timeout=0.2)
                assert raised.value.code is Code.DEADLINE_EXCEEDED
                assert loop.time() - started < 2
                assert await client.call(SVC, "Sleep", b"0.01", timeout=2) == b"slept 0.01"

    run(scenario())


def test_server_enforces_timeout_nano_even_when_the_client_waits_longer():
    """A raw request with timeout_nano set and no client-side timer: the server must answer."""
    from ttrpc.messages import Request
    from ttrpc_harness import RawConnection

    async def scenario():
        async with serving([echo_service()]) as (_, path):
            raw = await RawConnection.open(path)
            raw.send_request(1, Request(SVC, "Sleep", b"5", timeout_nano=100_000_000))
            stream_id, response = await raw.next_response(timeout=3)
            assert stream_id == 1 and response.status.code == Code.DEADLINE_EXCEEDED
            raw.close()

    run(scenario())


def test_slow_and_fast_requests_on_one_connection_answer_out_of_order():
    async def scenario():
        async with serving([echo_service()]) as (_, path):
            async with await Client.connect(path) as client:
                order = []

                async def call(delay):
                    result = await client.call(SVC, "Sleep", str(delay).encode(), timeout=5)
                    order.append(result)

                slow = asyncio.ensure_future(call(0.5))
                await asyncio.sleep(0.05)
                fast = asyncio.ensure_future(call(0.01))
                await asyncio.gather(slow, fast)
                assert order == [b"slept 0.01", b"slept 0.5"]
                many = await asyncio.gather(*(client.call(SVC, "Echo", str(i).encode()) for i in range(200)))
                assert many == [str(i).encode() for i in range(200)]

    run(scenario())


def test_oversized_response_becomes_resource_exhausted():
    async def huge(ctx, request):
        return b"x" * (2 << 20)

    async def scenario():
        async with serving([echo_service(Huge=huge)], max_message_length=1 << 20) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Huge", b"")
                assert raised.value.code is Code.RESOURCE_EXHAUSTED
                assert "exceeds the maximum message length" in raised.value.message
                assert await client.call(SVC, "Echo", b"ok") == b"ok"

    run(scenario())


def test_oversized_request_is_refused_by_the_client_before_sending():
    async def scenario():
        async with serving([echo_service()]) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(TTRPCError) as raised:
                    await client.call(SVC, "Echo", bytes(4 << 20))
                assert raised.value.code is Code.RESOURCE_EXHAUSTED
                assert await client.call(SVC, "Echo", b"ok") == b"ok"

    run(scenario())


def test_client_refuses_an_oversized_response_frame(caplog):
    """A server with a higher limit sends 2 MiB; a client limited to 1 MiB fails the call clearly."""
    async def big(ctx, request):
        return b"y" * (2 << 20)

    async def scenario():
        async with serving([echo_service(Big=big)]) as (_, path):
            client = await Client.connect(path, max_message_length=1 << 20)
            with pytest.raises(ProtocolError, match="exceeds the maximum message length"):
                await client.call(SVC, "Big", b"", timeout=5)
            with pytest.raises(ProtocolError):
                await client.call(SVC, "Echo", b"")
            await client.close()

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert any("protocol error from the server" in r.getMessage() for r in caplog.records)


def test_peer_with_another_uid_is_refused_with_a_log_line(caplog):
    async def scenario():
        async with serving([echo_service()], check_peer_uid=True, expected_uid=os.geteuid() + 1) as (_, path):
            async with await Client.connect(path) as client:
                with pytest.raises(ConnectionClosed):
                    await client.call(SVC, "Echo", b"hi", timeout=3)

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert any("refusing connection" in r.getMessage() and f"uid {os.geteuid() + 1} required" in r.getMessage()
               for r in caplog.records)


def test_peer_with_the_same_uid_is_served_when_checking():
    async def scenario():
        async with serving([echo_service()], check_peer_uid=True) as (_, path):
            async with await Client.connect(path) as client:
                assert await client.call(SVC, "Echo", b"hi") == b"hi"

    run(scenario())


def test_abstract_socket_and_blocking_client():
    name = f"@ttrpc-test-{uuid.uuid4().hex}"

    async def scenario():
        server = Server([echo_service()])
        await server.serve_unix(name)
        try:
            async with await Client.connect(name) as client:
                assert await client.call(SVC, "Echo", b"abstract") == b"abstract"

            def blocking():
                with BlockingClient("unix://" + name, timeout=2) as client:
                    assert client.call(SVC, "Echo", b"sync", timeout=2) == b"sync"
                    with pytest.raises(TTRPCError) as raised:
                        client.call(SVC, "Sleep", b"5", timeout=0.2)
                    assert raised.value.code is Code.DEADLINE_EXCEEDED
                    with pytest.raises(TTRPCError) as raised:
                        client.call(SVC, "Missing", b"")
                    assert raised.value.code is Code.UNIMPLEMENTED
                    # the late answer to the timed-out call must not be taken for this one
                    assert client.call(SVC, "Echo", b"after", timeout=2) == b"after"

            await asyncio.to_thread(blocking)
        finally:
            await server.shutdown(grace=1)

    run(scenario())


def test_serve_socket_takes_a_listening_socket_handed_over(tmp_path):
    path = str(tmp_path / "handed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)

    async def scenario():
        server = Server([echo_service()])
        await server.serve_socket(listener)
        async with await Client.connect(path) as client:
            assert await client.call(SVC, "Echo", b"handed") == b"handed"
        await server.shutdown()
        await server.wait_closed()

    run(scenario())


def test_serve_unix_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening

    async def scenario():
        first = Server([echo_service()])
        await first.serve_unix(path)
        with pytest.raises(OSError, match="in use"):
            await Server([echo_service()]).serve_unix(path)
        await first.shutdown()
        assert not os.path.exists(path)

    run(scenario())


def test_shutdown_finishes_in_flight_requests_and_refuses_new_connections():
    async def scenario():
        async with serving([echo_service()]) as (server, path):
            client = await Client.connect(path)
            in_flight = asyncio.ensure_future(client.call(SVC, "Sleep", b"0.3", timeout=5))
            await asyncio.sleep(0.05)
            await server.shutdown(grace=3)
            assert await in_flight == b"slept 0.3"
            await asyncio.wait_for(server.wait_closed(), 2)
            with pytest.raises(OSError):
                await Client.connect(path)
            with pytest.raises(ConnectionClosed):
                await client.call(SVC, "Echo", b"")
            await client.close()

    run(scenario())


def test_shutdown_cancels_requests_that_outlive_the_grace(caplog):
    async def scenario():
        async with serving([echo_service()]) as (server, path):
            client = await Client.connect(path)
            stuck = asyncio.ensure_future(client.call(SVC, "Sleep", b"30"))
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.shutdown(grace=0.2)
            assert loop.time() - started < 2
            with pytest.raises(TTRPCError) as raised:
                await stuck
            assert raised.value.code is Code.UNAVAILABLE
            await client.close()

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    assert any("cancelling 1 request" in r.getMessage() for r in caplog.records)


def test_shutdown_called_from_a_handler_still_answers_it():
    holder = {}

    async def stop(ctx, request):
        await holder["server"].shutdown(grace=1)
        return b"bye"

    async def scenario():
        async with serving([echo_service(Stop=stop)]) as (server, path):
            holder["server"] = server
            async with await Client.connect(path) as client:
                assert await client.call(SVC, "Stop", b"", timeout=3) == b"bye"
                await asyncio.wait_for(server.wait_closed(), 2)

    run(scenario())


def test_server_streaming_with_add_stream():
    async def count(ctx, request):
        for i in range(int(request.decode())):
            yield str(i).encode()

    async def broken(ctx, request):
        yield b"first"
        raise TTRPCError(Code.ABORTED, "stopped")

    service = echo_service().add_stream("Count", count).add_stream("Broken", broken)

    async def scenario():
        async with serving([service]) as (_, path):
            async with await Client.connect(path) as client:
                assert [m async for m in client.stream(SVC, "Count", b"3", timeout=5)] == [b"0", b"1", b"2"]
                assert [m async for m in client.stream(SVC, "Count", b"0")] == []
                received = []
                with pytest.raises(TTRPCError) as raised:
                    async for message in client.stream(SVC, "Broken", b""):
                        received.append(message)
                assert received == [b"first"] and raised.value.code is Code.ABORTED
                assert await client.call(SVC, "Echo", b"unary still works") == b"unary still works"

    run(scenario())
