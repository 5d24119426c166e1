"""IO pumps on fifos, the event publisher's order and retries, mount option parsing."""
import asyncio
import logging
import os

import pytest

from shim.runtime import mount
from shim.task.events import Publisher, topic_of
from shim.task.io import ProcessIO, StdioPaths


def test_fifo_io_copies_in_order_and_drains(tmp_path):
    async def scenario():
        out_path = tmp_path / "out"
        in_path = tmp_path / "in"
        os.mkfifo(out_path)
        os.mkfifo(in_path)
        reader = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)  # containerd's end
        pio = await ProcessIO.create(StdioPaths(str(in_path), str(out_path), str(out_path)), "p1", "ns")
        child_out, child_in = pio.child.stdout, os.dup(pio.child.stdin)  # the "process" keeps its stdin
        assert pio.child.stderr is not None and child_out != pio.child.stderr
        pio.start()
        # what the process writes (we play the process on the child ends)
        payload = b"".join(b"line %d\n" % i for i in range(20000))  # > a pipe buffer
        os.write(child_out, payload[:1000])
        os.write(pio.child.stderr, b"")
        got = b""

        async def drain_reader():
            nonlocal got
            while True:
                try:
                    chunk = os.read(reader, 65536)
                except BlockingIOError:
                    chunk = None
                if chunk:
                    got += chunk
                elif chunk == b"":
                    return
                await asyncio.sleep(0.001)
                if len(got) >= len(payload):
                    return

        task = asyncio.ensure_future(drain_reader())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, os.write, child_out, payload[1000:])
        pio.close_after_start()  # the process is gone: its ends close
        assert await pio.wait_drained(5)
        await asyncio.wait_for(task, 5)
        assert got == payload
        # stdin: containerd writes, the process reads; CloseIO then containerd's close gives EOF
        w = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(w, b"hello")
        await asyncio.sleep(0.05)
        assert os.read(child_in, 100) == b"hello"
        os.close(w)
        pio.close_stdin()
        await asyncio.sleep(0.05)
        assert os.read(child_in, 100) == b""  # EOF reached the process
        await pio.close()
        os.close(reader)

    asyncio.run(scenario())


def test_null_io_and_unknown_scheme():
    async def scenario():
        pio = await ProcessIO.create(StdioPaths(), "p", "ns")
        assert (pio.child.stdin, pio.child.stdout, pio.child.stderr) == (None, None, None)
        from shim.task.io import IOSetupError

        with pytest.raises(IOSetupError, match="unknown stdio scheme"):
            await ProcessIO.create(StdioPaths(stdout="gopher://x"), "p", "ns")
        with pytest.raises(IOSetupError, match="stdout"):
            await ProcessIO.create(StdioPaths(stdout="/nonexistent/dir/fifo"), "p", "ns")

    asyncio.run(scenario())


def test_file_io_appends(tmp_path):
    async def scenario():
        log = tmp_path / "sub" / "c.log"
        pio = await ProcessIO.create(StdioPaths(stdout=f"file://{log}", stderr=f"file://{log}"), "p", "ns")
        pio.start()
        os.write(pio.child.stdout, b"out\n")
        os.write(pio.child.stderr, b"err\n")
        pio.close_after_start()
        assert await pio.wait_drained(5)
        assert sorted(log.read_text().splitlines()) == ["err", "out"]
        await pio.close()

    asyncio.run(scenario())


class FlakyClient:
    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.calls = []
        self.closed = False

    async def call(self, service, method, request, response_type, timeout=None, metadata=None):
        self.calls.append((request.envelope.topic, metadata))
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionError("containerd restarting")
        return response_type()

    async def close(self):
        self.closed = True


