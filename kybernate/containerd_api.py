"""A small blocking client of containerd's gRPC API (containers, tasks, version, namespaces) and of the
CRI RuntimeService served on the same socket. Namespaces go in the `containerd-namespace` metadata.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import grpc

from shim.wire import WireError, fields

from . import OperatorError

NAMESPACE_METADATA = "containerd-namespace"


def target(address: str) -> str:
    address = address.removeprefix("unix://")
    return "unix://" + address if address.startswith("/") else "unix:" + address


class Containerd:
    def __init__(self, address: str, timeout: Optional[float] = 10.0):
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target(address))
        self._stubs: dict = {}

    def __enter__(self) -> "Containerd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _stub(self, name: str):
        if name not in self._stubs:
            if name == "containers":
                from proto.containerd.services.containers.v1 import containers_pb2_grpc as m
                self._stubs[name] = m.ContainersStub(self.channel)
            elif name == "tasks":
                from proto.containerd.services.tasks.v1 import tasks_pb2_grpc as m
                self._stubs[name] = m.TasksStub(self.channel)
            elif name == "version":
                from proto.containerd.services.version.v1 import version_pb2_grpc as m
                self._stubs[name] = m.VersionStub(self.channel)
            elif name == "cri":
                from proto.k8s.cri.runtime.v1 import api_pb2_grpc as m
                self._stubs[name] = m.RuntimeServiceStub(self.channel)
        return self._stubs[name]

    @staticmethod
    def _md(namespace: str) -> tuple:
        return ((NAMESPACE_METADATA, namespace),)

    # ---- version, namespaces ------------------------------------------------------------------
    def version(self) -> tuple[str, str]:
        from google.protobuf import empty_pb2
        r = self._stub("version").Version(empty_pb2.Empty(), timeout=self.timeout)
        return r.version, r.revision

    def namespaces(self) -> list[str]:
        """containerd.services.namespaces.v1.Namespaces/List, decoded by hand (names only)."""
        call = self.channel.unary_unary("/containerd.services.namespaces.v1.Namespaces/List",
                                        request_serializer=lambda _: b"",
                                        response_deserializer=lambda b: b)
        raw = call(None, timeout=self.timeout)
        return sorted(_namespace_names(raw))

    # ---- containers, tasks --------------------------------------------------------------------
    def containers(self, namespace: str, filters: Sequence[str] = ()) -> list:
        from proto.containerd.services.containers.v1 import containers_pb2 as pb
        r = self._stub("containers").List(pb.ListContainersRequest(filters=list(filters)),
                                          metadata=self._md(namespace), timeout=self.timeout)
        return list(r.containers)

    def container(self, namespace: str, container_id: str):
        """The container, or None when containerd does not know it."""
        from proto.containerd.services.containers.v1 import containers_pb2 as pb
        try:
            return self._stub("containers").Get(pb.GetContainerRequest(id=container_id),
                                                metadata=self._md(namespace), timeout=self.timeout).container
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def task(self, namespace: str, container_id: str):
        """The task's init process (pid, status), or None when the container has no task."""
        from proto.containerd.services.tasks.v1 import tasks_pb2 as pb
        try:
            return self._stub("tasks").Get(pb.GetRequest(container_id=container_id),
                                           metadata=self._md(namespace), timeout=self.timeout).process
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def checkpoint(self, namespace: str, container_id: str, options=None, timeout: Optional[float] = None):
        from proto.containerd.services.tasks.v1 import tasks_pb2 as pb
        req = pb.CheckpointTaskRequest(container_id=container_id)
        if options is not None:
            req.options.CopyFrom(options)
        return self._stub("tasks").Checkpoint(req, metadata=self._md(namespace), timeout=timeout)

    # ---- CRI ----------------------------------------------------------------------------------
    @property
    def cri(self):
        return self._stub("cri")


def spec_of(container) -> dict:
    """The OCI spec (JSON in the Any's value) of a containerd container; {} when unreadable."""
    try:
        return json.loads(container.spec.value.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def status_name(process) -> str:
    from proto.containerd.types.task import task_pb2
    return task_pb2.Status.Name(process.status).lower() if process is not None else "no task"


def _namespace_names(raw: bytes) -> list[str]:
    """ListNamespacesResponse{repeated Namespace namespaces = 1}, Namespace{string name = 1; ...}.

    Read with the shim's bounds-checked reader (`shim.wire`): bytes that are not this message are an
    OperatorError that says so, never an IndexError or a name cut short."""
    names = []
    try:
        for number, value in fields(raw):
            if number == 1 and isinstance(value, bytes):
                for inner, name in fields(value):
                    if inner == 1 and isinstance(name, bytes):
                        names.append(name.decode("utf-8"))
    except (WireError, UnicodeDecodeError) as exc:
        raise OperatorError(f"cannot decode containerd's namespace list: {exc}") from None
    return names


def describe_rpc_error(exc: grpc.RpcError) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:
        return str(exc)
