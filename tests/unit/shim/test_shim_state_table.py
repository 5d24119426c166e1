"""The process state table: what each state allows, and the sentence a refusal carries."""
import pytest

from ttrpc import Code, TTRPCError
from shim.task.process import EXEC_TRANSITIONS, INIT_TRANSITIONS, Op, State, transition

C = "container web"


@pytest.mark.parametrize("state,op,expected", [
    (State.CREATED, Op.START, State.RUNNING),
    (State.CREATED_CHECKPOINT, Op.START, State.RUNNING),
    (State.RUNNING, Op.PAUSE, State.PAUSED),
    (State.PAUSED, Op.RESUME, State.RUNNING),
    (State.RUNNING, Op.EXIT, State.STOPPED),
    (State.PAUSED, Op.EXIT, State.STOPPED),
    (State.CREATED, Op.EXIT, State.STOPPED),
    (State.STOPPED, Op.DELETE, State.DELETED),
    (State.CREATED, Op.DELETE, State.DELETED),
    (State.RUNNING, Op.KILL, State.RUNNING),
    (State.PAUSED, Op.KILL, State.PAUSED),
    (State.CREATED, Op.KILL, State.CREATED),
    (State.RUNNING, Op.EXEC, State.RUNNING),
    (State.PAUSED, Op.CHECKPOINT, State.PAUSED),
    (State.RUNNING, Op.CHECKPOINT, State.RUNNING),
    (State.PAUSED, Op.UPDATE, State.PAUSED),
])
def test_allowed_init_transitions(state, op, expected):
    assert transition("init", state, op, C) is expected


@pytest.mark.parametrize("state,op,code,sentence", [
    (State.STOPPED, Op.PAUSE, Code.FAILED_PRECONDITION, "cannot pause a stopped container web"),
    (State.STOPPED, Op.RESUME, Code.FAILED_PRECONDITION, "cannot resume a stopped container web"),
    (State.RUNNING, Op.RESUME, Code.FAILED_PRECONDITION, "cannot resume a running container web"),
    (State.PAUSED, Op.PAUSE, Code.FAILED_PRECONDITION, "cannot pause a paused container web"),
    (State.RUNNING, Op.START, Code.FAILED_PRECONDITION, "cannot start a running container web"),
    (State.STOPPED, Op.START, Code.FAILED_PRECONDITION, "cannot start a stopped container web"),
    (State.RUNNING, Op.DELETE, Code.FAILED_PRECONDITION, "cannot delete a running container web"),
    (State.PAUSED, Op.DELETE, Code.FAILED_PRECONDITION, "cannot delete a paused container web"),
    (State.STOPPED, Op.EXEC, Code.FAILED_PRECONDITION, "cannot exec in a stopped container web"),
    (State.CREATED, Op.EXEC, Code.FAILED_PRECONDITION, "cannot exec in a created container web"),
    (State.CREATED, Op.CHECKPOINT, Code.FAILED_PRECONDITION, "cannot checkpoint a created container web"),
    (State.CREATED_CHECKPOINT, Op.EXEC, Code.FAILED_PRECONDITION, "cannot exec in a created container web"),
    (State.STOPPED, Op.UPDATE, Code.FAILED_PRECONDITION, "cannot update a stopped container web"),
    (State.STOPPED, Op.KILL, Code.NOT_FOUND, "cannot kill a stopped container web"),
    (State.DELETED, Op.START, Code.NOT_FOUND, "cannot start a deleted container web"),
    (State.DELETED, Op.DELETE, Code.NOT_FOUND, "cannot delete a deleted container web"),
])
def test_forbidden_init_operations(state, op, code, sentence):
    with pytest.raises(TTRPCError) as info:
        transition("init", state, op, C)
    assert info.value.code == code
    assert info.value.message.startswith(sentence)


def test_exec_process_table():
    subject = "process sh1 in container web"
    assert transition("exec", State.CREATED, Op.START, subject) is State.RUNNING
    assert transition("exec", State.RUNNING, Op.EXIT, subject) is State.STOPPED
    with pytest.raises(TTRPCError) as info:
        transition("exec", State.RUNNING, Op.PAUSE, subject)
    assert info.value.code == Code.FAILED_PRECONDITION
    assert info.value.message == "cannot pause a running process sh1 in container web"
    with pytest.raises(TTRPCError) as info:
        transition("exec", State.CREATED, Op.KILL, subject)
    assert info.value.code == Code.FAILED_PRECONDITION and "not started" in info.value.message
    with pytest.raises(TTRPCError) as info:
        transition("exec", State.STOPPED, Op.KILL, subject)
    assert info.value.code == Code.NOT_FOUND and "already finished" in info.value.message
    with pytest.raises(TTRPCError) as info:
        transition("exec", State.RUNNING, Op.DELETE, subject)
    assert info.value.code == Code.FAILED_PRECONDITION


@pytest.mark.parametrize("table", [INIT_TRANSITIONS, EXEC_TRANSITIONS])
def test_exit_is_never_refused_and_terminal_states_stay(table):
    for state in State:
        if state in (State.CREATED_CHECKPOINT, State.PAUSED) and table is EXEC_TRANSITIONS:  # init-only states
            continue
        nxt = table[(state, Op.EXIT)]
        assert nxt in (State.STOPPED, State.DELETED)
    # nothing leaves DELETED but an exit (which stays there)
    assert [op for (s, op) in table if s is State.DELETED] == [Op.EXIT]


def test_every_transition_targets_a_state_reachable_by_the_table():
    for table in (INIT_TRANSITIONS, EXEC_TRANSITIONS):
        for (state, op), nxt in table.items():
            assert isinstance(state, State) and isinstance(op, Op) and isinstance(nxt, State)
            if op in (Op.KILL, Op.UPDATE, Op.EXEC, Op.CHECKPOINT, Op.RESIZE):
                assert nxt is state, f"{op} must not change the state ({state} -> {nxt})"


def test_process_apply_keeps_exit():
    """An exit that lands while Start runs wins: apply(START) after set_exited leaves it stopped."""
    import asyncio

    from shim.task.io import StdioPaths
    from shim.task.process import InitProcess

    async def scenario():
        p = InitProcess("web", "web", StdioPaths())
        p.check(Op.START)
        p.set_exited(3, 1.0)
        p.apply(Op.START)
        assert p.state is State.STOPPED and p.exit_status == 3
        assert await p.wait() == 3
        p.set_exited(9)  # a second exit report changes nothing
        assert p.exit_status == 3

    asyncio.run(scenario())
