"""The reaper: the only waitpid caller; exits to waiters, subscribers and collection windows."""
import asyncio
import os
import signal

from shim.runtime.reaper import Exit, Reaper, exit_code


def test_exit_code_mapping():
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    assert exit_code(signal.SIGTERM) == 143


def test_fake_waitpid_dispatch_order():
    statuses = [(101, 0), (102, 1 << 8), (103, signal.SIGKILL), (0, 0)]

    def fake_waitpid(pid, flags):
        assert pid == -1 and flags == os.WNOHANG
        return statuses.pop(0)

    async def scenario():
        r = Reaper(waitpid=fake_waitpid)
        seen = []
        r.subscribe(lambda ex: seen.append((ex.pid, ex.status)))
        waiter = r.watch(101)
        with r.collect() as early:
            r.reap()
        assert (await waiter).status == 0
        # a watched pid is ours (a runtime command): not a container exit
        assert seen == [(102, 1), (103, 137)]
        assert early.pop(102).status == 1 and early.pop(101) is None
        assert statuses == []

    asyncio.run(scenario())


def test_no_children_is_fine():
    def fake_waitpid(pid, flags):
        raise ChildProcessError

    Reaper(waitpid=fake_waitpid).reap()


def test_real_children_through_sigchld():
    async def scenario():
        loop = asyncio.get_running_loop()
        r = Reaper()
        r.install(loop)
        try:
            seen = []
            r.subscribe(lambda ex: seen.append(ex))
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 7"], {})
            fut = r.watch(pid)  # registered right after the spawn: cannot miss the exit
            ex = await asyncio.wait_for(fut, 10)
            assert ex.pid == pid and ex.status == 7
            other = os.posix_spawn("/bin/sh", ["sh", "-c", "kill -9 $$"], {})
            for _ in range(200):
                if any(e.pid == other for e in seen):
                    break
                await asyncio.sleep(0.01)
            assert [e.status for e in seen if e.pid == other] == [137]
        finally:
            r.uninstall()

    asyncio.run(scenario())


def test_a_failing_subscriber_does_not_stop_reaping():
    def boom(ex):
        raise RuntimeError("bug")

    got = []
    r = Reaper()
    r.subscribe(boom)
    r.subscribe(got.append)
    r.dispatch(Exit(5, 0, 0.0))
    assert [e.pid for e in got] == [5]
