"""The process states: for every (state, operation) pair, what it leads to and which runtime work it
asks for, or the sentence and code of its refusal; and the races (an exit while an operation awaits
the runtime, an exit while Start runs) that the states settle.

The states talk to their container through `ContainerOps`; here a recording stand-in plays it.
"""
from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from google.protobuf import any_pb2
from shim.task.io import StdioPaths
from shim.task.process import (Created, CreatedFromCheckpoint, Deleted, ExecCreated, ExecProcess, ExecRunning,
                               ExecStopped, ExitRecord, InitProcess, Op, Paused, Restoring, Running, Starting,
                               State, Stopped)
from shim.runtime.reaper import Exit
from ttrpc import Code, TTRPCError

S, O = State, Op
IMAGE = "/var/lib/ckpt/web-1"
EARLIER_EXIT = ExitRecord(3, 1.0)


class FakeOps:
    """ContainerOps that records each call; `hooks[name]` runs inside a call (to fail, or to let an
    exit land while the operation awaits the runtime)."""

    def __init__(self, restore_in_flight: bool = False):
        self.calls: list[tuple] = []
        self.hooks: dict[str, object] = {}
        self.restore_in_flight = restore_in_flight

    def _did(self, name, *args):
        self.calls.append((name, *args))
        hook = self.hooks.get(name)
        if hook is not None:
            hook()

    async def start_init(self, init):
        self._did("start_init")

    async def restore_init(self, init, image_dir):
        self._did("restore_init", image_dir)

    async def kill_init(self, sig, all_processes):
        self._did("kill_init", sig, all_processes)

    async def delete_init(self, init, stopped):
        self._did("delete_init", stopped)

    async def pause_init(self):
        self._did("pause_init")

    async def resume_init(self):
        self._did("resume_init")

    async def update_init(self, resources_any):
        self._did("update_init")

    async def checkpoint_init(self, request, was_paused):
        self._did("checkpoint_init", was_paused)
        return IMAGE

    async def list_pids(self):
        self._did("list_pids")
        return [42]

    def abort_restore(self):
        self._did("abort_restore")
        return self.restore_in_flight

    def register_exec(self, exec_id, paths, spec_any):
        self._did("register_exec", exec_id)
        return ExecProcess("web", exec_id, paths, json.loads(spec_any.value))

    async def start_exec(self, p):
        self._did("start_exec")
        p.pid = 4242

    def signal_exec(self, p, sig):
        self._did("signal_exec", sig)

    async def release_exec(self, p):
        self._did("release_exec")


class FakeConsole:
    def __init__(self):
        self.sizes = []

    def resize(self, width, height):
        self.sizes.append((width, height))


def do(p, op: Op, ops: FakeOps):
    """Ask the process's current state for `op` (a coroutine for the async ones)."""
    s = p.current
    if op is O.START:
        return s.start(ops)
    if op is O.KILL:
        return s.kill(ops, 15, False)
    if op is O.DELETE:
        return s.delete(ops)
    if op is O.PAUSE:
        return s.pause(ops)
    if op is O.RESUME:
        return s.resume(ops)
    if op is O.UPDATE:
        return s.update(ops, any_pb2.Any(type_url="t", value=b"{}"))
    if op is O.CHECKPOINT:
        return s.checkpoint(ops, object())
    if op is O.EXEC:
        return s.exec(ops, "sh1", StdioPaths(), any_pb2.Any(type_url="t", value=json.dumps({"args": ["sh"]}).encode()))
    if op is O.RESIZE:
        return s.resize(80, 24)
    raise AssertionError(op)


async def run_op(p, op, ops):
    out = do(p, op, ops)
    if asyncio.iscoroutine(out):
        out = await out
    return out


# -- the init process -------------------------------------------------------------------------------
INIT_STATES = {
    S.CREATED: Created,
    S.CREATED_CHECKPOINT: lambda p: CreatedFromCheckpoint(p, IMAGE),
    S.RUNNING: Running,
    S.PAUSED: Paused,
    S.STOPPED: lambda p: Stopped(p, EARLIER_EXIT),
    S.DELETED: lambda p: Deleted(p, EARLIER_EXIT),
}

