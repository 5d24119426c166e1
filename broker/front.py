"""Wake on connect: while a container is parked, the broker answers its listening sockets.

A parked container's processes are frozen but still own their listening sockets: the kernel keeps
completing handshakes into the accept queue, and nobody accepts. The broker takes a duplicate of each
such socket from the frozen process (``pidfd_getfd``: the same socket, not a second one; root with
CAP_SYS_PTRACE over the process, as the broker is) and accepts from it itself:

- a connection that closes without sending anything is a TCP probe (kubelet's tcpSocket probe): it
  was answered by the handshake, the container stays parked;
- an HTTP request whose User-Agent is kubelet's (``kube-probe/``) is answered ``200 OK`` by the
  broker, the container stays parked (a parked pod stays Ready, as zeropod answers probes);
- anything else, or a connection that stays silent for ``silent_wake_s`` (protocols where the server
  speaks first), wakes the container: the broker stops accepting (the container's own accept takes
  the next connections straight from the queue), resumes it, connects to the same listening address
  inside the container's network namespace and relays the bytes both ways, the ones already read
  first. The client sees one slower first connection; the server sees that one connection coming
  from its own loopback.

The duplicate never changes the socket's flags (they are shared with the container's descriptor: a
non-blocking flag set here would make a blocking server's accept fail): the broker waits for
readability with the event loop and accepts only what is queued.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Optional

log = logging.getLogger("kybernate.broker")

SYS_PIDFD_GETFD = 438          # the same number on x86_64 and aarch64 (the generic table)
CLONE_NEWNET = 0x40000000
PROBE_AGENT = b"user-agent: kube-probe/"
MAX_PEEK = 16 << 10
PROBE_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 7\r\nConnection: close\r\n"
                b"X-Kybernate: parked\r\n\r\nparked\n")
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")

_libc = ctypes.CDLL(None, use_errno=True)


# ---- finding the listening sockets ---------------------------------------------------------------
@dataclass(frozen=True)
class Listener:
    pid: int            # a process that holds it
    fd: int             # its descriptor number in that process
    family: int         # AF_INET / AF_INET6
    address: str        # the bound address ("0.0.0.0", "::", "127.0.0.1", ...)
    port: int

    @property
    def connect_address(self) -> str:
        """Where the broker reaches it from inside the namespace: a wildcard bind is reached on loopback."""
        if self.address == "0.0.0.0":
            return "127.0.0.1"
        if self.address == "::":
            return "::1"
        return self.address


def _hex_address(text: str, family: int) -> str:
    raw = bytes.fromhex(text)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_inodes(pid: int, proc: str = "/proc") -> dict[int, tuple[int, str, int]]:
    """inode -> (family, address, port) of the TCP sockets listening in ``pid``'s network namespace."""
    found: dict[int, tuple[int, str, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"{proc}/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or cols[3] != "0A":       # 0A: TCP_LISTEN
                        continue
                    addr, port = cols[1].split(":")
                    found[int(cols[9])] = (family, _hex_address(addr, family), int(port, 16))
        except (OSError, ValueError):
            continue
    return found


def find_listeners(pids: Iterable[int], ports: Optional[Iterable[int]] = None, proc: str = "/proc") -> list[Listener]:
    """The TCP listening sockets the processes hold (one holder each), on ``ports`` (None: all)."""
    wanted = set(ports) if ports is not None else None
    out: dict[tuple[int, str, int], Listener] = {}
    for pid in sorted(set(pids)):
        inodes = listening_inodes(pid, proc)
        if not inodes:
            continue
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            inode = int(link[len("socket:["):-1])
            if inode not in inodes:
                continue
            family, address, port = inodes[inode]
            if wanted is not None and port not in wanted:
                continue
            out.setdefault((family, address, port), Listener(pid, int(fd), family, address, port))
    return sorted(out.values(), key=lambda l: (l.port, l.family, l.address))


def take_socket(listener: Listener) -> socket.socket:
    """A duplicate of the process's listening socket (pidfd_getfd), as a socket object whose flags
    are left as they are."""
    pidfd = os.pidfd_open(listener.pid)
    try:
        fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, listener.fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd of fd {listener.fd} of pid {listener.pid}: {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


def socket_in_netns(pid: int, family: int) -> socket.socket:
    """A new TCP socket in ``pid``'s network namespace (made by a thread of its own that enters the
    namespace; a socket keeps the namespace it was made in)."""
    box: dict = {}

    def work() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the network namespace of pid {pid}: {os.strerror(err)}")
                try:
                    box["sock"] = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                finally:
                    if _libc.setns(own, CLONE_NEWNET) != 0:
                        box["fatal"] = "could not return to its own network namespace"
            finally:
                os.close(own)
                os.close(target)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=work, name=f"netns-{pid}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


# ---- classifying a connection -----------------------------------------------------------------------
def classify(first: bytes, closed: bool) -> str:
    """"tcp-probe", "http-probe", "incomplete" (read on) or "client" for what a connection sent so far."""
    if not first:
        return "tcp-probe" if closed else "incomplete"
    if first.startswith(HTTP_METHODS) or any(m.startswith(first) for m in HTTP_METHODS):
        end = first.find(b"\r\n\r\n")
        if end < 0:
            return "client" if closed or len(first) >= MAX_PEEK else "incomplete"
        return "http-probe" if PROBE_AGENT in first[:end].lower() else "client"
    return "client"


# ---- the front of one container ---------------------------------------------------------------------
Wake = Callable[[str], Awaitable[None]]   # wake(reason): returns when resident, raises when it failed


class Front:
    """The accepting side of one parked container's listening sockets."""

    def __init__(self, name: str, netns_pid: int, listeners: list[Listener], wake: Wake,
                 silent_wake_s: float = 1.0, on_probe: Optional[Callable[[str], None]] = None):
        self.name = name
        self.netns_pid = netns_pid
        self.listeners = listeners
        self.wake = wake
        self.silent_wake_s = silent_wake_s
        self.on_probe = on_probe
        self._sockets: list[tuple[Listener, socket.socket]] = []
        self._tasks: set[asyncio.Task] = set()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.armed = False

    @property
    def ports(self) -> list[int]:
        return sorted({l.port for l in self.listeners})

    def arm(self) -> list[str]:
        """Start accepting; returns the problems (a socket that could not be taken), logged too."""
        self.loop = asyncio.get_running_loop()
        problems = []
        for listener in self.listeners:
            try:
                sock = take_socket(listener)
            except OSError as exc:
                problems.append(f"port {listener.port}: {exc}")
                continue
            self._sockets.append((listener, sock))
            self.loop.add_reader(sock.fileno(), self._on_ready, listener, sock)
        self.armed = bool(self._sockets)
        for p in problems:
            log.warning("front of %s: %s", self.name, p)
        return problems

    def disarm(self) -> None:
        """Stop accepting (before the resume: the container's own accept takes the queue from here
        on). Connections already taken go on through the relay."""
        for _, sock in self._sockets:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []
        self.armed = False

    async def close(self) -> None:
        self.disarm()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    def _on_ready(self, listener: Listener, sock: socket.socket) -> None:
        """A connection is queued: accept it in a thread. The listening socket stays blocking (its
        flags are the container's), and should the container have been resumed by someone else and
        taken the connection first, the accept waits in that thread, never in the event loop."""
        self.loop.remove_reader(sock.fileno())
        task = self.loop.create_task(self._accept(listener, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: Listener, sock: socket.socket) -> None:
        try:
            conn, _ = await asyncio.to_thread(sock.accept)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.EINVAL):
                log.warning("front of %s: accept on port %d: %s", self.name, listener.port, exc)
            return
        finally:
            if self.armed and any(s is sock for _, s in self._sockets):
                self.loop.add_reader(sock.fileno(), self._on_ready, listener, sock)
        conn.setblocking(False)
        await self._serve(listener, conn)

    async def _serve(self, listener: Listener, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            first, closed = await self._first_bytes(conn)
            kind = classify(first, closed)
            if kind == "tcp-probe":
                self._probe("tcp")
                return
            if kind == "http-probe":
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, PROBE_ANSWER)
                self._probe("http")
                return
            await self.wake(f"connection on port {listener.port}")
            upstream = socket_in_netns(self.netns_pid, listener.family)
            upstream.setblocking(False)
            try:
                await loop.sock_connect(upstream, (listener.connect_address, listener.port))
            except OSError:
                upstream.close()
                raise
            await relay(conn, upstream, first, closed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # noqa: BLE001 - one connection: logged, closed
            log.warning("front of %s: connection on port %d: %s", self.name, listener.port, exc)
        finally:
            conn.close()

    def _probe(self, kind: str) -> None:
        log.info("front of %s: %s probe answered while parked", self.name, kind)
        if self.on_probe:
            self.on_probe(kind)

    async def _first_bytes(self, conn: socket.socket) -> tuple[bytes, bool]:
        """What the client sends before ``silent_wake_s`` passes, up to what classifying needs."""
        loop = asyncio.get_running_loop()
        data = b""
        deadline = loop.time() + self.silent_wake_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return data, False
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, MAX_PEEK - len(data)), left)
            except asyncio.TimeoutError:
                return data, False
            except ConnectionError:
                return data, True
            if not chunk:
                return data, True
            data += chunk
            if classify(data, False) != "incomplete":
                return data, False


async def relay(client: socket.socket, upstream: socket.socket, first: bytes, client_closed: bool) -> None:
    """Bytes both ways until both sides are done; ``first`` (already read from the client) goes first."""
    loop = asyncio.get_running_loop()

    async def pump(src: socket.socket, dst: socket.socket, head: bytes, src_done: bool) -> None:
        try:
            if head:
                await loop.sock_sendall(dst, head)
            while not src_done:
                chunk = await loop.sock_recv(src, 1 << 16)
                if not chunk:
                    break
                await loop.sock_sendall(dst, chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    try:
        await asyncio.gather(pump(client, upstream, first, client_closed), pump(upstream, client, b"", False))
    finally:
        upstream.close()
