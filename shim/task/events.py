"""Publishing task events to containerd: ``Events/Forward`` on $TTRPC_ADDRESS.

One worker sends events strictly in the order they were published (TaskExit before TaskDelete, a
process's start before its exit), retrying an event a few times with a growing delay before giving up
on it. The queue is bounded: a containerd that stops reading cannot make the shim grow without limit.
Each `publish` returns a future that resolves when the event was delivered (True) or dropped (False),
so Delete can wait for its container's TaskExit to be out.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("kybernate.shim")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_HEADER = "containerd-namespace-ttrpc"
QUEUE_SIZE = 2048
MAX_ATTEMPTS = 5
CALL_TIMEOUT = 5.0

TOPICS = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
    "TaskCheckpointed": "/tasks/checkpointed",
    "TaskOOM": "/tasks/oom",
}


def topic_of(event) -> str:
    return TOPICS[type(event).DESCRIPTOR.name]


class Publisher:
    def __init__(self, address: str, namespace: str, connect=None, retry_delay: float = 1.0):
        self.address = address
        self.namespace = namespace
        self.retry_delay = retry_delay
        self._connect = connect  # for tests: async () -> client with .call(...)
        self._queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._client = None
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._warned_no_address = False
        self.sent = 0
        self.dropped = 0

    def publish(self, event) -> asyncio.Future:
        """Queue `event` (a containerd.events message); returns its delivery future."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.address:
            # containerd always sets TTRPC_ADDRESS: without it nobody hears of exits (ctr and kubelet
            # would wait for ever), so say so, once, rather than drop every event in silence
            self.dropped += 1
            if not self._warned_no_address:
                self._warned_no_address = True
                log.warning("TTRPC_ADDRESS is not set: task events are not delivered to containerd "
                            "(the first dropped is %s; the others go the same way, without another warning)",
                            topic_of(event))
            fut.set_result(False)
            return fut
        if self._closed:
            fut.set_result(False)
            return fut
        from google.protobuf.timestamp_pb2 import Timestamp

        from proto.anyutil import pack
        from proto.containerd.services.ttrpc.events.v1 import events_pb2

        ts = Timestamp()
        ts.FromNanoseconds(time.time_ns())
        env = events_pb2.Envelope(timestamp=ts, namespace=self.namespace, topic=topic_of(event), event=pack(event))
        try:
            self._queue.put_nowait((events_pb2.ForwardRequest(envelope=env), fut))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("event queue full (%d): dropping %s", QUEUE_SIZE, env.topic)
            fut.set_result(False)
            return fut
        if self._worker is None:
            self._worker = loop.create_task(self._run())
        return fut

    async def _client_for(self):
        if self._client is None or getattr(self._client, "closed", False):
            if self._connect is not None:
                self._client = await self._connect()
            else:
                from ttrpc import Client

                self._client = await Client.connect(self.address, timeout=CALL_TIMEOUT)
        return self._client

    async def _send(self, request) -> None:
        from google.protobuf import empty_pb2

        client = await self._client_for()
        await client.call(EVENTS_SERVICE, "Forward", request, empty_pb2.Empty, timeout=CALL_TIMEOUT,
                          metadata={NAMESPACE_HEADER: [self.namespace]})

    async def _run(self) -> None:
        while True:
            request, fut = await self._queue.get()
            try:
                ok = await self._deliver(request)
                if not fut.done():
                    fut.set_result(ok)
            finally:
                self._queue.task_done()

    async def _deliver(self, request) -> bool:
        topic = request.envelope.topic
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await self._send(request)
                self.sent += 1
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("forward event %s (attempt %d/%d): %s", topic, attempt, MAX_ATTEMPTS, exc)
                await self._drop_client()
                if attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(self.retry_delay * attempt)
        self.dropped += 1
        log.error("dropping event %s after %d attempts", topic, MAX_ATTEMPTS)
        return False

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:
                pass

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was delivered or dropped."""
        if self._worker is None:
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout: float = 5.0) -> None:
        await self.flush(timeout)
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        await self._drop_client()