def test_publisher_keeps_order_and_retries():
    from proto.containerd.events import task_pb2 as ev

    async def scenario():
        client = FlakyClient(fail_first=2)

        async def connect():
            return client

        pub = Publisher("/run/fake.ttrpc", "k8s.io", connect=connect, retry_delay=0.01)
        futs = [pub.publish(ev.TaskCreate(container_id="c")), pub.publish(ev.TaskStart(container_id="c")),
                pub.publish(ev.TaskExit(container_id="c", exit_status=3)), pub.publish(ev.TaskDelete(container_id="c"))]
        assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [True] * 4
        topics = [t for t, _ in client.calls]
        assert topics == ["/tasks/create"] * 3 + ["/tasks/start", "/tasks/exit", "/tasks/delete"]
        assert all(md == {"containerd-namespace-ttrpc": ["k8s.io"]} for _, md in client.calls)
        await pub.close(timeout=1)

    asyncio.run(scenario())


def test_publisher_gives_up_and_without_address_drops_with_one_warning(caplog):
    from proto.containerd.events import task_pb2 as ev

    async def scenario():
        client = FlakyClient(fail_first=100)

        async def connect():
            return client

        pub = Publisher("/run/fake.ttrpc", "ns", connect=connect, retry_delay=0.001)
        assert await asyncio.wait_for(pub.publish(ev.TaskOOM(container_id="c")), 5) is False
        assert pub.dropped == 1
        caplog.clear()
        nowhere = Publisher("", "ns")
        assert await nowhere.publish(ev.TaskCreate(container_id="c")) is False
        assert await nowhere.publish(ev.TaskStart(container_id="c")) is False
        assert await nowhere.publish(ev.TaskExit(container_id="c")) is False
        assert nowhere.dropped == 3

    with caplog.at_level(logging.WARNING, logger="kybernate.shim"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "TTRPC_ADDRESS" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not per event
    assert "task events are not delivered to containerd" in warnings[0] and "/tasks/create" in warnings[0]


def test_topics():
    from proto.containerd.events import task_pb2 as ev

    assert topic_of(ev.TaskExecStarted()) == "/tasks/exec-started"
    assert topic_of(ev.TaskOOM()) == "/tasks/oom"


@pytest.mark.parametrize("options,flags,prop,data", [
    (["rbind", "ro"], mount.MS_BIND | mount.MS_REC | mount.MS_RDONLY, 0, ""),
    (["rw", "nosuid", "nodev"], mount.MS_NOSUID | mount.MS_NODEV, 0, ""),
    (["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"], 0, 0, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2"),
    (["ro", "rw"], 0, 0, ""),
    (["bind", "rprivate", "X-containerd.mkdir.path=/x"], mount.MS_BIND, mount.MS_PRIVATE | mount.MS_REC, ""),
])
def test_mount_options(options, flags, prop, data):
    assert mount.parse_options(options) == (flags, prop, data)


def test_long_overlay_lowerdir_is_compacted():
    dirs = [f"/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{i}/fs" for i in range(100)]
    data = "index=off,lowerdir=" + ":".join(dirs) + ",upperdir=/u"
    compact, chdir_to = mount._compact_lowerdir(data)
    assert chdir_to == "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"
    assert "lowerdir=0/fs:1/fs:" in compact and compact.endswith(",upperdir=/u") and len(compact) < len(data) / 3


def test_mountinfo_unescape():
    assert mount._unescape(r"/run/a\040b") == "/run/a b"
    assert mount._unescape("/plain") == "/plain"


def test_long_overlay_is_mounted_without_changing_the_shims_cwd(tmp_path):
    """A compacted overlay resolves its relative lowerdirs from a thread of its own (CLONE_FS): the
    process's cwd, which the event loop and driver-loading threads share, never moves."""
    import threading

    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    base = tmp_path / ("d" * 100)
    lowers = []
    for i in range(40):
        d = base / f"layer-{i:03d}-{'x' * 60}" / "fs"
        d.mkdir(parents=True)
        (d / f"f{i}").write_text(str(i))
        lowers.append(str(d))
    upper, work, target = tmp_path / "u", tmp_path / "w", tmp_path / "t"
    for d in (upper, work, target):
        d.mkdir()
    options = [f"lowerdir={':'.join(reversed(lowers))}", f"upperdir={upper}", f"workdir={work}"]
    assert len(",".join(options)) > os.sysconf("SC_PAGESIZE")
    before = os.getcwd()
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(os.getcwd())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mount.mount_one(mount.Mount(type="overlay", source="overlay", target="", options=options), str(target))
    finally:
        stop.set()
        watcher.join()
    try:
        assert (target / "f0").read_text() == "0" and (target / "f39").read_text() == "39"
        assert os.getcwd() == before and seen == {before}
    finally:
        mount.unmount_recursive(str(target))


def test_remove_tree_unmounts_first_and_never_walks_into_a_mount(tmp_path):
    """CRIU's cgroup yard left under its work dir: removing the work dir must not delete what the
    mounts show (here a bind mount of a directory whose files must survive)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    precious = tmp_path / "host-cgroups"
    (precious / "empty-group").mkdir(parents=True)
    (precious / "keep").write_text("x")
    work = tmp_path / "criu-work"
    (work / "cgyard" / "memory").mkdir(parents=True)
    (work / "restore.log").write_text("log")
    mount._sys_mount(str(precious), str(work / "cgyard" / "memory"), "", mount.MS_BIND, "")
    assert mount.is_mounted(str(work / "cgyard" / "memory"))
    assert mount.remove_tree(str(work)) == []
    assert not work.exists()
    assert (precious / "empty-group").is_dir() and (precious / "keep").read_text() == "x"


def test_remove_tree_leaves_a_mount_it_cannot_unmount(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    precious = tmp_path / "host"
    precious.mkdir()
    (precious / "keep").write_text("x")
    work = tmp_path / "w"
    (work / "m").mkdir(parents=True)
    mount._sys_mount(str(precious), str(work / "m"), "", mount.MS_BIND, "")
    monkeypatch.setattr(mount, "unmount_recursive", lambda target: None)  # as if it were busy for ever
    try:
        assert mount.remove_tree(str(work)) == [str(work / "m")]
        assert (precious / "keep").read_text() == "x"
    finally:
        monkeypatch.undo()
        mount.unmount_recursive(str(work))


# ---- stdin keep-alive: one implementation for pipes and terminals -------------------------------------
def test_stdin_fifo_holds_eof_back_until_closeio(tmp_path):
    from shim.task.io import StdinFifo

    path = tmp_path / "stdin"
    os.mkfifo(path)
    fifo = StdinFifo(f"fifo://{path}")
    reader = fifo.take_reader()
    try:
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)   # containerd's writer comes ...
        os.write(w, b"x")
        os.close(w)                                      # ... and goes: no EOF, our writer holds the fifo
        assert os.read(reader, 10) == b"x"
        with pytest.raises(BlockingIOError):
            os.read(reader, 10)
        fifo.close_keepalive()                           # CloseIO
        assert os.read(reader, 10) == b""                # EOF
        with pytest.raises(ValueError, match="taken already"):
            fifo.take_reader()
    finally:
        os.close(reader)
        fifo.close()


def test_stdin_fifo_that_cannot_be_opened_is_an_io_setup_error(tmp_path):
    from shim.task.io import IOSetupError, StdinFifo

    with pytest.raises(IOSetupError, match=r"open stdin fifo .*/missing: No such file"):
        StdinFifo(str(tmp_path / "missing"))


def test_console_keeps_stdin_open_until_closeio(tmp_path):
    from shim.task.console import Console

    async def scenario():
        path = tmp_path / "stdin"
        os.mkfifo(path)
        master, slave = os.openpty()
        console = Console(master, StdioPaths(stdin=str(path), terminal=True), "p1")
        console.start()
        try:
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b"hi\n")
            os.close(w)
            await asyncio.sleep(0.1)
            assert os.read(slave, 100) == b"hi\n"              # reached the terminal
            assert not console._stdin_pump.done.done()        # containerd's writer left: no EOF yet
            console.close_stdin()
            await asyncio.wait_for(asyncio.shield(console._stdin_pump.done), 5)   # CloseIO: EOF
        finally:
            await console.close()
            os.close(slave)

    asyncio.run(scenario())
