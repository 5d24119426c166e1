"""What a server offers: named services holding methods, and the context each handler receives.

Message classes are duck-typed (`FromString` / `SerializeToString`) so that the package works with
protobuf's generated classes without importing protobuf; `request_type=None` hands the handler the
raw payload bytes, for proxies and for tests that have no generated classes.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol, Union

from .codes import Code
from .errors import TTRPCError


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...


class MessageType(Protocol):
    def FromString(self, data: bytes) -> Any: ...


UnaryHandler = Callable[["RequestContext", Any], Union[Awaitable[Any], Any]]
StreamHandler = Callable[["RequestContext", Any], AsyncIterator[Any]]


@dataclass
class RequestContext:
    """Everything about a request that is not its payload.

    `deadline` is on the `time.monotonic()` clock (the asyncio loop's clock on Linux), None when the
    client set no timeout. pid/uid/gid are the peer's SO_PEERCRED, None on sockets without them.
    """

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: Optional[float] = None
    pid: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    stream_id: int = 0

    def time_remaining(self) -> Optional[float]:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def get(self, key: str) -> list[str]:
        """Metadata keys are case-insensitive, as in gRPC and Go's ttrpc.MD."""
        return self.metadata.get(key.lower(), [])


@dataclass(frozen=True)
class Method:
    name: str
    handler: Callable[..., Any]
    request_type: Optional[MessageType]
    response_type: Optional[MessageType]
    server_streaming: bool = False

    def decode_request(self, payload: bytes) -> Any:
        """Garbage in the payload is the client's fault: INVALID_ARGUMENT, like Go's server."""
        if self.request_type is None:
            return payload
        try:
            return self.request_type.FromString(payload)
        except Exception as exc:  # protobuf raises DecodeError, others may raise anything
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"cannot decode {self.name} request: {exc}") from exc

    def encode_response(self, response: Any) -> bytes:
        if self.response_type is None or isinstance(response, (bytes, bytearray, memoryview)):
            if response is None:
                return b""
            if not isinstance(response, (bytes, bytearray, memoryview)):
                raise TypeError(f"{self.name} handler returned {type(response).__name__}, expected bytes")
            return bytes(response)
        if response is None:
            raise TypeError(f"{self.name} handler returned None, expected a response message")
        return response.SerializeToString()


class Service:
    """A fully qualified service name (`containerd.task.v2.Task`) and its methods by bare name."""

    def __init__(self, name: str):
        self.name = name
        self.methods: dict[str, Method] = {}

    def add(self, method: str, handler: UnaryHandler, request_type: Optional[MessageType] = None,
            response_type: Optional[MessageType] = None) -> "Service":
        """`handler(ctx, request)` may be a coroutine function or a plain function."""
        self._check_new(method)
        self.methods[method] = Method(method, handler, request_type, response_type)
        return self

    def add_stream(self, method: str, handler: StreamHandler, request_type: Optional[MessageType] = None,
                   response_type: Optional[MessageType] = None) -> "Service":
        """Server streaming: `handler(ctx, request)` is an async generator of responses."""
        if not inspect.isasyncgenfunction(handler):
            raise TypeError(f"{method}: a streaming handler must be an async generator function")
        self._check_new(method)
        self.methods[method] = Method(method, handler, request_type, response_type, server_streaming=True)
        return self

    def _check_new(self, method: str) -> None:
        if method in self.methods:
            raise ValueError(f"{self.name}/{method} is already registered")
