"""The long-running shim: serves the Task API on the socket `start` handed over (fd 3).

It is a child subreaper (container processes are re-parented to it), logs to the bundle's ``log``
fifo in containerd's logrus text format, publishes events to $TTRPC_ADDRESS and exits after Shutdown
(or a while after its last task was deleted, or on SIGTERM/SIGINT).

It is exec'd by `start` (cold) or forked by the warm template (`shim.binary.warm`), which imports
this module; so this module imports neither of them, nor `cli` (the plan is in `shim.binary.flags`).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time

from shim.binary.flags import RUNTIME_NAME, Flags

log = logging.getLogger("kybernate.shim")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


AUDIT_LOGGER = "kybernate.audit"


class LogrusFormatter(logging.Formatter):
    """``time="..." level=info msg="..." key=value``: what containerd's own logs look like.

    Lines of the audit logger (refusals of untrusted input) also carry ``logger=kybernate.audit``,
    so that they can be picked out of containerd's log."""

    LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
              logging.ERROR: "error", logging.CRITICAL: "fatal"}

    def __init__(self, fields: dict[str, str]):
        super().__init__()
        self.fields = " ".join(f"{k}={_quote(v) if (' ' in v or '=' in v or not v) else v}" for k, v in fields.items())

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        nanos = int((record.created % 1) * 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{nanos:09d}Z"
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        level = self.LEVELS.get(record.levelno, "info")
        audit = f" logger={AUDIT_LOGGER}" if record.name == AUDIT_LOGGER else ""
        return f"time={_quote(stamp)} level={level} msg={_quote(msg)}{audit} {self.fields}\n"


class FdHandler(logging.Handler):
    """Writes to a non-blocking fd and drops what does not fit: logging must never block the shim."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.format(record).encode("utf-8", "replace")
            os.write(self.fd, data)
        except (BlockingIOError, BrokenPipeError):
            pass
        except Exception:
            pass


def open_log(bundle: str) -> int:
    """The bundle's ``log`` fifo (containerd holds its read end), else stderr."""
    path = os.path.join(bundle, "log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ENOENT):
            raise
        fd = os.dup(2)
    os.dup2(fd, 2)  # tracebacks of last resort land there too
    os.set_blocking(2, False)
    return fd


def setup_logging(flags: Flags) -> None:
    fd = open_log(flags.bundle_path)
    handler = FdHandler(fd)
    handler.setFormatter(LogrusFormatter({"namespace": flags.namespace, "id": flags.id, "runtime": RUNTIME_NAME}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)
    logging.raiseExceptions = False


def _listener(flags: Flags) -> socket.socket:
    if flags.socket:  # -socket PATH: bind it ourselves (no `start` handed one over)
        from shim.binary.sockets import bind_unix

        raw = bind_unix(flags.socket if flags.socket.startswith("unix://") else "unix://" + flags.socket)
        return socket.socket(fileno=raw.detach())
    return socket.socket(fileno=3)


def run(flags: Flags, preloaded: frozenset[str] | None = None, loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Serve until Shutdown. `preloaded`: the modules the warm template had loaded when it forked
    this daemon (None when exec'd cold); what the daemon imports beyond them is logged when it shuts
    down. `loop`: an event loop made ahead (by the template's spare), else asyncio.run makes one."""
    setup_logging(flags)
    from shim.runtime.reaper import set_subreaper

    try:
        set_subreaper()
    except OSError as exc:
        log.error("cannot become a child subreaper: %s", exc)
        return 1
    try:
        sock = _listener(flags)
    except OSError as exc:
        log.error("no listening socket (fd 3 from start, or -socket): %s", exc)
        return 1
    try:
        if loop is None:
            asyncio.run(_serve(flags, sock, preloaded))
        else:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(_serve(flags, sock, preloaded))
    except Exception:
        log.exception("shim failed")
        return 1
    return 0


def late_imports(preloaded: frozenset[str]) -> list[str]:
    """The modules loaded now that the warm template had not loaded (`preloaded`)."""
    import sys

    return sorted(set(sys.modules) - preloaded)


def report_late_imports(preloaded: frozenset[str]) -> None:
    """Every import a forked daemon makes itself sits on the critical path of some RPC (a few ms
    each, tens for a package): list them, at debug level, so that the template's preload list
    (`shim.binary.template.PRELOAD`) can follow the code (tests/integration/test_checkpoint.py
    checks that a ctr run, checkpoint and restore need none)."""
    late = late_imports(preloaded)
    log.debug("warm template: %d modules imported after the fork: %s", len(late), " ".join(late) or "none")


async def _serve(flags: Flags, sock: socket.socket, preloaded: frozenset[str] | None = None) -> None:
    from ttrpc import Server

    from shim.task.events import Publisher
    from shim.runtime.reaper import Reaper
    from shim.task.service import TaskService

    loop = asyncio.get_running_loop()
    try:
        path = sock.getsockname()
    except OSError:
        path = ""
    reaper = Reaper()
    reaper.install(loop)
    publisher = Publisher(flags.ttrpc_address, flags.namespace)
    stop = asyncio.Event()
    service = TaskService(flags.namespace, reaper, publisher, on_shutdown=stop.set)
    server = Server(service.services(), check_peer_uid=True)
    await server.serve_socket(sock)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.debug("serving on %s (pid %d)", path or "fd 3", os.getpid())
    await stop.wait()
    log.info("shutting down")
    if preloaded is not None:
        report_late_imports(preloaded)
    await server.shutdown(grace=2.0)
    await publisher.close(timeout=5.0)
    await service.close()
    reaper.uninstall()
    if isinstance(path, str) and path and not path.startswith("\0"):
        try:
            os.unlink(path)
        except OSError:
            pass
