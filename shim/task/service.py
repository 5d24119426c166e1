"""The Task service (containerd.task.v2.Task and v3): one thin method per RPC.

Each method validates the request, finds the container or process, delegates to `shim.task.container`,
and publishes the event. Process exits come from the reaper (`on_exit`); they are published in the
order containerd relies on: a process's start event before its exit, every exec's exit before its
container's init exit, and the TaskExit delivered before Delete returns. As in containerd's runc
shim, an exit is reported when the process exits; its output is drained by Delete, before the
container's lock is taken, so a background child holding an exec's pipes open delays only the
Delete of that exec, never another process of the container.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time

from ttrpc import Code, Service, TTRPCError
from google.protobuf import empty_pb2
from proto.anyutil import pack
from proto.containerd.events import task_pb2 as ev
from proto.containerd.runc.v1 import options_pb2
from proto.containerd.task.v2 import shim_pb2 as api
from proto.containerd.types.task import task_pb2 as types

from shim.task.container import Container, validate_id
from shim.task.io import StdioPaths, drain_output
from shim.task.process import ExecProcess, InitProcess, Process, State
from shim.runtime.reaper import Exit, Reaper

log = logging.getLogger("kybernate.shim")

SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
EXIT_EVENT_BEFORE_DELETE = 5.0
IDLE_EXIT_AFTER = 5.0  # the shim exits this long after its last task was deleted (if no Shutdown)

_STATUS = {
    State.CREATED: types.CREATED,
    State.CREATED_CHECKPOINT: types.CREATED,
    State.RUNNING: types.RUNNING,
    State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED,
    State.DELETED: types.STOPPED,
}
EMPTY = empty_pb2.Empty()


def _ts(msg, when: float | None) -> None:
    if when:
        msg.FromNanoseconds(int(when * 1e9))


def rpc(method=None, *, cancellable: bool = False):
    """Every failure is a TTRPCError naming the RPC and the container; the rest is a bug, logged.

    The ttrpc server cancels a request when its connection closes (or its deadline passes). Only
    `cancellable` RPCs (those that change nothing: Wait, State, ...) stop there; the others run to
    their end in a task of their own, so a containerd restarting in the middle of a Create, Start,
    Delete or Checkpoint never leaves a half-done container or an unpublished event behind."""
    if method is None:
        return functools.partial(rpc, cancellable=cancellable)

    @functools.wraps(method)
    async def wrapper(self, ctx, req):
        name = method.__name__.lstrip("_")
        cid = getattr(req, "id", "")
        log.debug("rpc %s id=%s exec=%s", name, cid, getattr(req, "exec_id", ""))
        try:
            if cancellable:
                return await method(self, ctx, req)
            return await self._to_completion(name, cid, method(self, ctx, req))
        except TTRPCError as exc:
            log.debug("rpc %s %s: %s %s", name, cid, exc.code.name, exc.message)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("rpc %s for container %s failed", name, cid)
            raise TTRPCError(Code.UNKNOWN, f"{name.lower()} container {cid}: {exc}") from exc

    return wrapper


def _log_orphan_result(name: str, cid: str, task: asyncio.Task) -> None:
    """The end of an RPC whose caller went away: nobody else will see how it went."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        log.info("rpc %s for container %s finished after its caller was gone", name, cid)
    elif isinstance(exc, TTRPCError):
        log.warning("rpc %s for container %s failed after its caller was gone: %s", name, cid, exc.message)
    else:
        log.error("rpc %s for container %s failed after its caller was gone", name, cid, exc_info=exc)


