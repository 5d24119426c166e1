"""Processes of a container (the init process and exec'd ones) and the states they go through.

A process is always in exactly one state object (`Process.current`). Each state class owns the
operations it allows: it asks its container for the runtime work (`ContainerOps`, handed in by the
caller) and moves the process on. Every operation it does not allow is refused by the base class with
the sentence users see verbatim: ``cannot pause a stopped container web``.

    init:  Created ──start──▶ Starting ──▶ Running ──pause──▶ Paused ──resume──▶ Running
           CreatedFromCheckpoint ──start──▶ Restoring (a Starting) ──▶ Running
           any live state ──exit──▶ Stopped ──delete──▶ Deleted;  Created* ──delete──▶ Deleted
    exec:  ExecCreated ──start──▶ Starting ──▶ ExecRunning ──exit──▶ ExecStopped ──delete──▶ Deleted

The facts that belong to a state live in it: the image a restore reads (CreatedFromCheckpoint), the
exit the reaper reported while Start was still running (Starting: the service publishes it after the
start event), the restore in flight that a Kill ends (Restoring), the exit status and its event's
delivery (`ExitRecord`, held by Stopped and Deleted).

A state moves its process only while it is the current one: an exit that lands while an operation
awaits the runtime wins, and the operation's own move is dropped. Delete is the one move made whatever
came meanwhile (the process is gone from the runtime either way).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

if TYPE_CHECKING:  # pragma: no cover
    from shim.runtime.reaper import Exit
    from shim.task.console import Console
    from shim.task.io import ProcessIO, StdioPaths

log = logging.getLogger("kybernate.shim")


class State(str, enum.Enum):
    """The name of a state, as the Task service reports it."""

    CREATED = "created"
    CREATED_CHECKPOINT = "created-from-checkpoint"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"

    @property
    def label(self) -> str:
        """How users see it (containerd has no separate status for a checkpoint-created task)."""
        return "created" if self is State.CREATED_CHECKPOINT else self.value


class Op(str, enum.Enum):
    """An operation a state may refuse; the value is the verb of the refusal's sentence."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    DELETE = "delete"
    EXEC = "exec in"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    RESIZE = "resize the console of"


@dataclass
class ExitRecord:
    """A process's exit: its status, when, and the delivery of its TaskExit event (Delete waits for it)."""

    status: int
    at: float
    published: "asyncio.Future | None" = None


class ContainerOps(Protocol):
    """What a state asks of its container: the runtime work alone. The state has already decided that
    the operation is allowed, and records the outcome itself (`shim.task.container.Container` is one)."""

    async def start_init(self, init: "InitProcess") -> None: ...
    async def restore_init(self, init: "InitProcess", image_dir: str) -> None: ...
    async def kill_init(self, sig: int, all_processes: bool) -> None: ...
    async def delete_init(self, init: "InitProcess", stopped: bool) -> None: ...
    async def pause_init(self) -> None: ...
    async def resume_init(self) -> None: ...
    async def update_init(self, resources_any) -> None: ...
    async def checkpoint_init(self, request, was_paused: bool) -> str: ...
    async def list_pids(self) -> list[int]: ...
    def abort_restore(self) -> bool: ...
    def register_exec(self, exec_id: str, paths: "StdioPaths", spec_any) -> "ExecProcess": ...
    async def start_exec(self, p: "ExecProcess") -> None: ...
    def signal_exec(self, p: "ExecProcess", sig: int) -> None: ...
    async def release_exec(self, p: "ExecProcess") -> None: ...