# (state, operation) -> (next state, the runtime work asked for); every pair not here is refused
INIT_ALLOWED = {
    (S.CREATED, O.START): (S.RUNNING, [("start_init",)]),
    (S.CREATED, O.KILL): (S.CREATED, [("kill_init", 15, False)]),
    (S.CREATED, O.UPDATE): (S.CREATED, [("update_init",)]),
    (S.CREATED, O.RESIZE): (S.CREATED, []),
    (S.CREATED, O.DELETE): (S.DELETED, [("delete_init", False)]),
    (S.CREATED_CHECKPOINT, O.START): (S.RUNNING, [("restore_init", IMAGE)]),
    (S.CREATED_CHECKPOINT, O.KILL): (S.CREATED_CHECKPOINT, [("kill_init", 15, False)]),
    (S.CREATED_CHECKPOINT, O.UPDATE): (S.CREATED_CHECKPOINT, [("update_init",)]),
    (S.CREATED_CHECKPOINT, O.DELETE): (S.DELETED, [("delete_init", False)]),
    (S.RUNNING, O.PAUSE): (S.PAUSED, [("pause_init",)]),
    (S.RUNNING, O.KILL): (S.RUNNING, [("kill_init", 15, False)]),
    (S.RUNNING, O.EXEC): (S.RUNNING, [("register_exec", "sh1")]),
    (S.RUNNING, O.UPDATE): (S.RUNNING, [("update_init",)]),
    (S.RUNNING, O.CHECKPOINT): (S.RUNNING, [("checkpoint_init", False)]),
    (S.RUNNING, O.RESIZE): (S.RUNNING, []),
    (S.PAUSED, O.RESUME): (S.RUNNING, [("resume_init",)]),
    (S.PAUSED, O.KILL): (S.PAUSED, [("kill_init", 15, False)]),
    (S.PAUSED, O.UPDATE): (S.PAUSED, [("update_init",)]),
    (S.PAUSED, O.CHECKPOINT): (S.PAUSED, [("checkpoint_init", True)]),
    (S.PAUSED, O.RESIZE): (S.PAUSED, []),
    (S.PAUSED, O.EXEC): (S.PAUSED, [("register_exec", "sh1")]),   # started once resumed (the broker wakes it)
    (S.STOPPED, O.DELETE): (S.DELETED, [("delete_init", True)]),
}

# refusals whose code or ending is not the plain FAILED_PRECONDITION sentence
INIT_SPECIAL_REFUSALS = {
    (S.STOPPED, O.KILL): (Code.NOT_FOUND, "process already finished"),
    (S.DELETED, O.KILL): (Code.NOT_FOUND, "process already finished"),
    **{(S.DELETED, op): (Code.NOT_FOUND, "it was deleted") for op in O if op is not O.KILL},
}


def init_in(state: State) -> InitProcess:
    p = InitProcess("web", "web", StdioPaths())
    p.current = INIT_STATES[state](p)
    p.console = FakeConsole()
    p.pid = 100
    return p


@pytest.mark.parametrize("state,op", list(itertools.product(INIT_STATES, O)), ids=lambda v: v.name)
def test_every_init_state_and_operation(state, op):
    async def scenario():
        p = init_in(state)
        ops = FakeOps()
        before = p.current
        if (state, op) in INIT_ALLOWED:
            nxt, calls = INIT_ALLOWED[(state, op)]
            out = await run_op(p, op, ops)
            assert p.state is nxt and ops.calls == calls
            if nxt is state:
                assert p.current is before  # an operation that keeps the state keeps the object
            if op is O.CHECKPOINT:
                assert out == IMAGE
            if op is O.EXEC:
                assert isinstance(out, ExecProcess) and out.state is S.CREATED
            if op is O.RESIZE:
                assert p.console.sizes == [(80, 24)]
            if nxt is S.DELETED and state is S.STOPPED:
                assert p.exit is EARLIER_EXIT  # Deleted keeps the exit
            return
        code, why = INIT_SPECIAL_REFUSALS.get((state, op), (Code.FAILED_PRECONDITION, ""))
        sentence = f"cannot {op.value} a {state.label} container web"
        with pytest.raises(TTRPCError) as info:
            await run_op(p, op, ops)
        assert info.value.code == code
        assert info.value.message == (f"{sentence}: {why}" if why else sentence)
        assert p.current is before and ops.calls == [] and p.console.sizes == []

    asyncio.run(scenario())


