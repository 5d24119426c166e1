"""OOM notification for a container cgroup, driven by the asyncio loop (no thread per container).

v1: the kernel's memory-cgroup notification API: an eventfd registered through
``cgroup.event_control`` against ``memory.oom_control`` becomes readable on each OOM. It also
fires once when the cgroup is removed, so an event on a vanished cgroup is not reported.

v2: ``memory.events`` has an ``oom_kill`` counter and generates inotify IN_MODIFY when it changes.
We report when the counter rises (containerd's v2 watcher reports any event while oom_kill > 0,
which repeats TaskOOM for unrelated later events). Where inotify is unavailable we poll.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import inspect
import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from .cgroup import Cgroup
from .files import read_flat_keyed

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_DELETE_SELF = 0x00000400
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class Inotify:
    """Minimal inotify via ctypes: the stdlib has none and we need only one watch."""

    _libc: Any = None

    def __init__(self) -> None:
        if Inotify._libc is None:
            Inotify._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = Inotify._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def add_watch(self, path: Path, mask: int) -> int:
        wd = Inotify._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
        return wd

    def read_masks(self) -> list[int]:
        """Drain pending events; returns their masks (struct inotify_event: wd, mask, cookie, len)."""
        masks = []
        while True:
            try:
                buf = os.read(self.fd, 4096)
            except BlockingIOError:
                return masks
            off = 0
            while off + 16 <= len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                masks.append(mask)
                off += 16 + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OomWatcher:
    """Calls ``on_oom()`` (plain function or coroutine function) once per OOM in ``cgroup``.

    ``start()`` must run inside the event loop; ``close()`` is idempotent and also happens by itself
    when the cgroup disappears (container deleted).
    """

    def __init__(self, cgroup: Cgroup, on_oom: Callable[[], Any], *, poll_interval: float = 0.5,
                 use_inotify: bool = True) -> None:
        self.cgroup = cgroup
        self.on_oom = on_oom
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.mode: Optional[str] = None          # "eventfd", "inotify" or "poll" once started
        self.closed = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fds: list[int] = []
        self._reader_fd: Optional[int] = None
        self._inotify: Optional[Inotify] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._last_kills = 0
        self._tasks: set[asyncio.Task] = set()

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "OomWatcher":
        self._loop = asyncio.get_running_loop()
        mem = self.cgroup.memory_dir()
        if mem is None or not mem.is_dir():
            raise FileNotFoundError(f"no memory cgroup for {self.cgroup.path or self.cgroup.dirs}")
        if self.cgroup.version == 1:
            self._start_v1(mem)
        else:
            self._start_v2(mem)
        return self

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reader_fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._reader_fd)
        self._reader_fd = None
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self._inotify is not None:
            self._inotify.close()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    # v1 ------------------------------------------------------------------------------------------
    def _start_v1(self, mem: Path) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(efd)
        try:
            ofd = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(ofd)
            with open(mem / "cgroup.event_control", "w") as f:
                f.write(f"{efd} {ofd}")
        except BaseException:
            self.close()
            raise
        self._reader_fd = efd
        self._loop.add_reader(efd, self._on_eventfd, efd, mem)
        self.mode = "eventfd"

    def _on_eventfd(self, efd: int, mem: Path) -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            return
        if not (mem / "memory.oom_control").exists():   # the cgroup was removed
            self.close()
            return
        self._fire()

    # v2 ------------------------------------------------------------------------------------------
    def _read_kills(self, mem: Path) -> Optional[int]:
        ev = read_flat_keyed(mem / "memory.events")
        return None if ev is None else ev.get("oom_kill", 0)

    def _start_v2(self, mem: Path) -> None:
        kills = self._read_kills(mem)
        if kills is None:
            raise FileNotFoundError(f"{mem}/memory.events does not exist")
        self._last_kills = kills
        if self.use_inotify:
            try:
                ino = Inotify()
                ino.add_watch(mem / "memory.events", IN_MODIFY | IN_DELETE_SELF)
            except OSError as e:
                log.warning("inotify on %s failed (%s); polling every %.1fs", mem, e, self.poll_interval)
            else:
                self._inotify = ino
                self._reader_fd = ino.fd
                self._loop.add_reader(ino.fd, self._on_inotify, mem)
                self.mode = "inotify"
                return
        self._poll_task = self._loop.create_task(self._poll(mem))
        self.mode = "poll"

    def _check_v2(self, mem: Path) -> None:
        kills = self._read_kills(mem)
        if kills is None:
            self.close()
            return
        if kills > self._last_kills:
            self._last_kills = kills
            self._fire()

    def _on_inotify(self, mem: Path) -> None:
        masks = self._inotify.read_masks() if self._inotify else []
        if any(m & (IN_DELETE_SELF | IN_IGNORED) for m in masks):
            self.close()
            return
        self._check_v2(mem)

    async def _poll(self, mem: Path) -> None:
        while not self.closed:
            await asyncio.sleep(self.poll_interval)
            self._check_v2(mem)

    # callback ------------------------------------------------------------------------------------
    def _fire(self) -> None:
        try:
            result = self.on_oom()
        except Exception:
            log.exception("OOM callback failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