# -- the states ----------------------------------------------------------------------------------------
class ProcessState:
    """One state of one process. Every operation is refused here; a state class overrides those it allows."""

    name: State
    exit: ExitRecord | None = None  # set in Stopped and (when the process had exited) Deleted

    def __init__(self, process: "Process"):
        self.process = process

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.process.subject}>"

    @property
    def label(self) -> str:
        return self.name.label

    # -- moving on ----------------------------------------------------------------------------------
    def become(self, nxt: "ProcessState") -> bool:
        """Make `nxt` the process's state, unless something else (an exit, a delete) moved it first."""
        if self.process.current is not self:
            log.debug("%s: %s no longer current, %s dropped", self.process.subject, type(self).__name__,
                      type(nxt).__name__)
            return False
        self.process.current = nxt
        return True

    def after_exit(self, record: ExitRecord) -> "ProcessState":
        """The state an exit leads to from here (live states only; the finished ones keep theirs)."""
        raise NotImplementedError

    def exited(self, record: ExitRecord) -> None:
        """The process exited (the reaper saw it, or a failed start/restore gave up on it): never refused."""
        self.become(self.after_exit(record))

    def deleted(self) -> None:
        """Delete finished: whatever state the process reached meanwhile, it is now deleted (keeping its exit)."""
        p = self.process
        p.current = Deleted(p, p.current.exit)

    def hold_exit(self, ex: "Exit") -> bool:
        """Whether this state keeps an exit the reaper reported, to be handled later (only Starting does)."""
        return False

    # -- refusals -------------------------------------------------------------------------------------
    def refusal(self, op: Op, why: str = "", code: Code = Code.FAILED_PRECONDITION) -> TTRPCError:
        sentence = f"cannot {op.value} a {self.label} {self.process.subject}"
        return TTRPCError(code, f"{sentence}: {why}" if why else sentence)

    # -- the operations (refused unless the state allows them) ------------------------------------------
    async def start(self, ops: ContainerOps) -> "Exit | None":
        """Start the process; returns an exit the reaper reported while it started (publish it after
        the start event), or None."""
        raise self.refusal(Op.START)

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        raise self.refusal(Op.KILL)

    async def delete(self, ops: ContainerOps) -> None:
        raise self.refusal(Op.DELETE)

    async def pause(self, ops: ContainerOps) -> None:
        raise self.refusal(Op.PAUSE)

    async def resume(self, ops: ContainerOps) -> None:
        raise self.refusal(Op.RESUME)

    async def update(self, ops: ContainerOps, resources_any) -> None:
        raise self.refusal(Op.UPDATE)

    async def checkpoint(self, ops: ContainerOps, request) -> str:
        """Returns the checkpoint's image dir."""
        raise self.refusal(Op.CHECKPOINT)

    def exec(self, ops: ContainerOps, exec_id: str, paths: "StdioPaths", spec_any) -> "ExecProcess":
        raise self.refusal(Op.EXEC)

    def resize(self, width: int, height: int) -> None:
        raise self.refusal(Op.RESIZE)

    async def pids(self, ops: ContainerOps) -> list[int]:
        """The container's processes (asked of the init process; a finished one has none)."""
        return await ops.list_pids()

    # -- shared behaviour the allowing states call ---------------------------------------------------------
    async def _start_through(self, work: Callable[[], Awaitable[None]], running: "ProcessState",
                             starting_class: "type[Starting] | None" = None) -> "Exit | None":
        """Start via a Starting state: `work` runs the runtime; on success the process is `running`,
        on failure it is back here (unless `work` recorded an exit). Returns the exit held meanwhile."""
        starting = (starting_class or Starting)(self.process, self)
        self.become(starting)
        try:
            await work()
        except BaseException:
            if starting.held_exit is not None:  # as before the states: Delete reports the exit
                log.info("%s: exited (status %d) while its start failed", self.process.subject,
                         starting.held_exit.status)
            starting.become(self)
            raise
        starting.become(running)
        return starting.held_exit

    def _resize_console(self, width: int, height: int) -> None:
        if self.process.console is not None:
            self.process.console.resize(width, height)


class Starting(ProcessState):
    """Start (or the restore behind it) is under way: the runtime has not answered yet. An exit the
    reaper reports now is held here: the service publishes it after the start event, never before.
    To users it is still the state it started from (``created``)."""

    def __init__(self, process: "Process", before: ProcessState):
        super().__init__(process)
        self.before = before
        self.held_exit: "Exit | None" = None

    @property
    def name(self) -> State:  # type: ignore[override]
        return self.before.name

    def hold_exit(self, ex: "Exit") -> bool:
        self.held_exit = ex
        return True

    def after_exit(self, record: ExitRecord) -> ProcessState:
        return self.before.after_exit(record)

    def refusal(self, op: Op, why: str = "", code: Code = Code.FAILED_PRECONDITION) -> TTRPCError:
        return super().refusal(op, why or "it is being started", code)

    # what needs no lock is what the state it started from allows (Start holds the container's lock)
    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        await self.before.kill(ops, sig, all_processes)

    def resize(self, width: int, height: int) -> None:
        self.before.resize(width, height)

    async def pids(self, ops: ContainerOps) -> list[int]:
        return await self.before.pids(ops)


class Restoring(Starting):
    """The Start of a container created from a checkpoint: the restore is under way. Kill ends a
    ``runc restore`` stuck in CRIU at once (its Start then fails and undoes the restore); in the
    restore's other steps it is the created container's kill."""

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        if not ops.abort_restore():
            await self.before.kill(ops, sig, all_processes)


