"""Requests in flight are bounded and die with their connection.

A Wait is in flight for as long as its process runs, so a client that opens connections and sends
Waits (or a containerd that reconnects again and again) must not be able to grow the server without
limit, and a connection's requests must not outlive it. The flood test runs the server in a process
of its own, so its memory and file descriptors are measured alone."""
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ttrpc import Client, Code, Service
from ttrpc.messages import Request, Response

from ttrpc_harness import RawConnection, run, serving

SVC = "test.v1.Waiter"
REPO = Path(__file__).resolve().parents[3]


def waiter_service(release: asyncio.Event, cancelled: list) -> Service:
    async def wait(ctx, request):
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        return request

    async def echo(ctx, request):
        return request

    return Service(SVC).add("Wait", wait).add("Echo", echo)


async def answers(raw: RawConnection, count: int) -> dict[int, Response]:
    got: dict[int, Response] = {}
    while len(got) < count:
        stream_id, response = await raw.next_response()
        got[stream_id] = response
    return got


def test_per_connection_cap_answers_resource_exhausted_and_recovers(caplog):
    async def scenario():
        release, cancelled = asyncio.Event(), []
        async with serving([waiter_service(release, cancelled)], max_requests_per_connection=5) as (server, path):
            raw = await RawConnection.open(path)
            for i in range(8):
                raw.send_request(2 * i + 1, Request(SVC, "Wait", b"w%d" % i))
            refused = await answers(raw, 3)  # the three over the cap are answered at once
            assert sorted(refused) == [11, 13, 15]
            for response in refused.values():
                assert response.status.code == Code.RESOURCE_EXHAUSTED
                assert "too many requests in flight on this connection (5, the limit is 5)" in response.status.message
                assert response.status.message.startswith(f"{SVC}/Wait: ")
            assert server.requests_in_flight == 5
            # another connection is not affected by this one's cap
            async with await Client.connect(path) as client:
                assert await client.call(SVC, "Echo", b"other", timeout=3) == b"other"
            release.set()
            done = await answers(raw, 5)
            assert {sid: r.status.code for sid, r in done.items()} == {1: 0, 3: 0, 5: 0, 7: 0, 9: 0}
            raw.send_request(17, Request(SVC, "Echo", b"again"))
            assert (await answers(raw, 1))[17].payload == b"again"
            raw.close()

    with caplog.at_level(logging.WARNING, logger="ttrpc"):
        run(scenario())
    refusals = [r for r in caplog.records if "refusing requests" in r.getMessage()]
    assert len(refusals) == 1, "logged once per episode, not once per refused request"


def test_server_wide_cap_counts_every_connection():
    async def scenario():
        release, cancelled = asyncio.Event(), []
        async with serving([waiter_service(release, cancelled)], max_requests_per_connection=5,
                           max_requests_in_flight=6) as (server, path):
            first, second = await RawConnection.open(path), await RawConnection.open(path)
            for i in range(4):
                first.send_request(2 * i + 1, Request(SVC, "Wait", b"a"))
            await asyncio.sleep(0.1)
            for i in range(4):
                second.send_request(2 * i + 1, Request(SVC, "Wait", b"b"))
            refused = await answers(second, 1)
            assert sorted(refused) == [7]
            for response in refused.values():
                assert response.status.code == Code.RESOURCE_EXHAUSTED
                assert ("on this server (7 over all connections, the limit is 6; this connection has 3)"
                        in response.status.message)
            assert server.requests_in_flight == 7  # 4 + 3: the second connection was below its share (3)
            # a third connection, below its share (2), is still served though the server is over the cap
            async with await Client.connect(path) as client:
                assert await client.call(SVC, "Echo", b"third", timeout=3) == b"third"
            release.set()
            await answers(first, 4)
            await answers(second, 3)
            assert server.requests_in_flight == 0
            first.close()
            second.close()

    run(scenario())