@pytest.mark.parametrize("state,op,code,message", [
    (S.STOPPED, O.PAUSE, Code.FAILED_PRECONDITION, "cannot pause a stopped container web"),
    (S.CREATED, O.PAUSE, Code.FAILED_PRECONDITION, "cannot pause a created container web"),
    (S.CREATED, O.CHECKPOINT, Code.FAILED_PRECONDITION, "cannot checkpoint a created container web"),
    (S.CREATED_CHECKPOINT, O.EXEC, Code.FAILED_PRECONDITION, "cannot exec in a created container web"),
    (S.STOPPED, O.START, Code.FAILED_PRECONDITION, "cannot start a stopped container web"),
    (S.STOPPED, O.EXEC, Code.FAILED_PRECONDITION, "cannot exec in a stopped container web"),
    (S.RUNNING, O.DELETE, Code.FAILED_PRECONDITION, "cannot delete a running container web"),
    (S.STOPPED, O.KILL, Code.NOT_FOUND, "cannot kill a stopped container web: process already finished"),
])
def test_the_sentences_users_and_integration_tests_rely_on(state, op, code, message):
    """Spelled out (not derived): these are the words `ctr`, CRI and tests/integration see."""
    async def scenario():
        with pytest.raises(TTRPCError) as info:
            await run_op(init_in(state), op, FakeOps())
        assert info.value.code == code and info.value.message == message

    asyncio.run(scenario())


@pytest.mark.parametrize("state", list(INIT_STATES), ids=lambda v: v.name)
def test_pids_of_a_live_container_come_from_the_runtime_and_a_finished_one_has_none(state):
    async def scenario():
        ops = FakeOps()
        pids = await init_in(state).current.pids(ops)
        if state in (S.STOPPED, S.DELETED):
            assert pids == [] and ops.calls == []
        else:
            assert pids == [42] and ops.calls == [("list_pids",)]

    asyncio.run(scenario())


# -- exec'd processes -------------------------------------------------------------------------------------
EXEC_STATES = {
    S.CREATED: ExecCreated,
    S.RUNNING: ExecRunning,
    S.STOPPED: lambda p: ExecStopped(p, EARLIER_EXIT),
    S.DELETED: lambda p: Deleted(p, EARLIER_EXIT),
}
EXEC_ALLOWED = {
    (S.CREATED, O.START): (S.RUNNING, [("start_exec",)]),
    (S.CREATED, O.DELETE): (S.DELETED, [("release_exec",)]),
    (S.CREATED, O.RESIZE): (S.CREATED, []),
    (S.RUNNING, O.KILL): (S.RUNNING, [("signal_exec", 15)]),
    (S.RUNNING, O.RESIZE): (S.RUNNING, []),
    (S.STOPPED, O.DELETE): (S.DELETED, [("release_exec",)]),
}
EXEC_SPECIAL_REFUSALS = {
    (S.CREATED, O.KILL): (Code.FAILED_PRECONDITION, "process not started"),
    (S.STOPPED, O.KILL): (Code.NOT_FOUND, "process already finished"),
    (S.DELETED, O.KILL): (Code.NOT_FOUND, "process already finished"),
    **{(S.DELETED, op): (Code.NOT_FOUND, "it was deleted") for op in O if op is not O.KILL},
}


def exec_in(state: State) -> ExecProcess:
    p = ExecProcess("web", "sh1", StdioPaths(), {"args": ["sh"]})
    p.current = EXEC_STATES[state](p)
    p.console = FakeConsole()
    return p


@pytest.mark.parametrize("state,op", list(itertools.product(EXEC_STATES, O)), ids=lambda v: v.name)
def test_every_exec_state_and_operation(state, op):
    async def scenario():
        p = exec_in(state)
        ops = FakeOps()
        before = p.current
        if (state, op) in EXEC_ALLOWED:
            nxt, calls = EXEC_ALLOWED[(state, op)]
            await run_op(p, op, ops)
            assert p.state is nxt and ops.calls == calls
            if op is O.START:
                assert p.pid == 4242
            if op is O.RESIZE:
                assert p.console.sizes == [(80, 24)]
            return
        code, why = EXEC_SPECIAL_REFUSALS.get((state, op), (Code.FAILED_PRECONDITION, ""))
        sentence = f"cannot {op.value} a {state.label} process sh1 in container web"
        with pytest.raises(TTRPCError) as info:
            await run_op(p, op, ops)
        assert info.value.code == code
        assert info.value.message == (f"{sentence}: {why}" if why else sentence)
        assert p.current is before and ops.calls == []

    asyncio.run(scenario())


