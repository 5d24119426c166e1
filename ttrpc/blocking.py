"""A synchronous ttrpc client on a plain blocking socket, no event loop.

For callers that have no loop or must not start one: the shim's `delete` action, tests that poke a
server from a thread, scripts. Calls are serialised by a lock; each waits for its own stream id and
drops late answers to earlier calls that timed out.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Optional

from . import calls
from .calls import Metadata
from .errors import ConnectionClosed, ProtocolError
from .framing import MAX_MESSAGE_LENGTH, FrameDecoder, FrameType
from .unix import socket_address

_READ_SIZE = 256 * 1024


class BlockingClient:
    def __init__(self, address: str, *, timeout: Optional[float] = None,
                 max_message_length: int = MAX_MESSAGE_LENGTH):
        """Connects at once (`timeout` bounds the connect) so that a wrong address fails here."""
        self.max_message_length = max_message_length
        self._decoder = FrameDecoder(max_message_length)
        self._next_stream_id = 1
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_address(address))
        except BaseException:
            self._sock.close()
            raise

    def call(self, service: str, method: str, request: Any, response_type: Any = None,
             timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> Any:
        """Same contract as `Client.call`."""
        name = f"{service}/{method}"
        with self._lock:
            sock = self._require_open()
            stream_id = self._next_stream_id
            self._next_stream_id += 2
            frame = calls.request_frame(stream_id, service, method, request, timeout, metadata,
                                        self.max_message_length)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                sock.settimeout(timeout)
                sock.sendall(frame)
                while True:
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise calls.deadline_error(name, timeout)
                        sock.settimeout(remaining)
                    data = sock.recv(_READ_SIZE)
                    if not data:
                        raise ConnectionClosed("connection closed by the server")
                    for reply in self._decoder.feed(data):
                        if reply.stream_id == stream_id and reply.type == FrameType.RESPONSE:
                            return calls.unary_result(reply.data, response_type, name)
                    if self._decoder.error is not None:
                        raise self._decoder.error
            except socket.timeout:
                raise calls.deadline_error(name, timeout) from None
            except ProtocolError:
                if self._decoder.error is not None:  # framing lost: nothing more can be read
                    self._close_locked()
                raise
            except OSError as exc:
                self._close_locked()
                raise ConnectionClosed(f"connection lost: {exc}") from exc

    def _require_open(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionClosed("client closed")
        return self._sock

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
