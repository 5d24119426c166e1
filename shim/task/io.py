"""A process's standard IO between the container and containerd.

containerd names three paths per process (stdin, stdout, stderr). What they mean, as containerd's
runc shim reads them:

* all empty: no IO, the process gets /dev/null;
* a fifo path (or ``fifo://``): containerd opens the fifos' other ends. The shim opens stdin's read side
  and stdout/stderr's write side and pumps bytes through OS pipes it gives the process;
* ``file:///path``: stdout and stderr appended to that file;
* ``binary:///path?k=v``: a logging binary that gets the read ends of the stdout and stderr pipes as fds
  3 and 4 and a wait pipe as fd 5 (it closes or writes fd 5 once ready), with CONTAINER_ID and
  CONTAINER_NAMESPACE in its environment.

Terminals are in `shim.task.console`. Pumps run on the asyncio loop (non-blocking fds, add_reader /
add_writer).

When the output is drained, as containerd's runc shim does it: a process's exit is reported as soon
as it exits; Delete of the process then waits for its output to reach containerd (`drain_output`),
without holding anything another process of the container needs, and closes the IO. A child the
process left running in the background may keep the pipes open for ever: the wait ends once the
output has been quiet for `DRAIN_QUIET` seconds (nothing read, nothing waiting to be written), and in
any case after `DRAIN_LIMIT` (a steady stream from such a child).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import stat
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

from shim.runtime.runc import Stdio

log = logging.getLogger("kybernate.shim")

BINARY_LOGGER_TERM_TIMEOUT = 12.0
# Delete's wait for a process's output (see the module docstring). containerd 1.6's runc shim waits
# 2 s in all, 2.x's 10 s: the quiet rule gives a silent background child the first and output still
# flowing to a slow reader the second.
DRAIN_QUIET = 1.0
DRAIN_LIMIT = 10.0


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


class IOSetupError(Exception):
    """The process's IO could not be set up (bad URI, missing fifo, logging binary failed)."""


