"""Our ttrpc client against a real peer: containerd's own ttrpc socket (containerd.sock.ttrpc).

The shim publishes every task event this way, so this is the path containerd must accept from us.
`ctr events` is containerd's own view: the event we Forward must appear there, under 1.6, 1.7 and 2.1.
"""
from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from proto.anyutil import pack
from proto.containerd.events import task_pb2 as events_pb2
from proto.containerd.services.ttrpc.events.v1 import events_pb2 as forward_pb2
from ttrpc import BlockingClient, Client, Code, TTRPCError
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"


def _forward_request(namespace: str, container_id: str) -> forward_pb2.ForwardRequest:
    ts = Timestamp()
    ts.GetCurrentTime()
    event = events_pb2.TaskOOM(container_id=container_id)
    return forward_pb2.ForwardRequest(envelope=forward_pb2.Envelope(
        timestamp=ts, namespace=namespace, topic="/tasks/oom", event=pack(event)))


def _watch_events(containerd) -> subprocess.Popen:
    cmd = [str(containerd.install.ctr), "--address", containerd.address, "events"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=containerd.env)
    time.sleep(0.5)  # let ctr subscribe before we publish
    return proc


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 10.0) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} not in ctr events output: {''.join(seen)!r}")


def test_forward_event_shows_in_ctr_events(containerd):
    watcher = _watch_events(containerd)
    try:
        cid = f"ttrpc-peer-{containerd.version}"
        with BlockingClient(containerd.ttrpc_address) as client:
            client.call(EVENTS_SERVICE, "Forward", _forward_request(containerd.namespace, cid),
                        empty_pb2.Empty, timeout=5.0)
        line = _read_until(watcher, cid)
        assert "/tasks/oom" in line and containerd.namespace in line
    finally:
        watcher.kill()
        watcher.wait()


def test_async_client_unknown_method_is_unimplemented(containerd):
    async def call():
        client = await Client.connect(containerd.ttrpc_address)
        try:
            await client.call(EVENTS_SERVICE, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty,
                              timeout=5.0)
        finally:
            await client.close()

    with pytest.raises(TTRPCError) as err:
        asyncio.run(call())
    assert err.value.code == Code.UNIMPLEMENTED
