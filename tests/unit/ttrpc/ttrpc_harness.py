"""Shared scaffolding for the ttrpc tests: a served Server on a temp socket, a raw connection
that speaks frames by hand (for bad input), and a runner with a hard time limit so a hang fails
instead of stalling the suite."""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import AsyncIterator, Iterable

from ttrpc import Server, Service
from ttrpc.framing import Frame, FrameDecoder, FrameType, encode_frame
from ttrpc.messages import Request, Response


def run(coroutine, limit: float = 10.0):
    return asyncio.run(asyncio.wait_for(coroutine, limit))


@contextlib.asynccontextmanager
async def serving(services: Iterable[Service], **options) -> AsyncIterator[tuple[Server, str]]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "ttrpc.sock")
        server = Server(list(services), **options)
        await server.serve_unix(path)
        try:
            yield server, path
        finally:
            await server.shutdown(grace=1.0)


class RawConnection:
    """Writes whatever bytes a test wants and reads frames back, to play a misbehaving peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, path: str) -> "RawConnection":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_request(self, stream_id: int, request: Request, flags: int = 0) -> None:
        self.send(encode_frame(Frame(stream_id, FrameType.REQUEST, request.encode(), flags)))

    async def next_frame(self, timeout: float = 3.0) -> Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("connection closed")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def next_response(self, timeout: float = 3.0) -> tuple[int, Response]:
        frame = await self.next_frame(timeout)
        assert frame.type == FrameType.RESPONSE, frame
        return frame.stream_id, Response.decode(frame.data)

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the server closes the connection (after any frames it still sends)."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return True
            self.frames.extend(self.decoder.feed(data))

    def close(self) -> None:
        self.writer.close()
