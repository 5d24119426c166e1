"""containerd's gRPC API as the broker uses it (asyncio, grpc.aio): the kybernate containers of every
namespace, their tasks, Pause and Resume through the Tasks service (so that containerd's own state
stays true: `ctr task ls` says PAUSED), events published (`ctr events` shows them) and subscribed to.
Namespaces go in the ``containerd-namespace`` metadata, as containerd's clients do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping, Optional, Sequence

import grpc
from google.protobuf import any_pb2, empty_pb2

from shim.wire import WireError, fields

from . import RUNTIME_TYPE, BrokerError

NAMESPACE_METADATA = "containerd-namespace"


def grpc_target(address: str) -> str:
    address = address.removeprefix("unix://")
    return "unix://" + address if address.startswith("/") else "unix:" + address


@dataclass(frozen=True)
class ContainerInfo:
    namespace: str
    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    pid: int
    status: str         # "running", "paused", "pausing", "created", "stopped", "unknown"


def describe(exc: grpc.RpcError) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:   # noqa: BLE001 - any RpcError
        return str(exc)


class Containerd:
    """A grpc.aio channel to containerd and the few calls the broker makes."""

    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(grpc_target(address))
        from proto.containerd.services.containers.v1 import containers_pb2_grpc
        from proto.containerd.services.events.v1 import events_pb2_grpc
        from proto.containerd.services.tasks.v1 import tasks_pb2_grpc
        self.containers_stub = containers_pb2_grpc.ContainersStub(self.channel)
        self.tasks_stub = tasks_pb2_grpc.TasksStub(self.channel)
        self.events_stub = events_pb2_grpc.EventsStub(self.channel)
        self._list_namespaces = self.channel.unary_unary(
            "/containerd.services.namespaces.v1.Namespaces/List",
            request_serializer=lambda _: b"", response_deserializer=lambda b: b)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _md(namespace: str) -> tuple:
        return ((NAMESPACE_METADATA, namespace),)

    async def namespaces(self) -> list[str]:
        raw = await self._list_namespaces(None, timeout=self.timeout)
        return sorted(namespace_names(raw))

    async def kybernate_containers(self, namespace: str) -> list[ContainerInfo]:
        """The namespace's containers run with the kybernate runtime."""
        from proto.containerd.services.containers.v1 import containers_pb2 as pb
        r = await self.containers_stub.List(pb.ListContainersRequest(filters=[f'runtime.name=="{RUNTIME_TYPE}"']),
                                            metadata=self._md(namespace), timeout=self.timeout)
        out = []
        for c in r.containers:
            if c.runtime.name != RUNTIME_TYPE:
                continue
            try:
                spec = json.loads(c.spec.value.decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                spec = {}
            out.append(ContainerInfo(namespace, c.id, dict(c.labels), spec if isinstance(spec, dict) else {}))
        return out

    async def task(self, namespace: str, container_id: str) -> Optional[TaskInfo]:
        from proto.containerd.services.tasks.v1 import tasks_pb2 as pb
        from proto.containerd.types.task import task_pb2
        try:
            r = await self.tasks_stub.Get(pb.GetRequest(container_id=container_id),
                                          metadata=self._md(namespace), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return TaskInfo(r.process.pid, task_pb2.Status.Name(r.process.status).lower())

    async def pause(self, namespace: str, container_id: str, timeout: float) -> None:
        from proto.containerd.services.tasks.v1 import tasks_pb2 as pb
        await self.tasks_stub.Pause(pb.PauseTaskRequest(container_id=container_id),
                                    metadata=self._md(namespace), timeout=timeout)

    async def resume(self, namespace: str, container_id: str, timeout: float) -> None:
        from proto.containerd.services.tasks.v1 import tasks_pb2 as pb
        await self.tasks_stub.Resume(pb.ResumeTaskRequest(container_id=container_id),
                                     metadata=self._md(namespace), timeout=timeout)

    async def publish(self, namespace: str, topic: str, event: any_pb2.Any) -> None:
        from proto.containerd.services.events.v1 import events_pb2 as pb
        await self.events_stub.Publish(pb.PublishRequest(topic=topic, event=event),
                                       metadata=self._md(namespace), timeout=self.timeout)

    async def subscribe(self, filters: Sequence[str]) -> AsyncIterator:
        """containerd's event stream (every namespace), Envelopes as they come."""
        from proto.containerd.services.events.v1 import events_pb2 as pb
        call = self.events_stub.Subscribe(pb.SubscribeRequest(filters=list(filters)))
        async for envelope in call:
            yield envelope


def namespace_names(raw: bytes) -> list[str]:
    """ListNamespacesResponse{repeated Namespace namespaces = 1}, Namespace{string name = 1}, read
    with the shim's bounds-checked reader."""
    names = []
    try:
        for number, value in fields(raw):
            if number == 1 and isinstance(value, bytes):
                for inner, name in fields(value):
                    if inner == 1 and isinstance(name, bytes):
                        names.append(name.decode("utf-8"))
    except (WireError, UnicodeDecodeError) as exc:
        raise BrokerError(f"cannot decode containerd's namespace list: {exc}", "unavailable") from None
    return names


def update_event(container_id: str, labels: Mapping[str, str]) -> any_pb2.Any:
    """Our release/wake facts as a ``containerd.events.ContainerUpdate`` (id, labels): `ctr events`
    prints only event types it knows, and this is the one containerd type, in 1.6 to 2.x, that carries
    key-value facts. The topic (/kybernate/broker/...) says what happened; nothing subscribed to
    /containers/update sees it."""
    from proto.containerd.events import container_pb2
    msg = container_pb2.ContainerUpdate(id=container_id, labels=dict(labels))
    return any_pb2.Any(type_url="containerd.events.ContainerUpdate", value=msg.SerializeToString())


EMPTY = empty_pb2.Empty()