class Pump:
    """Copy bytes from one non-blocking fd to another on the event loop until EOF (or EIO: a pty).

    Each pump owns its destination fd number (a dup where two streams share a file): the event
    loop watches fds, and two pumps on one fd would replace each other's writability callback."""

    def __init__(self, src: int, dst: int | None, close_src: bool = True, close_dst: Callable[[], None] | None = None,
                 name: str = ""):
        self.loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self.close_src = close_src
        self.close_dst = close_dst
        self.name = name
        self.done = self.loop.create_future()
        self._pending = b""
        self.last_read = self.loop.time()  # when bytes last came from the source (for the quiet rule)
        os.set_blocking(src, False)
        if dst is not None:
            os.set_blocking(dst, False)
        self.loop.add_reader(src, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.src, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                log.debug("io %s: read: %s", self.name, exc)
            data = b""
        if not data:
            self._finish()
            return
        self.last_read = self.loop.time()
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.dst is None:
            return  # nobody reads this stream: drop (keeps the process from blocking)
        try:
            n = os.write(self.dst, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            # EPIPE: the reader went away (the fifo can't, we hold a read end; a closed stdin can)
            log.debug("io %s: write: %s", self.name, exc)
            self._drop_dst()
            return
        if n < len(data):
            self._pending = data[n:]
            self.loop.remove_reader(self.src)
            self.loop.add_writer(self.dst, self._on_writable)

    def _on_writable(self) -> None:
        try:
            n = os.write(self.dst, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("io %s: write: %s", self.name, exc)
            self.loop.remove_writer(self.dst)
            self._pending = b""
            self._drop_dst()
            self.loop.add_reader(self.src, self._on_readable)
            return
        self._pending = self._pending[n:]
        if not self._pending:
            self.loop.remove_writer(self.dst)
            self.loop.add_reader(self.src, self._on_readable)

    def _drop_dst(self) -> None:
        dst, self.dst = self.dst, None
        if dst is not None and self.close_dst is not None:
            self.close_dst()

    def _finish(self) -> None:
        if self.done.done():
            return
        self.loop.remove_reader(self.src)
        if self.dst is not None:
            self.loop.remove_writer(self.dst)
        if self.close_src:
            _close(self.src)
        self._drop_dst()
        self.done.set_result(None)

    def cancel(self) -> None:
        """Stop now (the IO is being torn down); the destination is closed by its owner."""
        self._finish()

    @property
    def writing(self) -> bool:
        """Bytes read and not yet written (the destination is full): the output is not quiet."""
        return bool(self._pending)


def _close(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass


class StdinFifo:
    """containerd's stdin fifo as the shim holds it, for pipes (`ProcessIO`) and terminals (`Console`).

    A read end, which a pump copies into the process, and a writer of our own: it keeps the fifo from
    reading EOF while containerd's writer comes and goes (``ctr attach``, a restarted containerd).
    CloseIO closes that writer, so the process sees EOF once containerd's side is closed too."""

    def __init__(self, path: str):
        path = _strip_scheme(path)
        try:
            self.reader: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise IOSetupError(f"open stdin fifo {path}: {exc.strerror}") from exc
        try:
            self._keepalive: int | None = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            _close(self.reader)
            self.reader = None
            raise IOSetupError(f"open stdin fifo {path} for writing: {exc.strerror}") from exc

    def take_reader(self) -> int:
        """The read end, for the pump (or the copy set up before it) that owns it from now on."""
        fd, self.reader = self.reader, None
        if fd is None:
            raise ValueError("the stdin fifo's read end was taken already")
        return fd

    def close_keepalive(self) -> None:
        """CloseIO: stop holding the fifo open for writing."""
        fd, self._keepalive = self._keepalive, None
        _close(fd)

    def close(self) -> None:
        self.close_keepalive()
        fd, self.reader = self.reader, None
        _close(fd)


async def wait_pumps(pumps, timeout: float, quiet: float | None = None) -> bool:
    """True once every pump has copied its source to EOF (pipes and consoles alike); False on timeout,
    or (with `quiet`) once no pump left has read or held anything for `quiet` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    while True:
        left = [p for p in pumps if not p.done.done()]
        if not left:
            return True
        now = loop.time()
        wait = deadline - now
        if quiet is not None and not any(p.writing for p in left):
            # counted from the start of this wait at the earliest: what is in the pipe now is read
            quiet_for = now - max(start, *(p.last_read for p in left))
            if quiet_for >= quiet:
                return False
            wait = min(wait, quiet - quiet_for)
        if wait <= 0:
            return False
        await asyncio.wait([p.done for p in left], timeout=wait)


async def drain_output(proc, limit: float | None = None, quiet: float | None = None) -> bool:
    """Wait for an exited process's output to reach containerd (pipes or console); see the module
    docstring. True when it reached EOF, False when a background child kept it open."""
    pumps = []
    for io in (getattr(proc, "console", None), getattr(proc, "io", None)):
        if io is not None:
            pumps += io.pumps
    return await wait_pumps(pumps, DRAIN_LIMIT if limit is None else limit,
                            DRAIN_QUIET if quiet is None else quiet)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _pipe(uid: int, gid: int) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    if uid or gid:
        os.fchown(r, uid, gid)
        os.fchown(w, uid, gid)
    return r, w


class ProcessIO:
    """The shim's side of one process's stdio. Build with `create`; see the module docstring."""

    def __init__(self, paths: StdioPaths, process_id: str):
        self.paths = paths
        self.process_id = process_id
        self.child = Stdio()  # the fds the runtime (hence the process) gets
        self._child_fds: list[int] = []  # to close in the shim once the process holds them
        self._own_fds: list[int] = []  # closed on close()
        self._copies: list[tuple[int, int | None, Callable[[], None] | None, str]] = []
        self._stdin: StdinFifo | None = None
        self._stdin_copy: tuple[int, int] | None = None
        self.pumps: list[Pump] = []
        self._stdin_pump: Pump | None = None
        self._logger_pid = 0
        self._logger_exit: asyncio.Future | None = None
        self._closed = False

    @classmethod
    async def create(cls, paths: StdioPaths, process_id: str, namespace: str, reaper=None,
                     uid: int = 0, gid: int = 0) -> "ProcessIO":
        pio = cls(paths, process_id)
        try:
            if paths.is_null():
                return pio  # /dev/null for everything (run_command's default)
            uri = urlsplit(paths.stdout or paths.stderr or "")
            scheme = uri.scheme or "fifo"
            if scheme == "fifo":
                pio._setup_fifos(uid, gid)
            elif scheme == "file":
                pio._setup_file(uri.path, uid, gid)
            elif scheme == "binary":
                await pio._setup_binary(uri, namespace, reaper, uid, gid)
            else:
                raise IOSetupError(f"unknown stdio scheme {scheme!r} in {paths.stdout or paths.stderr!r}")
            if paths.stdin and scheme in ("fifo", "file"):
                pio._setup_stdin(paths.stdin, uid, gid)
        except BaseException:
            pio.close_now()
            raise
        return pio

    # -- setup -------------------------------------------------------------------------------
    def _setup_stdin(self, path: str, uid: int, gid: int) -> None:
        r, w = _pipe(uid, gid)
        self.child.stdin = r
        self._child_fds.append(r)
        try:
            self._stdin = StdinFifo(path)
        except IOSetupError:
            _close(w)
            raise
        self._stdin_copy = (self._stdin.take_reader(), w)

    def _open_out(self, path: str) -> int:
        path = _strip_scheme(path)
        if _is_fifo(path):
            # read+write: never blocks in open, and keeps a reader so the process never gets EPIPE
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)

    def _setup_fifos(self, uid: int, gid: int) -> None:
        out, err = self.paths.stdout, self.paths.stderr
        shared_out: int | None = None
        for name, path in (("stdout", out), ("stderr", err)):
            if not path:
                continue
            r, w = _pipe(uid, gid)
            setattr(self.child, name, w)
            self._child_fds.append(w)
            try:
                if name == "stderr" and path == out and shared_out is not None:
                    # same destination: a dup of its own, so each pump has its own fd to wait on
                    dst = os.dup(shared_out)
                else:
                    dst = self._open_out(path)
                    if name == "stdout":
                        shared_out = dst
            except OSError as exc:
                _close(r)
                raise IOSetupError(f"open {name} {path}: {exc.strerror}") from exc
            self._copies.append((r, dst, lambda fd=dst: _close(fd), f"{self.process_id}/{name}"))

    def _setup_file(self, path: str, uid: int, gid: int) -> None:
        try:
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise IOSetupError(f"open log file {path}: {exc.strerror}") from exc
        for name, dst in (("stdout", fd), ("stderr", os.dup(fd))):
            r, w = _pipe(uid, gid)
            setattr(self.child, name, w)
            self._child_fds.append(w)
            self._copies.append((r, dst, lambda fd=dst: _close(fd), f"{self.process_id}/{name}"))

    async def _setup_binary(self, uri, namespace: str, reaper, uid: int, gid: int) -> None:
        if not uri.path:
            raise IOSetupError(f"binary log URI {uri.geturl()!r} names no binary")
        argv = [uri.path]
        for key, value in parse_qsl(uri.query, keep_blank_values=True):
            argv.append(key)
            if value:
                argv.append(value)
        out_r, out_w = _pipe(uid, gid)
        err_r, err_w = _pipe(uid, gid)
        wait_r, wait_w = os.pipe2(os.O_CLOEXEC)
        self.child.stdout, self.child.stderr = out_w, err_w
        self._child_fds += [out_w, err_w]
        env = {"CONTAINER_ID": self.process_id, "CONTAINER_NAMESPACE": namespace}
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_r, 3),
            (os.POSIX_SPAWN_DUP2, err_r, 4),
            (os.POSIX_SPAWN_DUP2, wait_w, 5),
        ]
        try:
            pid = os.posix_spawn(uri.path, argv, env, file_actions=actions)
        except OSError as exc:
            for fd in (out_r, err_r, wait_r, wait_w):
                _close(fd)
            raise IOSetupError(f"start logging binary {uri.path}: {exc.strerror}") from exc
        finally:
            pass
        self._logger_pid = pid
        if reaper is not None:
            self._logger_exit = reaper.watch(pid)
        for fd in (out_r, err_r, wait_w):
            _close(fd)
        # the binary writes to (or closes) fd 5 once it is ready to read
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        os.set_blocking(wait_r, False)

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(wait_r, on_ready)
        try:
            waiters = [ready] + ([self._logger_exit] if self._logger_exit is not None else [])
            await asyncio.wait_for(asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), 30)
        except asyncio.TimeoutError:
            raise IOSetupError(f"logging binary {uri.path} did not signal readiness in 30s") from None
        finally:
            loop.remove_reader(wait_r)
            _close(wait_r)
        if self._logger_exit is not None and self._logger_exit.done() and not ready.done():
            raise IOSetupError(f"logging binary {uri.path} exited with status {self._logger_exit.result().status}")

    # -- lifecycle ---------------------------------------------------------------------------
    def close_after_start(self) -> None:
        """The process holds its ends now: close ours, so EOF arrives when the process is gone."""
        for fd in self._child_fds:
            _close(fd)
        self._child_fds.clear()

    def start(self) -> None:
        """Start pumping (after the runtime created the process)."""
        for src, dst, release, name in self._copies:
            self.pumps.append(Pump(src, dst, close_dst=release, name=name))
        self._copies.clear()
        if self._stdin_copy is not None:
            src, w = self._stdin_copy
            self._stdin_copy = None
            self._stdin_pump = Pump(src, w, close_dst=lambda w=w: _close(w), name=f"{self.process_id}/stdin")

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the process's stdout/stderr reached EOF and were copied out; False on timeout."""
        return await wait_pumps(self.pumps, timeout)

    @property
    def drained(self) -> bool:
        return all(p.done.done() for p in self.pumps)

    def close_stdin(self) -> None:
        """CloseIO: stop keeping stdin open; the process sees EOF once containerd's writer closes."""
        if self._stdin is not None:
            self._stdin.close_keepalive()

    def close_now(self) -> None:
        """Tear everything down (process deleted or creation failed)."""
        if self._closed:
            return
        self._closed = True
        self.close_after_start()
        self.close_stdin()
        for src, dst, release, _ in self._copies:
            _close(src)
            release()
        self._copies.clear()
        if self._stdin_copy is not None:
            for fd in self._stdin_copy:
                _close(fd)
            self._stdin_copy = None
        for p in self.pumps:
            p.cancel()
        if self._stdin_pump is not None:
            self._stdin_pump.cancel()

    async def close(self) -> None:
        self.close_now()
        await self._stop_logger()

    async def _stop_logger(self) -> None:
        if not self._logger_pid or self._logger_exit is None:
            return
        if self._logger_exit.done():
            return
        try:
            os.kill(self._logger_pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._logger_exit), BINARY_LOGGER_TERM_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("logging binary of %s did not exit after SIGTERM, killing it", self.process_id)
            try:
                os.kill(self._logger_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _strip_scheme(path: str) -> str:
    if path.startswith("fifo://"):
        return path[len("fifo://"):]
    return path
