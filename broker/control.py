"""The broker's control socket: `kybernate wake` and `kybernate ps` talk to the broker through it.

A unix socket (``[broker] socket``, /run/kybernate/broker.sock), mode 0600 in a root-only dir; a peer
that is not root (SO_PEERCRED) is refused before it is read: waking a container moves VRAM and may
park others, which is the node operator's call, as `ctr task resume` is. One request per connection,
one JSON line each way:

    -> {"op": "wake", "namespace": "default", "id": "c1"}
    <- {"ok": true, "result": {"name": "default/c1", "latency_s": 0.41, "bytes": 2147483648,
                               "evicted": ["default/c0"], "already_resident": false}}
    <- {"ok": false, "code": "no-room", "error": "cannot wake default/c1: it needs ..."}
    -> {"op": "status"}
    <- {"ok": true, "result": {"now": ..., "gpus": {...}, "containers": [...]}}
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Optional

from . import BrokerError

log = logging.getLogger("kybernate.broker")
audit = logging.getLogger("kybernate.audit")

MAX_REQUEST = 64 << 10


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    def __init__(self, broker, path: str):
        self.broker = broker
        self.path = path
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid != os.geteuid() and uid != 0:
                audit.warning("AUDIT refused broker request from uid=%d: only root may wake containers", uid)
                await self._answer(writer, {"ok": False, "code": "denied",
                                            "error": "only root may talk to the kybernate broker"})
                return
            try:
                line = await reader.readline()
                if not line:
                    return          # a peer that only checked that a broker listens (the shim)
                request = json.loads(line)
            except (ValueError, asyncio.LimitOverrunError):
                await self._answer(writer, {"ok": False, "code": "invalid", "error": "not a JSON request line"})
                return
            await self._answer(writer, await self.handle(request))
        except (ConnectionError, OSError) as exc:
            log.info("control connection: %s", exc)
        finally:
            writer.close()

    async def handle(self, request: dict) -> dict:
        op = request.get("op") if isinstance(request, dict) else None
        try:
            if op == "status":
                return {"ok": True, "result": self.broker.status()}
            if op == "wake":
                ns, cid = request.get("namespace"), request.get("id")
                if not isinstance(ns, str) or not isinstance(cid, str) or not ns or not cid:
                    raise BrokerError("wake needs a namespace and a container id", "invalid")
                result = await self.broker.wake((ns, cid), "kybernate wake", trigger="command")
                return {"ok": True, "result": result.to_dict()}
            raise BrokerError(f"unknown request {op!r}: expected wake or status", "invalid")
        except BrokerError as exc:
            return {"ok": False, "code": exc.code, "error": str(exc)}
        except Exception as exc:   # noqa: BLE001 - containerd or the GPU readings failed: say so
            log.error("control request %r failed: %s", op, exc, exc_info=True)
            return {"ok": False, "code": "failed", "error": f"the broker failed: {type(exc).__name__}: {exc}"}

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict) -> None:
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()


def call(path: str, request: dict, timeout: float = 300.0) -> dict:
    """One request to the broker (blocking: the `kybernate` command). BrokerError when there is no
    broker or it said no."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokerError(f"no kybernate broker at {path} ({exc.strerror}): is `kybernate broker serve` "
                              "running on this node?", "unavailable") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise BrokerError(f"the broker at {path} did not answer in {timeout:g} s", "unavailable") from None
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise BrokerError(f"the broker at {path} answered something that is not JSON", "unavailable") from None
    if not answer.get("ok"):
        raise BrokerError(str(answer.get("error", "the broker refused")), str(answer.get("code", "failed")))
    return answer.get("result", {})
