"""The asyncio ttrpc client: many calls in flight on one connection, matched by stream id.

A single reader task owns the socket's read side and hands each Response to the waiting call, so
callers never read from the socket themselves and replies may arrive in any order.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Optional

from . import calls
from .calls import Metadata
from .errors import ConnectionClosed, ProtocolError, TTRPCError
from .framing import MAX_MESSAGE_LENGTH, Flag, Frame, FrameDecoder, FrameType
from .unix import socket_address

log = logging.getLogger("ttrpc.client")

_READ_SIZE = 256 * 1024
_END_OF_STREAM = object()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_message_length: int = MAX_MESSAGE_LENGTH):
        """Use `Client.connect`; this takes an already open stream pair."""
        self._reader = reader
        self._writer = writer
        self.max_message_length = max_message_length
        self._decoder = FrameDecoder(max_message_length)
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._failure: Optional[Exception] = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, address: str, *, timeout: Optional[float] = None,
                      max_message_length: int = MAX_MESSAGE_LENGTH) -> "Client":
        """`address`: "unix:///path", "/path", "@abstract" or "unix://@abstract"."""
        path = socket_address(address)
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        return cls(reader, writer, max_message_length)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def call(self, service: str, method: str, request: Any, response_type: Any = None,
                   timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> Any:
        """One unary call. `response_type=None` returns the raw payload bytes. Raises TTRPCError for
        a non-OK status (DEADLINE_EXCEEDED when `timeout` passes, UNAVAILABLE when the connection
        closes), ProtocolError when the server's bytes are not ttrpc."""
        name = f"{service}/{method}"
        stream_id = self._open_stream()
        frame = calls.request_frame(stream_id, service, method, request, timeout, metadata,
                                    self.max_message_length)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            self._writer.write(frame)
            if timeout is None:
                reply = await future
            else:
                reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise calls.deadline_error(name, timeout) from None
        finally:
            self._pending.pop(stream_id, None)
        return calls.unary_result(reply.data, response_type, name)

    async def stream(self, service: str, method: str, request: Any, response_type: Any = None,
                     timeout: Optional[float] = None,
                     metadata: Optional[Metadata] = None) -> AsyncIterator[Any]:
        """A server-streaming call: yields each response until the server closes the stream."""
        name = f"{service}/{method}"
        stream_id = self._open_stream()
        frame = calls.request_frame(stream_id, service, method, request, timeout, metadata,
                                    self.max_message_length, flags=calls.STREAM_REQUEST_FLAGS)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[stream_id] = queue
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._writer.write(frame)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    raise calls.deadline_error(name, timeout) from None
                if isinstance(item, Exception):
                    raise item
                if item.type == FrameType.RESPONSE:
                    calls.unary_result(item.data, None, name)  # raises for a non-OK status
                    return
                if not item.flags & Flag.NO_DATA:
                    yield calls.decode_payload(item.data, response_type, name)
                if item.flags & Flag.REMOTE_CLOSED:
                    return
        finally:
            self._streams.pop(stream_id, None)

    def _open_stream(self) -> int:
        if self._failure is not None:
            raise self._failure
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise ConnectionClosed("stream ids exhausted on this connection; reconnect")
        self._next_stream_id += 2
        return stream_id

    async def _read_loop(self) -> None:
        failure: Exception
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    failure = ConnectionClosed("connection closed by the server")
                    break
                frames = self._decoder.feed(data)
                for frame in frames:
                    self._dispatch(frame)
                if self._decoder.error is not None:
                    raise self._decoder.error
        except ProtocolError as exc:
            log.warning("ttrpc client: protocol error from the server, closing the connection: %s", exc)
            failure = exc
        except (ConnectionError, OSError) as exc:
            failure = ConnectionClosed(f"connection lost: {exc}")
        except asyncio.CancelledError:
            failure = ConnectionClosed("client closed")
        self._fail_all(failure)
        self._writer.close()

    def _dispatch(self, frame: Frame) -> None:
        future = self._pending.get(frame.stream_id)
        if future is not None and frame.type == FrameType.RESPONSE:
            if not future.done():
                future.set_result(frame)
            return
        queue = self._streams.get(frame.stream_id)
        if queue is not None and frame.type in (FrameType.RESPONSE, FrameType.DATA):
            queue.put_nowait(frame)
            return
        # Late answers to calls that timed out locally land here; nothing waits for them.
        log.debug("ttrpc client: dropping %s frame for stream %d", frame.type.name, frame.stream_id)

    def _fail_all(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        for queue in self._streams.values():
            queue.put_nowait(failure)

    async def close(self) -> None:
        if not self._reader_task.done():
            self._reader_task.cancel()
        try:
            await self._reader_task
        except asyncio.CancelledError:
            pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

