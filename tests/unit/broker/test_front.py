"""The wake-on-connect front against a real stopped process: its listening socket taken with
pidfd_getfd, probes answered without waking, a client's first request relayed once it is woken, and
the process's socket flags left as they were."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from broker.front import Front, PROBE_ANSWER, classify, find_listeners, listening_inodes

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if sys.argv[2] == "6" else "0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    data = c.recv(4096)
    c.sendall(b"answer %d to " % n + data)
    c.close()
"""


@pytest.mark.parametrize("data,closed,kind", [
    (b"", True, "tcp-probe"),
    (b"", False, "incomplete"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n", False, "http-probe"),
    (b"GET /healthz HTTP/1.1\r\nuser-agent: Kube-Probe/1.28\r\n\r\n", False, "http-probe"),
    (b"GET / HTTP/1.1\r\nUser-Agent: curl/8\r\n\r\n", False, "client"),
    (b"GET / HTTP/1.1\r\nUser-Agent: kube-pro", False, "incomplete"),
    (b"GE", False, "incomplete"),
    (b"GET / HTTP/1.1\r\n", True, "client"),
    (b"\x16\x03\x01\x02\x00", False, "client"),           # TLS
    (b"PING\r\n", False, "client"),
])
def test_classify(data, closed, kind):
    assert classify(data, closed) == kind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["4", "6"])
def stopped_server(request):
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd of another process needs root (CAP_SYS_PTRACE)")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), request.param], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGSTOP)          # as frozen as a paused container: nobody accepts
    yield proc, port, request.param
    proc.kill()
    proc.wait()


def _flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(l for l in f if l.startswith("flags:")).split()[1], 8)


def test_the_front_answers_probes_and_relays_a_client_once_woken(stopped_server):
    proc, port, family = stopped_server
    listeners = find_listeners([proc.pid])
    assert [(l.port, l.address) for l in listeners] == [(port, "::" if family == "6" else "0.0.0.0")]
    assert listeners[0].connect_address == ("::1" if family == "6" else "127.0.0.1")
    assert find_listeners([proc.pid], ports=[port + 1]) == []
    flags_before = _flags(proc.pid, listeners[0].fd)
    wakes = []
    probes = []

    async def wake(reason: str) -> None:
        wakes.append(reason)
        front.disarm()
        proc.send_signal(signal.SIGCONT)

    async def client(payload: bytes, close_at_once: bool = False) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if close_at_once:
            writer.close()
            return b""
        writer.write(payload)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return out

    async def scenario():
        nonlocal front
        front = Front("test/web", proc.pid, listeners, wake, silent_wake_s=2.0, on_probe=probes.append)
        assert front.arm() == [] and front.armed
        await client(b"", close_at_once=True)
        answer = await client(b"GET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.30\r\n\r\n")
        assert answer == PROBE_ANSWER
        await asyncio.sleep(0.1)
        assert wakes == [] and probes == ["tcp", "http"]
        answer = await client(b"hello")
        assert answer == b"answer 1 to hello", "the first request is answered by the server itself"
        assert wakes == [f"connection on port {port}"]
        answer = await client(b"again")          # straight to the server's own accept now
        assert answer == b"answer 2 to again" and len(wakes) == 1
        await front.close()

    front = None
    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert _flags(proc.pid, listeners[0].fd) == flags_before, "the server's socket flags are untouched"


def test_a_silent_connection_wakes_after_silent_wake_s(stopped_server):
    proc, port, _ = stopped_server
    listeners = find_listeners([proc.pid])
    woke_at = []

    async def wake(reason: str) -> None:
        woke_at.append(time.monotonic())
        front.disarm()
        proc.send_signal(signal.SIGCONT)

    async def scenario():
        nonlocal front
        front = Front("test/web", proc.pid, listeners, wake, silent_wake_s=0.3)
        front.arm()
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.6)                 # says nothing (a protocol where the server speaks first)
        assert woke_at and 0.25 <= woke_at[0] - t0 < 2.0
        writer.write(b"late")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b"answer 1 to late"
        writer.close()
        await front.close()

    front = None
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_listening_inodes_of_this_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        inode = os.fstat(s.fileno()).st_ino
        assert listening_inodes(os.getpid())[inode] == (socket.AF_INET, "127.0.0.1", port)
