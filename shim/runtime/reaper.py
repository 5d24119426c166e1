"""The single owner of waitpid(2) in the shim daemon.

The daemon is a child subreaper: container processes (grandchildren through ``runc``) are re-parented
to it, and so are its own ``runc`` commands. Exactly one place may call waitpid, or exits get lost:
this one. On SIGCHLD (delivered through asyncio's signal handling, so in the event loop thread) it
reaps every exited child with ``waitpid(-1, WNOHANG)`` and hands each (pid, status) to:

* a one-shot waiter registered for that pid with `watch` (the runc commands we spawn: register the
  pid right after the spawn, before the loop can run the SIGCHLD handler, so no exit is missed);
* every subscriber (`subscribe`): the Task service matches pids of container processes;
* every open `collect` window: exits of pids not known yet (a process that exits before we have read
  its pid file) are kept there until the caller can look them up.

asyncio's child watchers and ``Popen.wait`` are not used anywhere in the daemon: they would race with
this loop for the same exits.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number for a signal death (as runc and containerd report)
    timestamp: float  # time.time() when reaped


def exit_code(wait_status: int) -> int:
    """A waitpid status as containerd reports it: the exit code, or 128+signal."""
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return wait_status


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Collector:
    """Exits seen while a window is open (see `Reaper.collect`)."""

    def __init__(self, reaper: "Reaper"):
        self._reaper = reaper
        self.exits: dict[int, Exit] = {}

    def __enter__(self) -> "Collector":
        self._reaper._collectors.add(self)
        return self

    def __exit__(self, *exc) -> None:
        self._reaper._collectors.discard(self)

    def pop(self, pid: int) -> Exit | None:
        return self.exits.pop(pid, None)


class Reaper:
    def __init__(self, waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid):
        self._waitpid = waitpid
        self._waiters: dict[int, asyncio.Future] = {}
        self._subscribers: list[Callable[[Exit], None]] = []
        self._collectors: set[Collector] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        # children that exited before the handler was in place
        loop.call_soon(self.reap)

    def uninstall(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_signal_handler(signal.SIGCHLD)
            except (RuntimeError, ValueError):
                pass

    def subscribe(self, callback: Callable[[Exit], None]) -> None:
        self._subscribers.append(callback)

    def collect(self) -> Collector:
        """``with reaper.collect() as early:`` keeps every exit reaped inside the block."""
        return Collector(self)

    def watch(self, pid: int) -> asyncio.Future:
        """A future for the exit of `pid` (a child we just spawned). Call right after spawning."""
        loop = self._loop or asyncio.get_running_loop()
        fut = self._waiters.get(pid)
        if fut is None:
            fut = loop.create_future()
            self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        """Reap every exited child now (the SIGCHLD handler)."""
        while True:
            try:
                pid, status = self._waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self.dispatch(Exit(pid, exit_code(status), time.time()))

    def dispatch(self, ex: Exit) -> None:
        fut = self._waiters.pop(ex.pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(ex)
            return  # a command we ran ourselves, no container process
        for c in list(self._collectors):
            c.exits[ex.pid] = ex
        for cb in list(self._subscribers):
            try:
                cb(ex)
            except Exception:  # a subscriber's bug must not stop reaping
                import logging

                logging.getLogger("kybernate.shim").exception("exit subscriber failed for pid %d", ex.pid)
