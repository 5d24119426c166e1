"""Processes of a container (the init process and exec'd ones) and THE state table.

Every state change of a process goes through `transition` with one operation; the table below is the
only place that says what a state allows. An operation the state forbids fails with the sentence users
see verbatim: ``cannot pause a stopped container web``.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

if TYPE_CHECKING:  # pragma: no cover
    from shim.task.console import Console
    from shim.task.io import ProcessIO, StdioPaths

log = logging.getLogger("kybernate.shim")


class State(str, enum.Enum):
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
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    DELETE = "delete"
    EXEC = "exec in"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    RESIZE = "resize the console of"
    EXIT = "exit"  # the reaper saw the process exit: never refused


S, O = State, Op

# (state, operation) -> next state, for a container's init process
INIT_TRANSITIONS: dict[tuple[State, Op], State] = {
    (S.CREATED, O.START): S.RUNNING,
    (S.CREATED, O.KILL): S.CREATED,
    (S.CREATED, O.UPDATE): S.CREATED,
    (S.CREATED, O.RESIZE): S.CREATED,
    (S.CREATED, O.DELETE): S.DELETED,
    (S.CREATED, O.EXIT): S.STOPPED,
    (S.CREATED_CHECKPOINT, O.START): S.RUNNING,
    (S.CREATED_CHECKPOINT, O.KILL): S.CREATED_CHECKPOINT,
    (S.CREATED_CHECKPOINT, O.UPDATE): S.CREATED_CHECKPOINT,
    (S.CREATED_CHECKPOINT, O.DELETE): S.DELETED,
    (S.CREATED_CHECKPOINT, O.EXIT): S.STOPPED,
    (S.RUNNING, O.PAUSE): S.PAUSED,
    (S.RUNNING, O.KILL): S.RUNNING,
    (S.RUNNING, O.EXEC): S.RUNNING,
    (S.RUNNING, O.UPDATE): S.RUNNING,
    (S.RUNNING, O.CHECKPOINT): S.RUNNING,
    (S.RUNNING, O.RESIZE): S.RUNNING,
    (S.RUNNING, O.EXIT): S.STOPPED,
    (S.PAUSED, O.RESUME): S.RUNNING,
    (S.PAUSED, O.KILL): S.PAUSED,
    (S.PAUSED, O.UPDATE): S.PAUSED,
    (S.PAUSED, O.CHECKPOINT): S.PAUSED,
    (S.PAUSED, O.RESIZE): S.PAUSED,
    (S.PAUSED, O.EXIT): S.STOPPED,
    (S.STOPPED, O.DELETE): S.DELETED,
    (S.STOPPED, O.EXIT): S.STOPPED,
    (S.DELETED, O.EXIT): S.DELETED,
}

# the same for an exec'd process (it has no pause/resume/update/checkpoint of its own)
EXEC_TRANSITIONS: dict[tuple[State, Op], State] = {
    (S.CREATED, O.START): S.RUNNING,
    (S.CREATED, O.DELETE): S.DELETED,
    (S.CREATED, O.RESIZE): S.CREATED,
    (S.CREATED, O.EXIT): S.STOPPED,
    (S.RUNNING, O.KILL): S.RUNNING,
    (S.RUNNING, O.RESIZE): S.RUNNING,
    (S.RUNNING, O.EXIT): S.STOPPED,
    (S.STOPPED, O.DELETE): S.DELETED,
    (S.STOPPED, O.EXIT): S.STOPPED,
    (S.DELETED, O.EXIT): S.DELETED,
}

# refusals that mean "it is gone" rather than "not now"
_NOT_FOUND = {(S.STOPPED, O.KILL), (S.DELETED, O.KILL)}


def transition(kind: str, state: State, op: Op, subject: str) -> State:
    """The next state for `op` in `state`, or a TTRPCError with the sentence users see.

    kind: "init" or "exec"; subject: "container web" or "process sh-1 in container web".
    """
    table = INIT_TRANSITIONS if kind == "init" else EXEC_TRANSITIONS
    nxt = table.get((state, op))
    if nxt is not None:
        return nxt
    sentence = f"cannot {op.value} a {state.label} {subject}"
    if (state, op) in _NOT_FOUND:
        raise TTRPCError(Code.NOT_FOUND, f"{sentence}: process already finished")
    if state is S.DELETED:
        raise TTRPCError(Code.NOT_FOUND, f"{sentence}: it was deleted")
    if kind == "exec" and (state, op) == (S.CREATED, O.KILL):
        raise TTRPCError(Code.FAILED_PRECONDITION, f"{sentence}: process not started")
    raise TTRPCError(Code.FAILED_PRECONDITION, sentence)


class Process:
    """A process's identity, state, exit and IO. The runtime work is done by `shim.task.container`."""

    kind = "exec"

    def __init__(self, container_id: str, process_id: str, paths: "StdioPaths"):
        self.container_id = container_id
        self.id = process_id
        self.paths = paths
        self.state = State.CREATED
        self.pid = 0
        self.exit_status = 0
        self.exited_at: float | None = None
        self.io: "ProcessIO | None" = None
        self.console: "Console | None" = None
        self._exited: asyncio.Future = asyncio.get_running_loop().create_future()
        # exit seen while Start/Exec was still running: handled after the start event is published
        self.starting = False
        self.pending_exit = None
        self.exit_published: asyncio.Future | None = None  # the TaskExit event's delivery

    @property
    def subject(self) -> str:
        return f"process {self.id} in container {self.container_id}"

    def check(self, op: Op) -> State:
        """Raise unless `op` is allowed now; returns the state it would lead to."""
        return transition(self.kind, self.state, op, self.subject)

    def apply(self, op: Op) -> None:
        """Record that `op` happened (after the runtime did it). An exit meanwhile wins."""
        if self.state in (State.STOPPED, State.DELETED) and op not in (Op.DELETE, Op.EXIT):
            return
        self.state = transition(self.kind, self.state, op, self.subject)

    def set_exited(self, status: int, when: float | None = None) -> None:
        if self._exited.done():
            return
        self.apply(Op.EXIT)
        self.exit_status = status
        self.exited_at = when if when is not None else time.time()
        self._exited.set_result(status)

    @property
    def has_exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

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
        self.check(Op.RESIZE)
        if self.console is not None:
            self.console.resize(width, height)

    async def close_io(self) -> None:
        if self.console is not None:
            await self.console.close()
        if self.io is not None:
            await self.io.close()


class InitProcess(Process):
    kind = "init"

    @property
    def subject(self) -> str:
        return f"container {self.container_id}"


class ExecProcess(Process):
    kind = "exec"

    def __init__(self, container_id: str, process_id: str, paths: "StdioPaths", spec: dict):
        super().__init__(container_id, process_id, paths)
        self.spec = spec