# -- exits ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,stopped", [
    *((lambda s=s: init_in(s), Stopped) for s in (S.CREATED, S.CREATED_CHECKPOINT, S.RUNNING, S.PAUSED)),
    *((lambda s=s: exec_in(s), ExecStopped) for s in (S.CREATED, S.RUNNING)),
])
def test_an_exit_stops_every_live_state_and_is_never_refused(make, stopped):
    async def scenario():
        p = make()
        assert not p.has_exited and p.exit_status == 0 and p.exited_at is None
        record = p.set_exited(7, 2.0)
        assert isinstance(p.current, stopped) and p.state is S.STOPPED
        assert p.has_exited and (p.exit_status, p.exited_at) == (7, 2.0) and p.exit is record
        assert await p.wait() == 7

    asyncio.run(scenario())


def test_the_first_exit_wins_in_stopped_and_deleted():
    async def scenario():
        for p in (init_in(S.STOPPED), init_in(S.DELETED), exec_in(S.STOPPED)):
            before = p.current
            assert p.set_exited(9) is EARLIER_EXIT
            assert p.current is before and p.exit_status == 3

    asyncio.run(scenario())


def test_a_container_deleted_before_it_ran_takes_its_exit_afterwards():
    """Delete of a created container (``runc delete --force``) comes before the reaper saw the kill."""
    async def scenario():
        p = init_in(S.CREATED)
        await p.current.delete(FakeOps())
        assert p.state is S.DELETED and not p.has_exited
        p.set_exited(137, 5.0)
        assert p.state is S.DELETED and p.exit_status == 137 and await p.wait() == 137

    asyncio.run(scenario())


# -- races: an exit while an operation awaits the runtime -------------------------------------------------
@pytest.mark.parametrize("state,op,hook", [
    (S.CREATED, O.START, "start_init"),
    (S.CREATED_CHECKPOINT, O.START, "restore_init"),
    (S.RUNNING, O.PAUSE, "pause_init"),
    (S.PAUSED, O.RESUME, "resume_init"),
])
def test_an_exit_while_the_runtime_works_wins_over_the_operations_move(state, op, hook):
    async def scenario():
        p = init_in(state)
        ops = FakeOps()
        ops.hooks[hook] = lambda: p.set_exited(3, 1.0)
        await run_op(p, op, ops)
        assert p.state is S.STOPPED and p.exit_status == 3
        assert await p.wait() == 3

    asyncio.run(scenario())


def test_delete_finishes_whatever_exit_landed_meanwhile():
    async def scenario():
        p = init_in(S.CREATED)
        ops = FakeOps()
        ops.hooks["delete_init"] = lambda: p.set_exited(137, 1.0)
        await p.current.delete(ops)
        assert p.state is S.DELETED and p.exit_status == 137

    asyncio.run(scenario())


# -- Start: the Starting state ---------------------------------------------------------------------------
def test_starting_holds_an_exit_and_start_hands_it_back():
    """The reaper's exit of an init that exits at once is held while Start runs: the service publishes
    TaskStart first, then the exit (containerd relies on that order)."""
    async def scenario():
        p = init_in(S.CREATED)
        ops = FakeOps()
        seen = {}

        def meanwhile():
            seen["state"] = p.current
            assert p.hold_exit(Exit(100, 0, 1.0))

        ops.hooks["start_init"] = meanwhile
        held = await p.current.start(ops)
        assert isinstance(seen["state"], Starting) and seen["state"].name is S.CREATED
        assert held == Exit(100, 0, 1.0)
        assert p.state is S.RUNNING and not p.has_exited  # the service records it after TaskStart
        assert not p.hold_exit(Exit(100, 0, 1.0))  # Running handles exits at once

    asyncio.run(scenario())


def test_start_without_an_exit_returns_none():
    async def scenario():
        assert await init_in(S.CREATED).current.start(FakeOps()) is None

    asyncio.run(scenario())


def test_a_failed_start_goes_back_to_the_state_it_started_from():
    async def scenario():
        p = init_in(S.CREATED)
        before = p.current
        ops = FakeOps()

        def fail():
            raise TTRPCError(Code.UNKNOWN, "start container web: OCI runtime start failed")

        ops.hooks["start_init"] = fail
        with pytest.raises(TTRPCError):
            await p.current.start(ops)
        assert p.current is before and p.state is S.CREATED

    asyncio.run(scenario())


