"""When a process's output is drained, and what waits for it.

As in containerd's runc shim: the exit is reported when the process exits; Delete then waits for the
output, holding no lock, so a child left running in the background with the pipes open delays only
that one Delete (until the output has been quiet a while), never another process of the container.
The Task service is driven here with a real Container and real pipes; no runtime is called.
"""
import asyncio
import logging
import os
import time
from types import SimpleNamespace

import pytest

from proto.containerd.task.v2 import shim_pb2 as api
from shim.runtime.reaper import Exit
from shim.task import io as shimio
from shim.task.container import Container
from shim.task.io import ProcessIO, StdioPaths, drain_output, wait_pumps
from shim.task.process import ExecRunning, Running, ExecProcess, InitProcess, State
from shim.task.service import TaskService
from ttrpc import Code, TTRPCError


class Recorder:
    """The event publisher: records what was published, and when."""

    def __init__(self):
        self.events: list[tuple[float, object]] = []

    def publish(self, event):
        self.events.append((time.monotonic(), event))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut


def fifo_reader(path) -> int:
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # containerd's end


async def process_with_output(tmp_path, name: str, cls=ExecProcess) -> tuple[object, int, int]:
    """(a started process with fifo stdout, containerd's read end, the process's write end)."""
    out = tmp_path / f"{name}.out"
    reader = fifo_reader(out)
    pio = await ProcessIO.create(StdioPaths(stdout=str(out)), name, "ns")
    child_out = os.dup(pio.child.stdout)  # what the process (and a child it forks) holds
    pio.close_after_start()
    pio.start()
    if cls is ExecProcess:
        p = ExecProcess("c1", name, StdioPaths(stdout=str(out)), {"args": ["sh"]})
    else:
        p = InitProcess("c1", "c1", StdioPaths(stdout=str(out)))
    p.io = pio
    p.current = ExecRunning(p) if cls is ExecProcess else Running(p)
    return p, reader, child_out