class Deleted(ProcessState):
    """Deleted from the runtime; every operation is refused as NOT_FOUND. Keeps the exit, if there was one
    (a created container deleted before it ran gets its exit afterwards)."""

    name = State.DELETED

    def __init__(self, process: "Process", exit: ExitRecord | None = None):
        super().__init__(process)
        self.exit = exit

    def refusal(self, op: Op, why: str = "", code: Code = Code.FAILED_PRECONDITION) -> TTRPCError:
        return super().refusal(op, why or "it was deleted", Code.NOT_FOUND)

    def exited(self, record: ExitRecord) -> None:
        if self.exit is None:
            self.exit = record

    async def pids(self, ops: ContainerOps) -> list[int]:
        return []

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        raise self.refusal(Op.KILL, "process already finished")


class _Finished(ProcessState):
    """The process exited: a second exit report changes nothing, there is nothing to list or kill."""

    def __init__(self, process: "Process", exit: ExitRecord):
        super().__init__(process)
        self.exit = exit

    def exited(self, record: ExitRecord) -> None:
        pass

    async def pids(self, ops: ContainerOps) -> list[int]:
        return []

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        raise self.refusal(Op.KILL, "process already finished", Code.NOT_FOUND)


# -- a container's init process ---------------------------------------------------------------------------
class _InitLive(ProcessState):
    """An init process that has not exited: an exit stops it; kill goes to the runtime (``runc kill``)."""

    def after_exit(self, record: ExitRecord) -> ProcessState:
        return Stopped(self.process, record)

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        await ops.kill_init(sig, all_processes)

    async def update(self, ops: ContainerOps, resources_any) -> None:
        await ops.update_init(resources_any)


class Created(_InitLive):
    """Created by the runtime, not started: Start runs it; Delete removes it (``runc delete --force``)."""

    name = State.CREATED

    async def start(self, ops: ContainerOps) -> "Exit | None":
        p = self.process
        return await self._start_through(lambda: ops.start_init(p), Running(p))

    async def delete(self, ops: ContainerOps) -> None:
        await ops.delete_init(self.process, stopped=False)
        self.deleted()

    def resize(self, width: int, height: int) -> None:
        self._resize_console(width, height)


class CreatedFromCheckpoint(_InitLive):
    """Created from a checkpoint: nothing exists in the runtime yet; Start restores `image_dir`."""

    name = State.CREATED_CHECKPOINT

    def __init__(self, process: "Process", image_dir: str):
        super().__init__(process)
        self.image_dir = image_dir

    async def start(self, ops: ContainerOps) -> "Exit | None":
        p = self.process
        return await self._start_through(lambda: ops.restore_init(p, self.image_dir), Running(p), Restoring)

    async def delete(self, ops: ContainerOps) -> None:
        await ops.delete_init(self.process, stopped=False)
        self.deleted()


class Running(_InitLive):
    name = State.RUNNING

    async def pause(self, ops: ContainerOps) -> None:
        await ops.pause_init()
        self.become(Paused(self.process))

    async def checkpoint(self, ops: ContainerOps, request) -> str:
        return await ops.checkpoint_init(request, was_paused=False)

    def exec(self, ops: ContainerOps, exec_id: str, paths: "StdioPaths", spec_any) -> "ExecProcess":
        return ops.register_exec(exec_id, paths, spec_any)

    def resize(self, width: int, height: int) -> None:
        self._resize_console(width, height)


class Paused(_InitLive):
    """Frozen (with the GPU layer: CUDA suspended first). A checkpoint of it must not freeze again."""

    name = State.PAUSED

    async def resume(self, ops: ContainerOps) -> None:
        await ops.resume_init()  # a failed resume leaves it frozen: still Paused
        self.become(Running(self.process))

    async def checkpoint(self, ops: ContainerOps, request) -> str:
        return await ops.checkpoint_init(request, was_paused=True)

    def exec(self, ops: ContainerOps, exec_id: str, paths: "StdioPaths", spec_any) -> "ExecProcess":
        """Registered, not run (as containerd's runc shim does): its Start waits for a resume up to
        the node's broker.exec_wait_s, so that the node broker, seeing /tasks/exec-added, wakes it."""
        return ops.register_exec(exec_id, paths, spec_any)

    def resize(self, width: int, height: int) -> None:
        self._resize_console(width, height)


class Stopped(_Finished):
    """The init process exited; Delete removes what is left in the runtime (its failures only logged)."""

    name = State.STOPPED

    async def delete(self, ops: ContainerOps) -> None:
        await ops.delete_init(self.process, stopped=True)
        self.deleted()