def test_a_failed_exec_start_that_records_an_exit_stays_stopped():
    """Container.start_exec marks an exec whose runtime exec failed as exited (255): no way back."""
    async def scenario():
        p = exec_in(S.CREATED)
        ops = FakeOps()

        def fail():
            p.set_exited(255)
            raise TTRPCError(Code.UNKNOWN, "start process sh1 in container web: OCI runtime exec failed")

        ops.hooks["start_exec"] = fail
        with pytest.raises(TTRPCError):
            await p.current.start(ops)
        assert isinstance(p.current, ExecStopped) and p.exit_status == 255

    asyncio.run(scenario())


def test_while_starting_kill_and_resize_are_the_previous_states_and_the_rest_is_refused():
    async def scenario():
        p = init_in(S.CREATED)
        starting = Starting(p, p.current)
        p.current = starting
        ops = FakeOps()
        await p.current.kill(ops, 9, True)
        p.resize(100, 40)
        assert await p.current.pids(ops) == [42]
        assert ops.calls == [("kill_init", 9, True), ("list_pids",)] and p.console.sizes == [(100, 40)]
        with pytest.raises(TTRPCError) as info:
            await p.current.delete(ops)
        assert info.value.code == Code.FAILED_PRECONDITION
        assert info.value.message == "cannot delete a created container web: it is being started"
        assert p.current is starting

        e = exec_in(S.CREATED)
        e.current = Starting(e, e.current)
        with pytest.raises(TTRPCError) as info:
            await e.current.kill(ops, 9, False)
        assert info.value.message == "cannot kill a created process sh1 in container web: process not started"

    asyncio.run(scenario())


def test_a_failed_resume_stays_paused():
    async def scenario():
        p = init_in(S.PAUSED)
        ops = FakeOps()

        def fail():
            raise TTRPCError(Code.UNKNOWN, "resume container web: frozen")

        ops.hooks["resume_init"] = fail
        with pytest.raises(TTRPCError):
            await p.current.resume(ops)
        assert p.state is S.PAUSED

    asyncio.run(scenario())


def test_created_from_checkpoint_holds_its_image_and_reports_created():
    async def scenario():
        p = InitProcess("web", "web", StdioPaths(), restore_from=IMAGE)
        assert isinstance(p.current, CreatedFromCheckpoint) and p.current.image_dir == IMAGE
        assert p.state is S.CREATED_CHECKPOINT and p.current.label == "created"
        assert isinstance(InitProcess("web", "web", StdioPaths()).current, Created)

    asyncio.run(scenario())


# -- Restoring: the Start of a container created from a checkpoint ------------------------------------------
def test_start_from_a_checkpoint_restores_through_the_restoring_state():
    async def scenario():
        p = init_in(S.CREATED_CHECKPOINT)
        ops = FakeOps()
        seen = []
        ops.hooks["restore_init"] = lambda: seen.append(p.current)
        assert await p.current.start(ops) is None
        (during,) = seen
        assert type(during) is Restoring and during.name is S.CREATED_CHECKPOINT and during.label == "created"
        assert p.state is S.RUNNING

    asyncio.run(scenario())


@pytest.mark.parametrize("in_flight,calls", [
    (True, [("abort_restore",)]),  # runc restore (and CRIU) killed: the Start fails and undoes the restore
    (False, [("abort_restore",), ("kill_init", 9, False)]),  # another step of the restore: runc kill
])
def test_kill_while_restoring_ends_a_restore_in_flight(in_flight, calls):
    async def scenario():
        p = init_in(S.CREATED_CHECKPOINT)
        p.current = Restoring(p, p.current)
        ops = FakeOps(restore_in_flight=in_flight)
        await p.current.kill(ops, 9, False)
        assert ops.calls == calls and isinstance(p.current, Restoring)

    asyncio.run(scenario())


def test_kill_of_a_plain_start_never_aborts_a_restore():
    async def scenario():
        p = init_in(S.CREATED)
        p.current = Starting(p, p.current)
        ops = FakeOps(restore_in_flight=True)
        await p.current.kill(ops, 9, False)
        assert ops.calls == [("kill_init", 9, False)]

    asyncio.run(scenario())
