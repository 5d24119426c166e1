"""Terminals: the pty master runc hands over through ``--console-socket``, and copying it to the fifos.

runc creates the pty inside the container and sends its master over a unix socket (SCM_RIGHTS). The
shim copies the master's output to the stdout fifo and the stdin fifo into the master; ResizePty sets
the window size with TIOCSWINSZ. When the process exits the master reads EIO: that is the EOF.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios

from shim.task.io import IOSetupError, Pump, StdinFifo, StdioPaths, _close, _strip_scheme, wait_pumps


class ConsoleSocket:
    """A listening unix socket in a private temp dir for runc's --console-socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kybernate-pty")
        self.path = os.path.join(self.dir, "pty.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(self.path)
            self.sock.listen(1)
        except BaseException:
            self.close()
            raise
        self.sock.setblocking(False)

    async def receive_master(self, timeout: float = 30.0) -> int:
        """The pty master runc sent (call after the runtime command returned)."""
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self.sock), timeout)
        except asyncio.TimeoutError:
            raise IOSetupError("the runtime sent no console master within %ss" % timeout) from None
        with conn:
            conn.setblocking(True)
            conn.settimeout(timeout)
            msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise IOSetupError("the runtime connected to the console socket but sent no file descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Console:
    """A pty master and the pumps between it and containerd's fifos."""

    def __init__(self, master: int, paths: StdioPaths, process_id: str):
        self.master = master
        self.paths = paths
        self.process_id = process_id
        self._out_fd: int | None = None
        self._stdin: StdinFifo | None = None
        self.pumps: list[Pump] = []
        self._stdin_pump: Pump | None = None

    def start(self) -> None:
        # the master is read by the stdout pump and written by the stdin pump: give each its own fd
        os.set_blocking(self.master, False)
        if self.paths.stdout:
            path = _strip_scheme(self.paths.stdout)
            try:
                self._out_fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise IOSetupError(f"open stdout {path}: {exc.strerror}") from exc
            out_fd = self._out_fd

            def release_out() -> None:
                fd, self._out_fd = self._out_fd, None
                _close(fd)

            self.pumps.append(Pump(self.master, out_fd, close_src=False, close_dst=release_out,
                                   name=f"{self.process_id}/console"))
        else:
            self.pumps.append(Pump(self.master, None, close_src=False, name=f"{self.process_id}/console"))
        if self.paths.stdin:
            self._stdin = StdinFifo(self.paths.stdin)
            master_w = os.dup(self.master)
            os.set_inheritable(master_w, False)
            self._stdin_pump = Pump(self._stdin.take_reader(), master_w, close_dst=lambda: _close(master_w),
                                    name=f"{self.process_id}/console-stdin")

    def resize(self, width: int, height: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def wait_drained(self, timeout: float) -> bool:
        return await wait_pumps(self.pumps, timeout)

    def close_stdin(self) -> None:
        """CloseIO: stop keeping stdin open; the terminal sees EOF once containerd's writer closes."""
        if self._stdin is not None:
            self._stdin.close_keepalive()

    def close_now(self) -> None:
        self.close_stdin()
        for p in self.pumps:
            p.cancel()
        if self._stdin_pump is not None:
            self._stdin_pump.cancel()
        if self._stdin is not None:
            self._stdin.close()
        if self.master >= 0:
            _close(self.master)
            self.master = -1

    async def close(self) -> None:
        self.close_now()