class TaskService:
    def __init__(self, namespace: str, reaper: Reaper, publisher, on_shutdown):
        self.namespace = namespace
        self.reaper = reaper
        self.publisher = publisher
        self._on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._by_pid: dict[int, tuple[Container, Process]] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._cgroup_warned: set[str] = set()  # containers whose unreadable cgroup was warned about
        reaper.subscribe(self.on_exit)

    def services(self) -> list[Service]:
        methods = [
            ("State", self.state, api.StateRequest, api.StateResponse),
            ("Create", self.create, api.CreateTaskRequest, api.CreateTaskResponse),
            ("Start", self.start, api.StartRequest, api.StartResponse),
            ("Delete", self.delete, api.DeleteRequest, api.DeleteResponse),
            ("Pids", self.pids, api.PidsRequest, api.PidsResponse),
            ("Pause", self.pause, api.PauseRequest, empty_pb2.Empty),
            ("Resume", self.resume, api.ResumeRequest, empty_pb2.Empty),
            ("Checkpoint", self.checkpoint, api.CheckpointTaskRequest, empty_pb2.Empty),
            ("Kill", self.kill, api.KillRequest, empty_pb2.Empty),
            ("Exec", self.exec, api.ExecProcessRequest, empty_pb2.Empty),
            ("ResizePty", self.resize_pty, api.ResizePtyRequest, empty_pb2.Empty),
            ("CloseIO", self.close_io, api.CloseIORequest, empty_pb2.Empty),
            ("Update", self.update, api.UpdateTaskRequest, empty_pb2.Empty),
            ("Wait", self.wait, api.WaitRequest, api.WaitResponse),
            ("Stats", self.stats, api.StatsRequest, api.StatsResponse),
            ("Connect", self.connect, api.ConnectRequest, api.ConnectResponse),
            ("Shutdown", self.shutdown, api.ShutdownRequest, empty_pb2.Empty),
        ]
        out = []
        for name in SERVICE_NAMES:
            svc = Service(name)
            for method, handler, req_t, resp_t in methods:
                svc.add(method, handler, request_type=req_t, response_type=resp_t)
            out.append(svc)
        return out

    # -- helpers -----------------------------------------------------------------------------------
    def _get(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            if not cid:
                raise TTRPCError(Code.INVALID_ARGUMENT, "container id must not be empty")
            raise TTRPCError(Code.NOT_FOUND, f"container {cid} not found")
        return c

    def _track(self, c: Container, p: Process) -> None:
        if p.pid > 0:
            self._by_pid[p.pid] = (c, p)

    def _untrack(self, p: Process) -> None:
        entry = self._by_pid.get(p.pid)
        if entry is not None and entry[1] is p:
            del self._by_pid[p.pid]

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _publish(self, event) -> asyncio.Future:
        return self.publisher.publish(event)

    async def _to_completion(self, name: str, cid: str, coro):
        """Await `coro` in a task that a cancelled caller does not cancel (see `rpc`)."""
        task = self._spawn(coro)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.info("rpc %s for container %s: its caller is gone; finishing it anyway", name, cid)
                task.add_done_callback(functools.partial(_log_orphan_result, name, cid))
            raise

    # -- exits ---------------------------------------------------------------------------------------
    def on_exit(self, ex: Exit) -> None:
        """Reaper subscriber: an exit of one of our container processes (others are ignored)."""
        entry = self._by_pid.pop(ex.pid, None)
        if entry is None:
            return
        c, p = entry
        if p.hold_exit(ex):  # Start is under way: its state keeps the exit, published after the start event
            return
        self._spawn(self._handle_exit(c, p, ex))

    async def _handle_exit(self, c: Container, p: Process, ex: Exit) -> None:
        try:
            if isinstance(p, InitProcess):
                if not c.own_pid_namespace:
                    await c.kill_all()
                # every exec's exit goes out before the init's
                pending = [e.exit_reported() for e in c.execs.values() if e.pid and not e.has_exited]
                if pending:
                    await asyncio.wait(pending, timeout=30)
        except Exception:  # whatever went wrong, the exit itself must be reported
            log.exception("%s: handling its exit", p.subject)
        record = p.set_exited(ex.status, ex.timestamp)
        msg = ev.TaskExit(container_id=c.id, id=p.id, pid=ex.pid, exit_status=ex.status)
        _ts(msg.exited_at, record.at)
        record.published = self._publish(msg)

    # -- RPCs ------------------------------------------------------------------------------------------
    @rpc
    async def create(self, ctx, req):
        validate_id("container", req.id)
        if req.id in self.containers or req.id in self._creating:
            raise TTRPCError(Code.ALREADY_EXISTS, f"container {req.id} already exists")
        self._cancel_idle_exit()
        self._creating.add(req.id)
        try:
            with self.reaper.collect() as early:
                c = await Container.create(req, self.namespace, self.reaper)
                init = c.init
                self._track(c, init)
                early_exit = early.pop(init.pid) if init.pid else None
                if early_exit is not None:
                    self._by_pid.pop(init.pid, None)
        finally:
            self._creating.discard(req.id)
        self.containers[req.id] = c
        self._load_cgroup(c)
        msg = ev.TaskCreate(container_id=c.id, bundle=c.bundle, rootfs=list(req.rootfs),
                            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
                            checkpoint=req.checkpoint, pid=init.pid)
        self._publish(msg)
        if early_exit is not None:
            self._spawn(self._handle_exit(c, init, early_exit))
        return api.CreateTaskResponse(pid=init.pid)

    @rpc
    async def start(self, ctx, req):
        c = self._get(req.id)
        if req.exec_id:
            await self._until_resumed(c, req.exec_id)
        async with c.lock:
            p = c.process(req.exec_id)
            with self.reaper.collect() as early:
                # an exit of a pid we already track (the init's, known since Create) is held by the
                # process's Starting state and handed back here; a new pid's exit is in `early`
                early_exit = await c.start(req.exec_id)
                if early_exit is None and p.pid and p.pid not in self._by_pid and not p.has_exited:
                    self._track(c, p)
                    early_exit = early.pop(p.pid)
                    if early_exit is not None:
                        self._by_pid.pop(p.pid, None)
            if isinstance(p, InitProcess):
                self._publish(ev.TaskStart(container_id=c.id, pid=p.pid))
                self._watch_oom(c)
            else:
                self._publish(ev.TaskExecStarted(container_id=c.id, exec_id=p.id, pid=p.pid))
            if early_exit is not None:
                self._spawn(self._handle_exit(c, p, early_exit))
            return api.StartResponse(pid=p.pid)

    async def _until_resumed(self, c: Container, exec_id: str) -> None:
        """An exec's Start in a paused container waits (holding no lock) for a Resume, up to the
        node's broker.exec_wait_s, while a node broker serves (its socket answers): the broker wakes a
        parked container when it sees the exec added. Still paused then, or no broker: refused, as
        runc would refuse the exec."""
        init = c.init
        if init is None or init.state is not State.PAUSED:
            return
        if c.exec_wait_s <= 0 or not _broker_serves(c.broker_socket):
            raise TTRPCError(Code.FAILED_PRECONDITION, f"cannot start exec {exec_id} in container {c.id}: "
                                                       "the container is paused (and no node broker serves "
                                                       "this node to wake it)")
        deadline = time.monotonic() + c.exec_wait_s
        log.info("container %s: exec %s waits up to %.0f s for the paused container's resume", c.id, exec_id,
                 c.exec_wait_s)
        while init.state is State.PAUSED:
            if time.monotonic() > deadline:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"cannot start exec {exec_id} in container {c.id}: the container is still paused "
                                 f"after {c.exec_wait_s:g} s (broker.exec_wait_s): nothing resumed it")
            await asyncio.sleep(0.05)

    @rpc
    async def delete(self, ctx, req):
        c = self._get(req.id)
        p = c.process(req.exec_id)
        if p.has_exited:
            # its last output to containerd first, holding no lock (see the module docstring)
            if not await drain_output(p):
                log.warning("%s: its output is still open %.0f s after it exited (a child left running "
                            "in the background?): closing it; later output is lost", p.subject,
                            time.time() - (p.exited_at or time.time()))
        async with c.lock:
            if req.exec_id:
                p = await c.delete_exec(req.exec_id)
                self._untrack(p)
                return self._delete_response(p)
            init = c.init
            await c.delete()
            if not init.has_exited:
                # a created (never started) container: runc delete --force killed it; its exit is due
                try:
                    await asyncio.wait_for(init.wait(), 2.0)
                except asyncio.TimeoutError:
                    record = init.set_exited(128 + 9)
                    msg = ev.TaskExit(container_id=c.id, id=c.id, pid=init.pid, exit_status=record.status)
                    _ts(msg.exited_at, record.at)
                    record.published = self._publish(msg)
            published = init.exit.published if init.exit is not None else None
            if published is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(published), EXIT_EVENT_BEFORE_DELETE)
                except asyncio.TimeoutError:
                    log.warning("container %s: TaskExit not delivered before Delete returned", c.id)
            self._untrack(init)
            for e in c.execs.values():
                self._untrack(e)
            del self.containers[c.id]
            self._cgroup_warned.discard(c.id)
            msg = ev.TaskDelete(container_id=c.id, pid=init.pid, exit_status=init.exit_status)
            _ts(msg.exited_at, init.exited_at)
            self._publish(msg)
            if not self.containers:
                self._schedule_idle_exit()
            return self._delete_response(init)

    @staticmethod
    def _delete_response(p: Process):
        resp = api.DeleteResponse(pid=p.pid, exit_status=p.exit_status)
        _ts(resp.exited_at, p.exited_at)
        return resp

    @rpc
    async def exec(self, ctx, req):
        c = self._get(req.id)
        async with c.lock:
            p = c.add_exec(req.exec_id, StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
                           req.spec if req.HasField("spec") else None)
        self._publish(ev.TaskExecAdded(container_id=c.id, exec_id=p.id))
        return EMPTY

    @rpc(cancellable=True)
    async def state(self, ctx, req):
        c = self._get(req.id)
        p = c.process(req.exec_id)
        state = p.state
        if isinstance(p, ExecProcess) and c.init.state is State.PAUSED and state is State.RUNNING:
            state = State.PAUSED
        resp = api.StateResponse(id=p.id, bundle=c.bundle, pid=p.pid, status=_STATUS[state],
                                 stdin=p.paths.stdin, stdout=p.paths.stdout, stderr=p.paths.stderr,
                                 terminal=p.paths.terminal, exit_status=p.exit_status, exec_id=req.exec_id)
        _ts(resp.exited_at, p.exited_at)
        return resp

    @rpc
    async def kill(self, ctx, req):
        c = self._get(req.id)
        if req.signal <= 0 or req.signal > 64:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"kill container {c.id}: invalid signal {req.signal}")
        await c.kill(req.exec_id, req.signal, req.all)
        return EMPTY

    @rpc(cancellable=True)
    async def wait(self, ctx, req):
        c = self._get(req.id)
        p = c.process(req.exec_id)
        await p.wait()
        resp = api.WaitResponse(exit_status=p.exit_status)
        _ts(resp.exited_at, p.exited_at)
        return resp

    @rpc
    async def pause(self, ctx, req):
        c = self._get(req.id)
        async with c.lock:
            await c.pause()
        self._publish(ev.TaskPaused(container_id=c.id))
        return EMPTY

    @rpc
    async def resume(self, ctx, req):
        c = self._get(req.id)
        async with c.lock:
            await c.resume()
        self._publish(ev.TaskResumed(container_id=c.id))
        return EMPTY

    @rpc(cancellable=True)
    async def pids(self, ctx, req):
        c = self._get(req.id)
        pids = await c.pids()
        by_pid = {e.pid: e.id for e in c.execs.values() if e.pid}
        out = []
        for pid in pids:
            info = types.ProcessInfo(pid=pid)
            if pid in by_pid:
                info.info.CopyFrom(pack(options_pb2.ProcessDetails(exec_id=by_pid[pid])))
            out.append(info)
        return api.PidsResponse(processes=out)

    @rpc
    async def close_io(self, ctx, req):
        c = self._get(req.id)
        p = c.process(req.exec_id)
        if req.stdin:
            p.close_stdin()
        return EMPTY

    @rpc
    async def resize_pty(self, ctx, req):
        c = self._get(req.id)
        p = c.process(req.exec_id)
        try:
            p.resize(req.width, req.height)
        except OSError as exc:
            raise TTRPCError(Code.UNKNOWN, f"resize console of {p.subject}: {exc}") from exc
        return EMPTY

    @rpc
    async def update(self, ctx, req):
        c = self._get(req.id)
        async with c.lock:
            await c.update(req.resources if req.HasField("resources") else None)
        return EMPTY

    @rpc
    async def checkpoint(self, ctx, req):
        c = self._get(req.id)
        async with c.lock:
            image = await c.checkpoint(req)
        self._publish(ev.TaskCheckpointed(container_id=c.id, checkpoint=image))
        return EMPTY

    @rpc(cancellable=True)
    async def stats(self, ctx, req):
        c = self._get(req.id)
        if c.init.state in (State.STOPPED, State.DELETED):
            raise TTRPCError(Code.NOT_FOUND, f"stats of container {c.id}: the container is not running")
        why = self._load_cgroup(c)
        if why:
            raise TTRPCError(Code.NOT_FOUND, f"stats of container {c.id}: {why}")
        try:
            metrics = c.cgroup.metrics()
        except Exception as exc:
            raise TTRPCError(Code.UNKNOWN, f"stats of container {c.id}: {exc}") from exc
        return api.StatsResponse(stats=metrics)

    @rpc(cancellable=True)
    async def connect(self, ctx, req):
        c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c and c.init else 0)

    @rpc
    async def shutdown(self, ctx, req):
        if self.containers or self._creating:
            return EMPTY  # still serving tasks (a pod's other containers)
        self._cancel_idle_exit()
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return EMPTY

    # -- cgroups, OOM, idle exit -----------------------------------------------------------------------
    def _load_cgroup(self, c: Container) -> str:
        """Find the container's cgroup (Stats, OOM events); '' or why it cannot be read.

        A failure is warned about once per container: without the cgroup there are no OOM events
        and no Stats, which containerd and kubelet would otherwise see only as silence."""
        if c.cgroup is not None:
            return ""
        if not c.init or c.init.pid <= 0:
            return "its init process has no pid yet"
        try:
            from shim.cgroups import Cgroup

            c.cgroup = Cgroup.for_pid(c.init.pid)
            return ""
        except Exception as exc:
            why = f"cgroup of pid {c.init.pid}: {exc}"
        if c.init.has_exited or not os.path.exists(f"/proc/{c.init.pid}"):
            log.debug("container %s: no cgroup: %s (its init has exited)", c.id, why)
        elif c.id not in self._cgroup_warned:
            self._cgroup_warned.add(c.id)
            log.warning("container %s: cannot read its cgroup, so no Stats and no OOM events: %s", c.id, why)
        return why

    def _watch_oom(self, c: Container) -> None:
        if self._load_cgroup(c) or c.oom_watcher is not None:
            return  # no cgroup: warned about by _load_cgroup
        try:
            from shim.cgroups import OomWatcher

            c.oom_watcher = OomWatcher(c.cgroup, lambda cid=c.id: self._publish(ev.TaskOOM(container_id=cid))).start()
        except Exception as exc:
            log.warning("container %s: OOM events unavailable: %s", c.id, exc)

    def _schedule_idle_exit(self) -> None:
        self._cancel_idle_exit()
        self._idle_timer = asyncio.get_running_loop().call_later(IDLE_EXIT_AFTER, self._idle_exit)

    def _cancel_idle_exit(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_exit(self) -> None:
        self._idle_timer = None
        if not self.containers and not self._creating:
            log.info("last task deleted and no Shutdown came: exiting")
            self._on_shutdown()

    async def close(self) -> None:
        for c in list(self.containers.values()):
            c.close_watchers()
        for t in list(self._tasks):
            t.cancel()


def _broker_serves(path: str) -> bool:
    """Whether a node broker listens on its control socket (a unix connect answers at once)."""
    if not path:
        return False
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