# -- an exec'd process (no pause, resume, update, checkpoint or exec of its own) ---------------------------
class _ExecLive(ProcessState):
    def after_exit(self, record: ExitRecord) -> ProcessState:
        return ExecStopped(self.process, record)


class ExecCreated(_ExecLive):
    """Added by Exec, not started: there is no process to signal yet."""

    name = State.CREATED

    async def start(self, ops: ContainerOps) -> "Exit | None":
        p = self.process
        assert isinstance(p, ExecProcess)
        return await self._start_through(lambda: ops.start_exec(p), ExecRunning(p))

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        raise self.refusal(Op.KILL, "process not started")

    async def delete(self, ops: ContainerOps) -> None:
        p = self.process
        assert isinstance(p, ExecProcess)
        await ops.release_exec(p)
        self.deleted()

    def resize(self, width: int, height: int) -> None:
        self._resize_console(width, height)


class ExecRunning(_ExecLive):
    name = State.RUNNING

    async def kill(self, ops: ContainerOps, sig: int, all_processes: bool) -> None:
        p = self.process
        assert isinstance(p, ExecProcess)
        ops.signal_exec(p, sig)

    def resize(self, width: int, height: int) -> None:
        self._resize_console(width, height)


class ExecStopped(_Finished):
    name = State.STOPPED

    async def delete(self, ops: ContainerOps) -> None:
        p = self.process
        assert isinstance(p, ExecProcess)
        await ops.release_exec(p)
        self.deleted()


# -- the processes -------------------------------------------------------------------------------------------
class Process:
    """A process's identity, IO and current state. What an operation does is the state's business."""

    def __init__(self, container_id: str, process_id: str, paths: "StdioPaths",
                 initial: Callable[["Process"], ProcessState]):
        self.container_id = container_id
        self.id = process_id
        self.paths = paths
        self.pid = 0
        self.io: "ProcessIO | None" = None
        self.console: "Console | None" = None
        self.current: ProcessState = initial(self)
        self._exit_reported: asyncio.Future = asyncio.get_running_loop().create_future()  # for Wait

    @property
    def subject(self) -> str:
        return f"process {self.id} in container {self.container_id}"

    @property
    def state(self) -> State:
        return self.current.name

    # -- the exit --------------------------------------------------------------------------------------
    @property
    def exit(self) -> ExitRecord | None:
        return self.current.exit

    @property
    def has_exited(self) -> bool:
        return self.current.exit is not None

    @property
    def exit_status(self) -> int:
        return self.exit.status if self.exit is not None else 0

    @property
    def exited_at(self) -> float | None:
        return self.exit.at if self.exit is not None else None

    def set_exited(self, status: int, when: float | None = None) -> ExitRecord:
        """Record the exit (the first report wins); returns the exit record the process holds."""
        self.current.exited(ExitRecord(status, when if when is not None else time.time()))
        record = self.exit
        assert record is not None
        if not self._exit_reported.done():
            self._exit_reported.set_result(record.status)
        return record

    def hold_exit(self, ex: "Exit") -> bool:
        """Whether the current state keeps this exit for later (Starting: after the start event)."""
        return self.current.hold_exit(ex)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit_reported)

    def exit_reported(self) -> asyncio.Future:
        """A future done once the exit is recorded (cancelling it leaves the process's own untouched)."""
        return asyncio.shield(self._exit_reported)

    # -- IO --------------------------------------------------------------------------------------------
    async def wait_drained(self, timeout: float) -> bool:
        if self.console is not None:
            return await self.console.wait_drained(timeout)
        if self.io is not None:
            return await self.io.wait_drained(timeout)
        return True

    def close_stdin(self) -> None:
        if self.console is not None:
            self.console.close_stdin()
        if self.io is not None:
            self.io.close_stdin()

    def resize(self, width: int, height: int) -> None:
        self.current.resize(width, height)

    async def close_io(self) -> None:
        if self.console is not None:
            await self.console.close()
        if self.io is not None:
            await self.io.close()


class InitProcess(Process):
    """A container's init process: created, or (with `restore_from`) to be restored from a checkpoint image."""

    def __init__(self, container_id: str, process_id: str, paths: "StdioPaths", restore_from: str = ""):
        super().__init__(container_id, process_id, paths,
                         lambda p: CreatedFromCheckpoint(p, restore_from) if restore_from else Created(p))

    @property
    def subject(self) -> str:
        return f"container {self.container_id}"


class ExecProcess(Process):
    def __init__(self, container_id: str, process_id: str, paths: "StdioPaths", spec: dict):
        super().__init__(container_id, process_id, paths, ExecCreated)
        self.spec = spec