def read_now(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


# ---- the drain rules ---------------------------------------------------------------------------------
def test_drain_ends_at_eof_at_once(tmp_path):
    async def scenario():
        p, reader, child = await process_with_output(tmp_path, "e")
        os.write(child, b"last words\n")
        os.close(child)
        t0 = time.monotonic()
        assert await drain_output(p, limit=5, quiet=2)
        assert time.monotonic() - t0 < 0.5
        assert read_now(reader) == b"last words\n"
        os.close(reader)

    asyncio.run(scenario())


def test_drain_gives_up_on_quiet_output_held_open_and_keeps_what_was_in_the_pipe(tmp_path):
    async def scenario():
        p, reader, child = await process_with_output(tmp_path, "e")
        await asyncio.sleep(0.3)  # quiet long before the drain starts...
        os.write(child, b"in the pipe\n")  # ...and this not read yet when it does
        t0 = time.monotonic()
        assert not await drain_output(p, limit=5, quiet=0.3)
        took = time.monotonic() - t0
        assert 0.25 <= took < 1.0, took  # the quiet time, not the 5 s limit
        assert read_now(reader) == b"in the pipe\n"
        os.close(child)
        os.close(reader)

    asyncio.run(scenario())


def test_drain_waits_for_flowing_output_up_to_its_limit(tmp_path):
    async def scenario():
        p, reader, child = await process_with_output(tmp_path, "e")
        stop = asyncio.Event()

        async def chatty_child():
            while not stop.is_set():
                os.write(child, b"tick\n")
                read_now(reader)
                await asyncio.sleep(0.05)

        writer = asyncio.ensure_future(chatty_child())
        t0 = time.monotonic()
        assert not await drain_output(p, limit=1.0, quiet=0.2)
        took = time.monotonic() - t0
        assert 0.95 <= took < 1.5, took  # never quiet for 0.2 s: the limit ends it
        stop.set()
        await writer
        os.close(child)
        os.close(reader)

    asyncio.run(scenario())


def test_output_waiting_for_a_slow_reader_is_not_quiet(tmp_path):
    async def scenario():
        p, reader, child = await process_with_output(tmp_path, "e")
        payload = b"x" * (1 << 20)  # more than the fifo holds: the pump waits for containerd to read
        loop = asyncio.get_running_loop()
        send = loop.run_in_executor(None, os.write, child, payload[:60000])
        await asyncio.sleep(0.1)
        got = bytearray()

        async def slow_reader():
            await asyncio.sleep(0.6)  # longer than the quiet time
            while True:
                chunk = read_now(reader)
                if chunk:
                    got.extend(chunk)
                elif p.io.drained:
                    return
                await asyncio.sleep(0.01)

        await send
        more = loop.run_in_executor(None, os.write, child, payload[60000:120000])
        task = asyncio.ensure_future(slow_reader())
        await more
        os.close(child)
        assert await drain_output(p, limit=5, quiet=0.2)  # it waited for the reader, past 0.2 s
        await asyncio.wait_for(task, 5)
        assert len(got) == 120000
        os.close(reader)

    asyncio.run(scenario())


def test_wait_pumps_without_quiet_keeps_its_old_meaning():
    async def scenario():
        assert await wait_pumps([], 1)

    asyncio.run(scenario())


# ---- the Task service: exits and deletes ----------------------------------------------------------------
def make_service(tmp_path):
    reaper = SimpleNamespace(subscribe=lambda fn: None)
    recorder = Recorder()
    service = TaskService("ns", reaper, recorder, on_shutdown=lambda: None)
    c = Container("c1", str(tmp_path), "ns", runtime=None, choice=None, spec={}, rootfs="", options=None,
                  reaper=None)
    service.containers["c1"] = c
    return service, c, recorder


def test_exit_is_published_when_the_process_exits_not_when_its_output_closes(tmp_path, monkeypatch):
    async def scenario():
        service, c, recorder = make_service(tmp_path)
        p, reader, child = await process_with_output(tmp_path, "bg")  # a background child holds stdout
        p.pid = 4242
        c.execs["bg"] = p
        t0 = time.monotonic()
        await service._handle_exit(c, p, Exit(4242, 5, time.time()))
        exits = [e for _, e in recorder.events if type(e).__name__ == "TaskExit"]
        assert [(e.id, e.exit_status) for e in exits] == [("bg", 5)]
        assert recorder.events[0][0] - t0 < 0.2
        assert p.has_exited and p.state is State.STOPPED
        os.close(child)
        os.close(reader)

    asyncio.run(scenario())


def test_delete_of_an_exec_with_a_background_child_blocks_no_other_process(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shimio, "DRAIN_QUIET", 0.8)

    async def scenario():
        service, c, recorder = make_service(tmp_path)
        held, held_reader, held_child = await process_with_output(tmp_path, "held")
        plain, plain_reader, plain_child = await process_with_output(tmp_path, "plain")
        for p, pid in ((held, 100), (plain, 101)):
            p.pid = pid
            c.execs[p.id] = p
        os.write(held_child, b"before exit\n")
        held.set_exited(5)
        os.close(plain_child)
        plain.set_exited(0)

        t0 = time.monotonic()
        slow = asyncio.ensure_future(service.delete(None, api.DeleteRequest(id="c1", exec_id="held")))
        await asyncio.sleep(0.1)
        assert not slow.done()
        # meanwhile the container's lock is free: another exec is deleted at once
        resp = await asyncio.wait_for(service.delete(None, api.DeleteRequest(id="c1", exec_id="plain")), 0.5)
        assert resp.exit_status == 0 and time.monotonic() - t0 < 0.5
        async with asyncio.timeout(0.2):
            async with c.lock:
                pass
        resp = await asyncio.wait_for(slow, 3)
        took = time.monotonic() - t0
        assert resp.exit_status == 5 and 0.75 <= took < 2.0, took
        assert read_now(held_reader) == b"before exit\n"
        assert c.execs == {}
        assert held.io._closed  # its pipes are closed: the background child gets EPIPE, not the shim's fds
        os.close(held_child)
        for fd in (held_reader, plain_reader):
            os.close(fd)

    with caplog.at_level(logging.WARNING, logger="kybernate.shim"):
        asyncio.run(scenario())
    assert any("process held in container c1: its output is still open" in r.getMessage() for r in caplog.records)


def test_delete_of_a_running_exec_is_refused_at_once(tmp_path):
    async def scenario():
        service, c, _ = make_service(tmp_path)
        p, reader, child = await process_with_output(tmp_path, "run")
        p.pid = 100
        c.execs["run"] = p
        t0 = time.monotonic()
        with pytest.raises(TTRPCError) as info:
            await service.delete(None, api.DeleteRequest(id="c1", exec_id="run"))
        assert info.value.code == Code.FAILED_PRECONDITION
        assert "cannot delete a running process run in container c1" in info.value.message
        assert time.monotonic() - t0 < 0.2
        os.close(child)
        os.close(reader)

    asyncio.run(scenario())


def test_a_delete_whose_caller_is_gone_still_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(shimio, "DRAIN_QUIET", 0.3)

    async def scenario():
        service, c, _ = make_service(tmp_path)
        p, reader, child = await process_with_output(tmp_path, "e")
        p.pid = 100
        c.execs["e"] = p
        p.set_exited(1)
        call = asyncio.ensure_future(service.delete(None, api.DeleteRequest(id="c1", exec_id="e")))
        await asyncio.sleep(0.1)
        call.cancel()  # the ttrpc server cancels a request whose connection closed
        with pytest.raises(asyncio.CancelledError):
            await call
        assert "e" in c.execs
        await asyncio.sleep(0.5)
        assert c.execs == {} and p.state is State.DELETED
        os.close(child)
        os.close(reader)

    asyncio.run(scenario())


def test_a_wait_whose_caller_is_gone_is_cancelled(tmp_path):
    async def scenario():
        service, c, _ = make_service(tmp_path)
        c.init = InitProcess("c1", "c1", StdioPaths())
        c.init.current = Running(c.init)
        call = asyncio.ensure_future(service.wait(None, api.WaitRequest(id="c1")))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not service._tasks  # nothing left running on its behalf

    asyncio.run(scenario())


# ---- the cgroup --------------------------------------------------------------------------------------
def test_an_unreadable_cgroup_is_warned_about_once_and_named_by_stats(tmp_path, monkeypatch, caplog):
    import shim.cgroups

    def broken(pid, **kw):
        raise shim.cgroups.CgroupError("no cgroup v2 entry in /proc/PID/cgroup")

    monkeypatch.setattr(shim.cgroups.Cgroup, "for_pid", staticmethod(broken))

    async def scenario():
        service, c, _ = make_service(tmp_path)
        c.init = InitProcess("c1", "c1", StdioPaths())
        c.init.current = Running(c.init)
        c.init.pid = os.getpid()  # alive
        service._load_cgroup(c)
        service._watch_oom(c)
        with pytest.raises(TTRPCError) as info:
            await service.stats(None, api.StatsRequest(id="c1"))
        assert info.value.code == Code.NOT_FOUND
        assert info.value.message == (f"stats of container c1: cgroup of pid {os.getpid()}: "
                                      "no cgroup v2 entry in /proc/PID/cgroup")

    with caplog.at_level(logging.DEBUG, logger="kybernate.shim"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"container c1: cannot read its cgroup, so no Stats and no OOM events: cgroup of pid "
                        f"{os.getpid()}: no cgroup v2 entry in /proc/PID/cgroup"]