def test_closing_a_connection_cancels_its_requests_and_frees_its_socket():
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario():
        release, cancelled = asyncio.Event(), []
        async with serving([waiter_service(release, cancelled)]) as (server, path):
            async with await Client.connect(path) as client:  # warm-up: lazily opened fds of the loop
                await client.call(SVC, "Echo", b"x", timeout=3)
            before = fds()
            for _ in range(50):  # settled: the warm-up client's socket may close a little later under load
                await asyncio.sleep(0.1)
                now = fds()
                if now == before:
                    break
                before = now
            raws = [await RawConnection.open(path) for _ in range(20)]
            for raw in raws:
                for i in range(50):
                    raw.send_request(2 * i + 1, Request(SVC, "Wait", b"w"))
            deadline = time.monotonic() + 5
            while server.requests_in_flight < 1000 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert server.requests_in_flight == 1000
            assert fds() >= before + 40  # both ends of 20 connections
            for raw in raws:
                raw.close()
            deadline = time.monotonic() + 5
            while (server.requests_in_flight or fds() > before) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert server.requests_in_flight == 0
            assert len(cancelled) == 1000
            assert fds() <= before, "the closed connections' sockets are still open"
            assert not release.is_set()

    run(scenario())


SERVER = textwrap.dedent("""
    import asyncio, sys
    from ttrpc import Server, Service

    async def main():
        gate = asyncio.Event()

        async def wait(ctx, request):
            await gate.wait()
            return request

        async def in_flight(ctx, request):
            return str(server.requests_in_flight - 1).encode()  # not counting this one

        server = Server([Service("test.v1.Waiter").add("Wait", wait).add("InFlight", in_flight)])
        await server.serve_unix(sys.argv[1])
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
""")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_waits_is_bounded_in_memory_and_fds():
    """100 connections x 1000 Waits: at most the server's cap runs, the rest are refused, the
    server's memory stays bounded, and closing the connections gives every fd back."""
    connections, per_connection = 100, 1000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flood.sock")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", SERVER, path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"

            async def in_flight() -> int:
                async with await Client.connect(path) as client:
                    return int(await client.call(SVC, "InFlight", b"", timeout=30))  # busy with the flood

            async def flood():
                assert await in_flight() == 0
                await asyncio.sleep(0.2)  # the query's connection closed on the server's side too
                fds_before, rss_before = len(os.listdir(f"/proc/{proc.pid}/fd")), _rss_kib(proc.pid)
                raws = [await RawConnection.open(path) for _ in range(connections)]
                refused = [0]
                wrong: list = []

                async def read_refusals(raw: RawConnection) -> None:
                    while True:
                        try:
                            frame = await raw.next_frame(timeout=120)
                        except (EOFError, ConnectionError):
                            return
                        status = Response.decode(frame.data).status
                        if status.code == Code.RESOURCE_EXHAUSTED:
                            refused[0] += 1
                        else:
                            wrong.append(status)

                async def send(raw: RawConnection) -> None:
                    for i in range(per_connection):
                        raw.send_request(2 * i + 1, Request(SVC, "Wait", b"w"))
                        if i % 100 == 99:
                            await raw.writer.drain()
                    await raw.writer.drain()

                readers = [asyncio.ensure_future(read_refusals(raw)) for raw in raws]
                await asyncio.gather(*(send(raw) for raw in raws))
                deadline = time.monotonic() + 60
                running = await in_flight()
                while running + refused[0] < connections * per_connection and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    running = await in_flight()
                assert not wrong, wrong[:3]
                # the server-wide cap, each connection served up to its share of it above that
                assert 4096 <= running <= 2 * 4096, running
                assert refused[0] == connections * per_connection - running
                grown_mib = (_rss_kib(proc.pid) - rss_before) / 1024
                assert grown_mib < 64, f"server RSS grew by {grown_mib:.0f} MiB for {running} Waits in flight"
                for raw in raws:
                    raw.close()
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    fds_after = len(os.listdir(f"/proc/{proc.pid}/fd"))  # before the query opens one more
                    left = await in_flight()
                    if left == 0 and fds_after <= fds_before:
                        break
                    await asyncio.sleep(0.2)
                assert left == 0, "the closed connections' Waits are still in flight"
                assert fds_after <= fds_before, f"sockets of closed connections kept: {fds_after} fds, {fds_before} before"

            run(flood(), limit=180)
        finally:
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
