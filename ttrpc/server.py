"""The asyncio ttrpc server: accepts unix connections and runs one task per request.

Requests on one connection run concurrently and are answered as they finish, so a slow Create does
not hold up a State call behind it (containerd multiplexes everything over one connection). The wire
work is the sans-IO `framing` and `messages` modules; this module only moves bytes and tasks.

Requests cost memory for as long as they are in flight, and a Wait may be in flight for days, so both
the requests in flight on one connection and those on the whole server are capped: one over either
cap is answered RESOURCE_EXHAUSTED at once (over the server-wide cap, only on connections holding
more than their share of it, so a flood on one connection does not refuse another's Delete). A
connection that closes takes its requests with it: their tasks are cancelled (as Go's ttrpc cancels
their context), so nobody's Waits outlive their caller. A peer that sends requests without reading
the answers is not read from until it does.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import socket
import time
from typing import Any, Iterable, Optional

from .codes import Code
from .errors import MessageTooLarge, ProtocolError, TTRPCError
from .framing import MAX_MESSAGE_LENGTH, Flag, Frame, FrameDecoder, FrameType, encode_frame
from .messages import AnyMessage, Request, Response, Status
from .service import Method, RequestContext, Service
from .unix import PeerCredentials, bind_unix, is_abstract, peer_credentials, socket_address

log = logging.getLogger("ttrpc.server")

_timeout = getattr(asyncio, "timeout", None)

_READ_SIZE = 256 * 1024

# containerd keeps one connection per shim and has a Wait in flight per process (init and every exec
# of every container the shim serves), plus the odd State or Pids; a thousand is far beyond that.
MAX_REQUESTS_PER_CONNECTION = 1024
MAX_REQUESTS_IN_FLIGHT = 4096

# The request task a handler runs under, so `shutdown` called from a handler can tell which task not
# to wait for; current_task() would name the deadline wrapper's inner task instead.
_request_task: contextvars.ContextVar[Optional[asyncio.Task[None]]] = contextvars.ContextVar(
    "ttrpc_request_task", default=None)


class Server:
    """Serves `services` on any number of listening sockets until `shutdown`.

    `check_peer_uid` refuses connections whose SO_PEERCRED uid differs from `expected_uid` (the
    effective uid of this process unless given), as Go's UnixSocketRequireSameUser does: abstract
    sockets have no file permissions, so this is their only access control.
    """

    def __init__(self, services: Iterable[Service] = (), check_peer_uid: bool = False,
                 max_message_length: int = MAX_MESSAGE_LENGTH, expected_uid: Optional[int] = None,
                 max_requests_per_connection: int = MAX_REQUESTS_PER_CONNECTION,
                 max_requests_in_flight: int = MAX_REQUESTS_IN_FLIGHT):
        if max_requests_per_connection < 1 or max_requests_in_flight < 1:
            raise ValueError("request limits must be at least 1")
        self._services: dict[str, Service] = {}
        for service in services:
            self.register(service)
        self.check_peer_uid = check_peer_uid
        self.expected_uid = os.geteuid() if expected_uid is None else expected_uid
        self.max_message_length = max_message_length
        self.max_requests_per_connection = max_requests_per_connection
        self.max_requests_in_flight = max_requests_in_flight
        self.requests_in_flight = 0  # over all connections
        self._listeners: list[asyncio.AbstractServer] = []
        self._socket_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._shutdown_done = False
        self._closed = asyncio.Event()

    def register(self, service: Service) -> None:
        if service.name in self._services:
            raise ValueError(f"service {service.name} is already registered")
        self._services[service.name] = service

    def lookup(self, service: str, method: str) -> Method:
        found = self._services.get(service)
        if found is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {service}")
        handler = found.methods.get(method)
        if handler is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"method {method}")
        return handler

    def fair_share(self) -> int:
        """Over the server-wide cap, a connection holding fewer requests than this is still served:
        one client's flood must not lock out containerd's Kill and Delete on its own connection.
        In flight are thus at most twice the cap."""
        return self.max_requests_in_flight // max(1, len(self._connections))

    async def serve_unix(self, address: str) -> None:
        """Binds `address` (a path, "@name" or "\\0name" for abstract) and starts accepting.
        Returns once listening; the socket file is removed again at shutdown."""
        path = socket_address(address)
        sock = bind_unix(path)
        if not is_abstract(path):
            self._socket_paths.append(path)
        await self.serve_socket(sock)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serves on a socket already bound and listening, e.g. the one `start` hands to the daemon."""
        if self._shutting_down:
            raise RuntimeError("server is shut down")
        sock.setblocking(False)
        listener = await asyncio.start_server(self._accept, sock=sock)
        self._listeners.append(listener)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        if self._shutting_down:
            writer.close()
            return
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # never let one connection's bug reach the event loop's handler
            log.exception("ttrpc connection from %s failed", connection.describe())
        finally:
            self._connections.discard(connection)
            self._maybe_closed()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stops accepting, lets in-flight requests finish for up to `grace` seconds (then cancels
        them), and closes every connection. Requests arriving meanwhile get UNAVAILABLE.

        Called from inside a handler (the Task service's Shutdown), it does not wait for that
        handler, whose connection closes once its response is written; `wait_closed` covers it.
        """
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        for listener in self._listeners:
            listener.close()
        current = _request_task.get()
        for connection in list(self._connections):
            connection.begin_drain()
        in_flight = [task for connection in self._connections for task in connection.tasks.values()
                     if task is not current]
        if in_flight:
            _, pending = await asyncio.wait(in_flight, timeout=grace)
            if pending:
                log.warning("ttrpc shutdown: cancelling %d request(s) still running after %.1fs",
                            len(pending), grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for connection in list(self._connections):
            connection.close_when_idle()
        # The connection serving the calling handler closes after its answer; not waited for here.
        closing = [connection.closed.wait() for connection in self._connections
                   if current not in connection.tasks.values()]
        if closing:
            await asyncio.gather(*closing)
        for listener in self._listeners:
            await listener.wait_closed()
        for path in self._socket_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._shutdown_done = True
        self._maybe_closed()

    async def wait_closed(self) -> None:
        """Returns once `shutdown` has finished and every connection is closed."""
        await self._closed.wait()

    def _maybe_closed(self) -> None:
        if self._shutdown_done and not self._connections:
            self._closed.set()


class _Connection:
    """One accepted connection: decodes frames, starts request tasks, writes responses."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer: Optional[PeerCredentials] = peer_credentials(writer.get_extra_info("socket"))
        self.decoder = FrameDecoder(server.max_message_length)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.last_stream_id = 0
        self.draining = False
        self.peer_gone = False  # the peer closed or reset: nothing more can be written to it
        self.ended = ""  # why reading stopped (not by shutdown): the reason the requests are cancelled
        self._refusing = False  # over a request cap now (logged once per episode, not per request)
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = asyncio.Event()

    def describe(self) -> str:
        if self.peer is None:
            return "unknown peer"
        return f"pid {self.peer.pid} uid {self.peer.uid}"

    async def run(self) -> None:
        if self.server.check_peer_uid and not self._peer_allowed():
            self.writer.close()
            self.closed.set()
            return
        try:
            await self._read_loop()
        finally:
            if self.tasks and not self.draining:
                self._cancel_requests()
            try:
                await self._idle.wait()
                self.writer.close()
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            finally:
                self.closed.set()

    def _peer_allowed(self) -> bool:
        expected = self.server.expected_uid
        if self.peer is None:
            log.warning("ttrpc: refusing connection: peer credentials unavailable (uid %d required)", expected)
            return False
        if self.peer.uid != expected:
            log.warning("ttrpc: refusing connection from pid %d: uid %d, uid %d required",
                        self.peer.pid, self.peer.uid, expected)
            return False
        return True

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.reader.read(_READ_SIZE)
            except (ConnectionError, OSError) as exc:
                log.info("ttrpc connection from %s lost: %s", self.describe(), exc)
                self.peer_gone = True
                self.ended = f"connection lost: {exc}"
                return
            if not data:
                if self.decoder.buffered:
                    log.warning("ttrpc connection from %s closed in the middle of a frame (%d bytes "
                                "of it received)", self.describe(), self.decoder.buffered)
                if not self.draining:
                    self.peer_gone = True
                    self.ended = "the client closed the connection"
                    if self.tasks:
                        log.info("ttrpc client %s went away with %d request(s) in flight: cancelling them",
                                 self.describe(), len(self.tasks))
                return
            try:
                frames = self.decoder.feed(data)
            except ProtocolError as exc:
                self._protocol_failure(exc)
                return
            for frame in frames:
                self._on_frame(frame)
            if self.decoder.error is not None:
                self._protocol_failure(self.decoder.error)
                return
            # backpressure: a peer that does not read its answers is not read from either, so the
            # answers (RESOURCE_EXHAUSTED ones included) cannot pile up in our write buffer
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                log.info("ttrpc connection from %s lost: %s", self.describe(), exc)
                self.peer_gone = True
                self.ended = f"connection lost: {exc}"
                return

    def _protocol_failure(self, error: ProtocolError) -> None:
        log.warning("ttrpc protocol error from %s, closing the connection: %s", self.describe(), error)
        self.ended = f"protocol error: {error}"
        if isinstance(error, MessageTooLarge) and error.stream_id:
            self._send_status(error.stream_id, Code.RESOURCE_EXHAUSTED, str(error))

    def _cancel_requests(self) -> None:
        """The connection is over: its requests have nobody to answer to (Go's ttrpc cancels their
        context). Handlers see CancelledError; work that must finish anyway shields itself."""
        if self.tasks:
            log.debug("ttrpc connection from %s: cancelling %d request(s): %s", self.describe(),
                      len(self.tasks), self.ended or "connection closed")
        for task in list(self.tasks.values()):
            task.cancel()

    def _over_capacity(self, name: str) -> str:
        """Why a new request cannot be taken now ('' when it can)."""
        server = self.server
        mine, limit = len(self.tasks), server.max_requests_per_connection
        if mine >= limit:
            why = (f"{name}: too many requests in flight on this connection ({mine}, the limit is {limit}); "
                   "retry once some are answered")
        elif server.requests_in_flight >= server.max_requests_in_flight and mine >= server.fair_share():
            why = (f"{name}: too many requests in flight on this server ({server.requests_in_flight} over all "
                   f"connections, the limit is {server.max_requests_in_flight}; this connection has {mine}); "
                   "retry once some are answered")
        else:
            self._refusing = False
            return ""
        if not self._refusing:
            self._refusing = True
            log.warning("ttrpc: refusing requests from %s with RESOURCE_EXHAUSTED: %s", self.describe(), why)
        return why

    def _on_frame(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if frame.type != FrameType.REQUEST:
            # No client streams are served, so Data frames can only belong to streams already
            # answered (UNIMPLEMENTED) or finished; a Response from a client is meaningless.
            log.debug("ttrpc: ignoring %s frame on stream %d from %s", frame.type.name, stream_id,
                      self.describe())
            return
        if stream_id % 2 == 0:
            self._send_status(stream_id, Code.INVALID_ARGUMENT,
                              "stream id must be odd for client-initiated streams")
            return
        if stream_id <= self.last_stream_id:
            self._send_status(stream_id, Code.INVALID_ARGUMENT, "stream id cannot be re-used and must increase")
            return
        self.last_stream_id = stream_id
        try:
            request = Request.decode(frame.data)
        except ProtocolError as exc:
            log.warning("ttrpc: undecodable request on stream %d from %s: %s", stream_id, self.describe(), exc)
            self._send_status(stream_id, Code.INVALID_ARGUMENT, f"cannot decode request: {exc}")
            return
        if self.draining:
            self._send_status(stream_id, Code.UNAVAILABLE, "server is shutting down")
            return
        try:
            method = self.server.lookup(request.service, request.method)
            if frame.flags & Flag.REMOTE_OPEN:
                raise TTRPCError(Code.UNIMPLEMENTED,
                                 f"client streaming is not supported for {request.service}/{request.method}")
        except TTRPCError as exc:
            log.debug("ttrpc: %s/%s from %s: %s", request.service, request.method, self.describe(), exc)
            self._send_status(stream_id, exc.code, exc.message)
            return
        refusal = self._over_capacity(f"{request.service}/{request.method}")
        if refusal:
            self._send_status(stream_id, Code.RESOURCE_EXHAUSTED, refusal)
            return
        handle = self._handle_stream if method.server_streaming else self._handle_unary
        task = asyncio.get_running_loop().create_task(handle(stream_id, method, request))
        self.tasks[stream_id] = task
        self.server.requests_in_flight += 1
        self._idle.clear()
        task.add_done_callback(lambda _t, sid=stream_id: self._finished(sid))

    def _finished(self, stream_id: int) -> None:
        if self.tasks.pop(stream_id, None) is not None:
            self.server.requests_in_flight -= 1
        if not self.tasks:
            self._idle.set()
            if self.draining:
                self.writer.close()

    def _context(self, stream_id: int, request: Request) -> RequestContext:
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key.lower(), []).append(pair.value)
        deadline = None
        if request.timeout_nano:
            deadline = time.monotonic() + request.timeout_nano / 1e9
        peer = self.peer
        return RequestContext(
            service=request.service, method=request.method, metadata=metadata, deadline=deadline,
            pid=peer.pid if peer else None, uid=peer.uid if peer else None,
            gid=peer.gid if peer else None, stream_id=stream_id)

    async def _handle_unary(self, stream_id: int, method: Method, request: Request) -> None:
        _request_task.set(asyncio.current_task())
        ctx = self._context(stream_id, request)
        try:
            decoded = method.decode_request(request.payload)
            result = await self._within_deadline(ctx, _call(method.handler, ctx, decoded))
            response = Response(Status(), method.encode_response(result))
        except asyncio.CancelledError:
            self._send_status(stream_id, Code.UNAVAILABLE, self._cancel_message())
            raise
        except Exception as exc:
            response = Response(self._status_for(ctx, exc))
        self._send_response(stream_id, response)

    async def _handle_stream(self, stream_id: int, method: Method, request: Request) -> None:
        _request_task.set(asyncio.current_task())
        ctx = self._context(stream_id, request)

        async def pump() -> None:
            responses = method.handler(ctx, method.decode_request(request.payload))
            try:
                async for item in responses:
                    data = method.encode_response(item)
                    if len(data) > self.server.max_message_length:
                        raise TTRPCError(Code.RESOURCE_EXHAUSTED, _too_large(len(data), self.server))
                    if not self._write(Frame(stream_id, FrameType.DATA, data)):
                        return
                    await self.writer.drain()
            finally:
                await responses.aclose()
            self._write(Frame(stream_id, FrameType.DATA, b"", Flag.REMOTE_CLOSED | Flag.NO_DATA))

        try:
            await self._within_deadline(ctx, pump())
        except asyncio.CancelledError:
            self._send_status(stream_id, Code.UNAVAILABLE, self._cancel_message())
            raise
        except (ConnectionError, OSError) as exc:
            log.info("ttrpc stream %d to %s ended: %s", stream_id, self.describe(), exc)
        except Exception as exc:
            self._send_response(stream_id, Response(self._status_for(ctx, exc)))

    async def _within_deadline(self, ctx: RequestContext, coroutine: Any) -> Any:
        remaining = ctx.time_remaining()
        if remaining is None:
            return await coroutine
        if _timeout is not None:  # 3.11+: runs in this task, no extra task per request
            async with _timeout(remaining):
                return await coroutine
        return await asyncio.wait_for(coroutine, remaining)

    def _status_for(self, ctx: RequestContext, exc: Exception) -> Status:
        name = f"{ctx.service}/{ctx.method}"
        if isinstance(exc, TTRPCError):
            details = tuple(AnyMessage(d.type_url, bytes(d.value)) for d in exc.details)
            return Status(exc.code, exc.message, details)
        if isinstance(exc, asyncio.TimeoutError) and ctx.deadline is not None and time.monotonic() >= ctx.deadline:
            log.warning("ttrpc: %s overran its deadline", name)
            return Status(Code.DEADLINE_EXCEEDED, f"{name}: deadline exceeded")
        log.error("ttrpc: %s failed", name, exc_info=exc)
        return Status(Code.INTERNAL, str(exc) or type(exc).__name__)

    def _cancel_message(self) -> str:
        if self.ended:
            return f"request cancelled: {self.ended}"
        return "server is shutting down"

    def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        self._send_response(stream_id, Response(Status(code, message)))

    def _send_response(self, stream_id: int, response: Response) -> None:
        data = response.encode()
        if len(data) > self.server.max_message_length:
            log.warning("ttrpc: response on stream %d to %s is %d bytes, over the limit; sending "
                        "RESOURCE_EXHAUSTED instead", stream_id, self.describe(), len(data))
            data = Response(Status(Code.RESOURCE_EXHAUSTED, _too_large(len(data), self.server))).encode()
        self._write(Frame(stream_id, FrameType.RESPONSE, data))

    def _write(self, frame: Frame) -> bool:
        if self.peer_gone or self.writer.is_closing():
            log.debug("ttrpc: dropping %s on stream %d: connection to %s is closed", frame.type.name,
                      frame.stream_id, self.describe())
            return False
        self.writer.write(encode_frame(frame, self.server.max_message_length))
        return True

    def begin_drain(self) -> None:
        self.draining = True
        if not self.tasks:
            self.writer.close()

    def close_when_idle(self) -> None:
        if not self.tasks:
            self.writer.close()


async def _call(handler: Any, ctx: RequestContext, request: Any) -> Any:
    """Handlers may be plain functions (cheap lookups) or coroutine functions."""
    result = handler(ctx, request)
    if inspect.isawaitable(result):
        result = await result
    return result


def _too_large(length: int, server: Server) -> str:
    return f"response of {length} bytes exceeds the maximum message length of {server.max_message_length} bytes"
