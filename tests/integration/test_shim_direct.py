"""Our shim without containerd: started with its own `start` action and driven over ttrpc directly.

This is where bad input is tried (ids, bundles, reused exec ids, gone processes, garbage payloads):
each answer must be the right gRPC code with a message naming the container and what failed, and
the shim must keep serving. A fake containerd events service records what the shim publishes, so
the event order (create, start, exit before delete) is checked too.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from google.protobuf import empty_pb2
from proto.anyutil import pack
from proto.containerd.events import task_pb2 as ev
from proto.containerd.services.ttrpc.events.v1 import events_pb2
from proto.containerd.task.v2 import shim_pb2 as api
from ttrpc import BlockingClient, Code, Server, Service, TTRPCError

from .harness import SHIM_BINARY

V2 = "containerd.task.v2.Task"
V3 = "containerd.task.v3.Task"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not SHIM_BINARY.exists() or not BUSYBOX.exists(),
                                reason="needs root, the installed shim and a static busybox")

RESPONSES = {
    "State": api.StateResponse, "Create": api.CreateTaskResponse, "Start": api.StartResponse,
    "Delete": api.DeleteResponse, "Pids": api.PidsResponse, "Wait": api.WaitResponse,
    "Stats": api.StatsResponse, "Connect": api.ConnectResponse,
}


class EventSink:
    """containerd's Events/Forward, in a thread of its own."""

    def __init__(self, path: str):
        self.path = path
        self.events: list[tuple[str, str, object]] = []  # (namespace header, topic, event)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        svc = Service("containerd.services.events.ttrpc.v1.Events")

        def forward(ctx, req):
            env = req.envelope
            name = env.event.type_url.rpartition(".")[2]
            cls = getattr(ev, name)
            event = cls.FromString(env.event.value)
            ns = (ctx.get("containerd-namespace-ttrpc") or [""])[0]
            assert env.namespace == ns
            self.events.append((ns, env.topic, event))
            return empty_pb2.Empty()

        svc.add("Forward", forward, request_type=events_pb2.ForwardRequest, response_type=empty_pb2.Empty)
        server = Server([svc])
        await server.serve_unix(self.path)
        self._ready.set()
        await self._stop.wait()
        await server.shutdown(grace=1)

    def topics(self, container_id: str) -> list[str]:
        return [t for _, t, e in self.events if getattr(e, "container_id", None) == container_id]

    def wait_for(self, container_id: str, topic: str, timeout: float = 10) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, t, e in self.events:
                if t == topic and e.container_id == container_id:
                    return e
            time.sleep(0.02)
        raise AssertionError(f"no {topic} for {container_id}; got {self.topics(container_id)}")

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def make_bundle(root: Path, cid: str, args: list[str], cgroup_parent: str, env: list[str] = ()) -> Path:
    """A minimal OCI bundle: busybox rootfs and `runc spec`'s config with our args."""
    bundle = root / cid
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep", "cat", "true", "false", "ls", "kill"):
        os.symlink("busybox", rootfs / "bin" / applet)
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = False
    spec["process"]["env"] = ["PATH=/bin"] + list(env)
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["linux"]["cgroupsPath"] = f"{cgroup_parent}/{cid}"
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


class DirectShim:
    """One shim started with `start` like containerd does, a ttrpc client, and cleanup."""

    def __init__(self, tmp: Path, log_file: bool = False):
        """log_file: the shim logs into shimhome/log (its bundle's `log`, a fifo under containerd),
        read by `log_text`; without it the log goes to the daemon's stderr, /dev/null."""
        self.token = secrets.token_hex(3)
        self.tmp = tmp
        self.namespace = f"kybdirect-{self.token}"
        self.run_dir = Path("/run") / f"kybd-{self.token}"
        self.run_dir.mkdir()
        self.events = EventSink(str(self.run_dir / "events.sock"))
        self.cgroup_parent = f"/kybdirect-{self.token}"
        self.home = tmp / "shimhome"
        self.home.mkdir()
        self.log_path = self.home / "log"
        if log_file:
            self.log_path.touch()
        # the node config of a sealing node (a key of its own), not the machine's /etc/kybernate
        key = tmp / "seal.key"
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        config = tmp / "kybernate.toml"
        config.write_text(f'[checkpoint]\nseal_key_file = "{key}"\n')
        config.chmod(0o644)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "TTRPC_ADDRESS": self.events.path, "KYBERNATE_WARM": "0", "KYBERNATE_CONFIG": str(config)}
        r = subprocess.run([str(SHIM_BINARY), "-namespace", self.namespace, "-address",
                            str(self.run_dir / "containerd.sock"), "-id", "shim-" + self.token, "start"],
                           cwd=self.home, env=env, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        self.address = r.stdout.strip()
        self.pid = int((self.home / "shim.pid").read_text())
        self.client = BlockingClient(self.address, timeout=10)
        self.created: list[str] = []

    def call(self, method: str, req, service: str = V2, timeout: float = 30):
        return self.client.call(service, method, req, RESPONSES.get(method, empty_pb2.Empty), timeout=timeout)

    def error(self, method: str, req, service: str = V2) -> TTRPCError:
        with pytest.raises(TTRPCError) as info:
            self.call(method, req, service)
        return info.value

    def bundle(self, cid: str, args: list[str], env: list[str] = ()) -> Path:
        return make_bundle(self.tmp / "bundles", cid, args, self.cgroup_parent, env)

    def create(self, cid: str, args: list[str], stdout: str = "", stderr: str = "", stdin: str = "",
               env: list[str] = ()) -> api.CreateTaskResponse:
        bundle = self.bundle(cid, args, env)
        self.created.append(cid)
        return self.call("Create", api.CreateTaskRequest(id=cid, bundle=str(bundle), stdout=stdout, stderr=stderr,
                                                         stdin=stdin))

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        for cid in self.created:
            try:
                self.call("Kill", api.KillRequest(id=cid, signal=9, all=True), timeout=10)
            except (TTRPCError, OSError):
                pass
            try:  # as containerd does: the exit first, then Delete
                self.call("Wait", api.WaitRequest(id=cid), timeout=10)
            except (TTRPCError, OSError):
                pass
            try:
                self.call("Delete", api.DeleteRequest(id=cid), timeout=20)
            except (TTRPCError, OSError):
                pass
        try:
            self.call("Shutdown", api.ShutdownRequest(id="x"), timeout=5)
        except (TTRPCError, OSError):
            pass
        self.client.close()
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        root = Path("/run/containerd/runc") / self.namespace
        if root.is_dir():
            for c in root.iterdir():
                subprocess.run([RUNC, "--root", str(root), "delete", "--force", c.name], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
        for mnt in ("/sys/fs/cgroup/" + c for c in os.listdir("/sys/fs/cgroup")):
            d = Path(mnt + self.cgroup_parent)
            if d.is_dir():
                for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        try:
                            sub.rmdir()
                        except OSError:
                            pass
                try:
                    d.rmdir()
                except OSError:
                    pass
        self.events.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def shim(tmp_path):
    s = DirectShim(tmp_path)
    yield s
    s.close()
    assert not s.alive(), "the shim did not exit after Shutdown"
    assert not Path(s.address.removeprefix("unix://")).exists(), "the shim left its socket behind"


def fifo(path: Path) -> tuple[str, int]:
    """A fifo as containerd makes it, with containerd's read end already open."""
    os.mkfifo(path)
    return str(path), os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_all(fd: int, timeout: float = 5) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            out += chunk
        else:
            time.sleep(0.02)
            if out:
                break
    return out


def test_lifecycle_output_and_event_order(shim, tmp_path):
    out_path, out_fd = fifo(tmp_path / "out")
    err_path, err_fd = fifo(tmp_path / "err")
    created = shim.create("life", ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
                          stdout=out_path, stderr=err_path)
    assert created.pid > 0
    state = shim.call("State", api.StateRequest(id="life"))
    assert state.status == 1 and state.pid == created.pid and state.stdout == out_path  # CREATED
    started = shim.call("Start", api.StartRequest(id="life"))
    assert started.pid == created.pid
    waited = shim.call("Wait", api.WaitRequest(id="life"))
    assert waited.exit_status == 3 and waited.exited_at.seconds > 0
    # the output reaches the fifos (the exit is reported when the process exits, as runc-v2 does)
    assert read_all(out_fd, 1) == b"to-stdout\n"
    assert read_all(err_fd, 1) == b"to-stderr\n"
    assert shim.call("State", api.StateRequest(id="life")).status == 3  # STOPPED
    deleted = shim.call("Delete", api.DeleteRequest(id="life"))
    assert deleted.exit_status == 3 and deleted.pid == created.pid
    # TaskExit was delivered before Delete returned
    assert shim.events.topics("life")[:3] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    shim.events.wait_for("life", "/tasks/delete")
    assert shim.events.topics("life") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    exit_event = shim.events.wait_for("life", "/tasks/exit")
    assert (exit_event.id, exit_event.pid, exit_event.exit_status) == ("life", created.pid, 3)
    assert {ns for ns, _, _ in shim.events.events} == {shim.namespace}
    shim.created.remove("life")
    os.close(out_fd)
    os.close(err_fd)


def test_stdin_is_piped_and_closeio_ends_it(shim, tmp_path):
    in_path = str(tmp_path / "in")
    os.mkfifo(in_path)
    out_path, out_fd = fifo(tmp_path / "out")
    shim.create("cat", ["cat"], stdin=in_path, stdout=out_path)
    shim.call("Start", api.StartRequest(id="cat"))
    w = os.open(in_path, os.O_WRONLY)
    os.write(w, b"through stdin\n")
    os.close(w)
    assert read_all(out_fd, 3) == b"through stdin\n"
    shim.call("CloseIO", api.CloseIORequest(id="cat", stdin=True))
    assert shim.call("Wait", api.WaitRequest(id="cat"), timeout=10).exit_status == 0
    os.close(out_fd)


def test_exec_processes_exit_before_init(shim, tmp_path):
    shim.create("ex", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="ex"))
    spec = {"args": ["sh", "-c", "echo exec-out; exit 5"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}}
    out_path, out_fd = fifo(tmp_path / "exec-out")
    shim.call("Exec", api.ExecProcessRequest(id="ex", exec_id="e1", stdout=out_path,
                                             spec=pack_process(spec)))
    assert shim.events.wait_for("ex", "/tasks/exec-added").exec_id == "e1"
    st = shim.call("Start", api.StartRequest(id="ex", exec_id="e1"))
    assert st.pid > 0
    assert shim.call("Wait", api.WaitRequest(id="ex", exec_id="e1")).exit_status == 5
    assert read_all(out_fd, 2) == b"exec-out\n"
    # a long-running exec, then the init dies: the exec's exit is published first
    shim.call("Exec", api.ExecProcessRequest(id="ex", exec_id="e2", spec=pack_process({**spec, "args": ["sleep", "999"]})))
    e2 = shim.call("Start", api.StartRequest(id="ex", exec_id="e2")).pid
    pids = [p.pid for p in shim.call("Pids", api.PidsRequest(id="ex")).processes]
    assert e2 in pids
    info = {p.pid: p.info for p in shim.call("Pids", api.PidsRequest(id="ex")).processes}
    from proto.containerd.runc.v1 import options_pb2
    from proto.anyutil import unpack
    assert unpack(info[e2], options_pb2.ProcessDetails).exec_id == "e2"
    shim.call("Kill", api.KillRequest(id="ex", signal=9))
    assert shim.call("Wait", api.WaitRequest(id="ex")).exit_status == 137
    assert shim.call("Wait", api.WaitRequest(id="ex", exec_id="e2")).exit_status == 137
    deadline = time.monotonic() + 10
    exits: list[str] = []
    while len(exits) < 3 and time.monotonic() < deadline:
        exits = [e.id for _, t, e in shim.events.events if t == "/tasks/exit" and e.container_id == "ex"]
        time.sleep(0.02)
    assert exits == ["e1", "e2", "ex"]
    shim.call("Delete", api.DeleteRequest(id="ex", exec_id="e1"))
    shim.call("Delete", api.DeleteRequest(id="ex"))
    shim.created.remove("ex")
    os.close(out_fd)


def pack_process(spec: dict):
    from google.protobuf import any_pb2

    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(spec).encode())


def assert_error(err: TTRPCError, code: Code, *words: str) -> None:
    assert err.code == code, f"{err.code.name} {err.message!r}, want {code.name}"
    for w in words:
        assert w in err.message, f"{w!r} not in {err.message!r}"


def test_bad_ids_and_bundles(shim, tmp_path):
    good = shim.bundle("good", ["sleep", "100"])
    for bad in ("../x", "a/b", "-x", "x..y", ".hidden", "a" * 77):
        err = shim.error("Create", api.CreateTaskRequest(id=bad, bundle=str(good)))
        assert_error(err, Code.INVALID_ARGUMENT, bad[:70])
    assert_error(shim.error("Create", api.CreateTaskRequest(id="", bundle=str(good))), Code.INVALID_ARGUMENT, "empty")
    assert_error(shim.error("Create", api.CreateTaskRequest(id="nob", bundle=str(tmp_path / "nowhere"))),
                 Code.INVALID_ARGUMENT, "nob", "bundle")
    assert_error(shim.error("Create", api.CreateTaskRequest(id="rel", bundle="relative/path")),
                 Code.INVALID_ARGUMENT, "rel", "not absolute")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{nope")
    assert_error(shim.error("Create", api.CreateTaskRequest(id="broken", bundle=str(broken))),
                 Code.INVALID_ARGUMENT, "broken", "config.json")
    # runc refuses a bundle whose rootfs is missing: an error naming the container, and no leftovers
    norootfs = shim.bundle("noroot", ["true"])
    shutil.rmtree(norootfs / "rootfs")
    err = shim.error("Create", api.CreateTaskRequest(id="noroot", bundle=str(norootfs)))
    assert err.code == Code.UNKNOWN and "noroot" in err.message and "OCI runtime create failed" in err.message
    assert_error(shim.error("State", api.StateRequest(id="noroot")), Code.NOT_FOUND, "noroot")
    # duplicate id
    shim.created.append("good")
    shim.call("Create", api.CreateTaskRequest(id="good", bundle=str(good)))
    assert_error(shim.error("Create", api.CreateTaskRequest(id="good", bundle=str(good))),
                 Code.ALREADY_EXISTS, "good")
    assert shim.call("Connect", api.ConnectRequest(id="good")).shim_pid == shim.pid


def test_unknown_ids_and_gone_processes(shim):
    for method, req in (("State", api.StateRequest(id="nosuch")), ("Start", api.StartRequest(id="nosuch")),
                        ("Kill", api.KillRequest(id="nosuch", signal=9)), ("Delete", api.DeleteRequest(id="nosuch")),
                        ("Wait", api.WaitRequest(id="nosuch")), ("Pids", api.PidsRequest(id="nosuch")),
                        ("Pause", api.PauseRequest(id="nosuch")), ("Resume", api.ResumeRequest(id="nosuch")),
                        ("Stats", api.StatsRequest(id="nosuch")), ("CloseIO", api.CloseIORequest(id="nosuch")),
                        ("Update", api.UpdateTaskRequest(id="nosuch")),
                        ("Checkpoint", api.CheckpointTaskRequest(id="nosuch", path="/tmp/x")),
                        ("Exec", api.ExecProcessRequest(id="nosuch", exec_id="e"))):
        assert_error(shim.error(method, req), Code.NOT_FOUND, "nosuch")

    shim.create("short", ["true"])
    assert_error(shim.error("Pause", api.PauseRequest(id="short")), Code.FAILED_PRECONDITION,
                 "cannot pause a created container short")
    assert_error(shim.error("Checkpoint", api.CheckpointTaskRequest(id="short", path="/tmp/x")),
                 Code.FAILED_PRECONDITION, "cannot checkpoint a created container short")
    assert_error(shim.error("State", api.StateRequest(id="short", exec_id="nox")), Code.NOT_FOUND, "nox", "short")
    shim.call("Start", api.StartRequest(id="short"))
    assert shim.call("Wait", api.WaitRequest(id="short")).exit_status == 0
    assert_error(shim.error("Kill", api.KillRequest(id="short", signal=15)), Code.NOT_FOUND, "short", "already finished")
    assert_error(shim.error("Pause", api.PauseRequest(id="short")), Code.FAILED_PRECONDITION,
                 "cannot pause a stopped container short")
    assert_error(shim.error("Start", api.StartRequest(id="short")), Code.FAILED_PRECONDITION,
                 "cannot start a stopped container short")
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="short", exec_id="late", spec=pack_process({"args": ["true"]}))),
                 Code.FAILED_PRECONDITION, "cannot exec in a stopped container short")
    shim.call("Delete", api.DeleteRequest(id="short"))
    shim.created.remove("short")
    assert_error(shim.error("Wait", api.WaitRequest(id="short")), Code.NOT_FOUND, "short")
    assert_error(shim.error("Delete", api.DeleteRequest(id="short")), Code.NOT_FOUND, "short")


def test_bad_exec_requests(shim):
    shim.create("host", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="host"))
    ok = pack_process({"args": ["sleep", "100"], "cwd": "/", "env": ["PATH=/bin"]})
    shim.call("Exec", api.ExecProcessRequest(id="host", exec_id="dup", spec=ok))
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="host", exec_id="dup", spec=ok)),
                 Code.ALREADY_EXISTS, "dup", "host")
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="host", exec_id="../e", spec=ok)),
                 Code.INVALID_ARGUMENT, "../e")
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="host", exec_id="nospec")),
                 Code.INVALID_ARGUMENT, "nospec", "host")
    garbage = pack_process({})
    garbage.value = b"\xff not json"
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="host", exec_id="garbage", spec=garbage)),
                 Code.INVALID_ARGUMENT, "garbage", "host")
    assert_error(shim.error("Kill", api.KillRequest(id="host", exec_id="dup", signal=9)), Code.FAILED_PRECONDITION,
                 "dup")
    assert_error(shim.error("Kill", api.KillRequest(id="host", signal=999)), Code.INVALID_ARGUMENT, "host")
    assert_error(shim.error("Delete", api.DeleteRequest(id="host")), Code.FAILED_PRECONDITION,
                 "cannot delete a running container host")
    # an exec whose binary does not exist: the start fails with a message, the id stays reserved
    missing = pack_process({"args": ["/no/such/binary"], "cwd": "/", "env": ["PATH=/bin"]})
    shim.call("Exec", api.ExecProcessRequest(id="host", exec_id="missing", spec=missing))
    err = shim.error("Start", api.StartRequest(id="host", exec_id="missing"))
    assert "missing" in err.message and "host" in err.message
    assert_error(shim.error("Exec", api.ExecProcessRequest(id="host", exec_id="missing", spec=ok)),
                 Code.ALREADY_EXISTS, "missing")
    shim.call("Delete", api.DeleteRequest(id="host", exec_id="missing"))
    # update with resources that are not JSON
    from google.protobuf import any_pb2
    bad_res = any_pb2.Any(type_url="opencontainers/runtime-spec/1/LinuxResources", value=b"\x00\x01")
    assert_error(shim.error("Update", api.UpdateTaskRequest(id="host", resources=bad_res)), Code.INVALID_ARGUMENT, "host")
    assert shim.call("State", api.StateRequest(id="host")).status == 2


def test_garbage_on_the_wire_and_v3(shim):
    assert_error(shim.error("Frobnicate", api.StateRequest(id="x")), Code.UNIMPLEMENTED)
    err = None
    try:
        shim.client.call(V2, "State", b"\xff\xff\xff", None, timeout=5)
    except TTRPCError as exc:
        err = exc
    assert err is not None and err.code == Code.INVALID_ARGUMENT
    shim.create("v3", ["sleep", "100"])
    st = shim.call("State", api.StateRequest(id="v3"), service=V3)
    assert st.id == "v3" and st.status == 1
    assert shim.call("Connect", api.ConnectRequest(id="v3"), service=V3).task_pid == st.pid
    assert shim.alive()


def test_update_sets_the_cgroup_limit(shim):
    from google.protobuf import any_pb2

    created = shim.create("upd", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="upd"))
    limit = 64 * 1024 * 1024
    res = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                      value=json.dumps({"memory": {"limit": limit}}).encode())
    shim.call("Update", api.UpdateTaskRequest(id="upd", resources=res))
    mem = Path(f"/sys/fs/cgroup/memory{shim.cgroup_parent}/upd/memory.limit_in_bytes")
    if not mem.exists():  # cgroup v2
        mem = Path(f"/sys/fs/cgroup{shim.cgroup_parent}/upd/memory.max")
    assert int(mem.read_text()) == limit
    stats = shim.call("Stats", api.StatsRequest(id="upd"))
    assert stats.stats.type_url.endswith("Metrics")
    shim.call("Pause", api.PauseRequest(id="upd"))
    assert shim.call("State", api.StateRequest(id="upd")).status == 4  # PAUSED
    shim.call("Resume", api.ResumeRequest(id="upd"))
    assert shim.call("State", api.StateRequest(id="upd")).status == 2
    assert created.pid in [p.pid for p in shim.call("Pids", api.PidsRequest(id="upd")).processes]


def test_shutdown_is_refused_while_tasks_live_and_no_fd_leaks(shim):
    shim.create("keep", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="keep"))
    shim.call("Shutdown", api.ShutdownRequest(id="keep"))
    time.sleep(0.3)
    assert shim.alive() and shim.call("State", api.StateRequest(id="keep")).status == 2
    before = shim.fd_count()
    for i in range(5):
        cid = f"cycle{i}"
        shim.create(cid, ["sh", "-c", "echo x"])
        shim.call("Start", api.StartRequest(id=cid))
        shim.call("Wait", api.WaitRequest(id=cid))
        shim.call("Delete", api.DeleteRequest(id=cid))
        shim.created.remove(cid)
    assert shim.fd_count() <= before
    # no zombies among the shim's children
    children = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(shim.pid)], capture_output=True,
                              text=True).stdout.split("\n")
    assert not [c for c in children if c.strip().endswith("Z")], children


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_waits_is_bounded_and_dies_with_its_connections(shim):
    """100 connections x 1000 Waits on a running container (the shim went from 28 MB to 567 MB, and
    the closed connections' Waits kept their sockets until the container exited): now the requests
    over the cap are answered RESOURCE_EXHAUSTED, the memory stays bounded, closing the connections
    gives every fd back, and the shim still answers."""
    from ttrpc.framing import Frame, FrameDecoder, FrameType, encode_frame
    from ttrpc.messages import Request, Response

    shim.create("flood", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="flood"))
    path = shim.address.removeprefix("unix://")
    request = Request(V2, "Wait", api.WaitRequest(id="flood").SerializeToString()).encode()
    connections, per_connection = 100, 1000
    time.sleep(0.2)
    fds_before, rss_before = shim.fd_count(), _rss_mib(shim.pid)

    async def flood() -> tuple[dict[int, int], float]:
        codes: dict[int, int] = {}
        streams = []

        async def one() -> None:
            reader, writer = await asyncio.open_unix_connection(path)
            streams.append(writer)
            decoder = FrameDecoder()
            for i in range(per_connection):
                writer.write(encode_frame(Frame(2 * i + 1, FrameType.REQUEST, request)))
            await writer.drain()
            while True:  # what the shim answers at once; the Waits that it took stay unanswered
                data = await reader.read(65536)
                if not data:
                    return
                for frame in decoder.feed(data):
                    code = Response.decode(frame.data).status.code
                    codes[code] = codes.get(code, 0) + 1

        readers = [asyncio.ensure_future(one()) for _ in range(connections)]
        answered, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 5:  # until no answer came for 5 s
            await asyncio.sleep(0.5)
            if sum(codes.values()) != answered:
                answered, still_since = sum(codes.values()), time.monotonic()
        rss = _rss_mib(shim.pid)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for writer in streams:
            writer.close()
        return codes, rss

    codes, rss = asyncio.run(flood())
    refused = codes.pop(Code.RESOURCE_EXHAUSTED, 0)
    assert codes == {}, codes  # nothing else was answered: the container is still running
    # the shim's cap (4096), each connection served up to its share of it above that (twice the cap at most)
    assert connections * per_connection - 2 * 4096 <= refused <= connections * per_connection - 4096, refused
    assert rss - rss_before < 64, f"the shim grew from {rss_before:.0f} MiB to {rss:.0f} MiB"
    deadline = time.monotonic() + 20
    while shim.fd_count() > fds_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shim.fd_count() <= fds_before, "the closed connections' Waits still hold their sockets"
    assert shim.call("State", api.StateRequest(id="flood")).status == 2  # RUNNING
    shim.call("Kill", api.KillRequest(id="flood", signal=9))
    assert shim.call("Wait", api.WaitRequest(id="flood"), timeout=10).exit_status == 137


def test_create_failure_leaves_no_mounts(shim, tmp_path):
    """Rootfs mounts are unmounted when Create fails."""
    lower = tmp_path / "lower"
    lower.mkdir()
    bundle = shim.bundle("mnt", ["true"])
    target = bundle / "rootfs"
    # a bind mount of an empty dir over the rootfs: runc then finds no /bin/true and create fails
    from proto.containerd.types import mount_pb2

    m = mount_pb2.Mount(type="bind", source=str(lower), options=["rbind", "rw"])
    err = shim.error("Create", api.CreateTaskRequest(id="mnt", bundle=str(bundle), rootfs=[m]))
    assert "mnt" in err.message
    with open("/proc/self/mountinfo") as f:
        assert str(target) not in f.read()


def criu_works() -> bool:
    try:
        from criu.binary import criu_check, find_criu

        return criu_check(find_criu())[0]
    except Exception:
        return False


@pytest.mark.skipif(not criu_works(), reason="CRIU missing or `criu check` fails here")
def test_checkpoint_and_restore_through_the_lifecycle(shim, tmp_path):
    """Checkpoint (runc checkpoint via shim.checkpoint.seam) then Create with `checkpoint` (runc restore)."""
    from proto.containerd.runc.v1 import options_pb2

    loop = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"]
    shim.create("ck", loop)
    shim.call("Start", api.StartRequest(id="ck"))
    time.sleep(0.5)
    image = tmp_path / "image"
    opts = pack(options_pb2.CheckpointOptions(exit=True, image_path=str(image), work_path=str(tmp_path / "work")))
    shim.call("Checkpoint", api.CheckpointTaskRequest(id="ck", path=str(tmp_path / "unused"), options=opts),
              timeout=120)
    at_checkpoint = int((tmp_path / "bundles" / "ck" / "rootfs" / "tmp" / "count").read_text().strip() or 0)
    assert at_checkpoint > 3
    assert (image / "inventory.img").exists()
    assert shim.call("Wait", api.WaitRequest(id="ck"), timeout=30).exit_status != 0  # exit=True stops it
    shim.call("Delete", api.DeleteRequest(id="ck"))
    shim.created.remove("ck")

    bundle = shim.bundle("ck2", loop)
    shim.created.append("ck2")
    shim.call("Create", api.CreateTaskRequest(id="ck2", bundle=str(bundle), checkpoint=str(image)))
    assert shim.call("State", api.StateRequest(id="ck2")).status == 1  # CREATED (from checkpoint)
    restored = shim.call("Start", api.StartRequest(id="ck2"), timeout=120)
    assert restored.pid > 0
    assert shim.call("State", api.StateRequest(id="ck2")).status == 2
    count = bundle / "rootfs" / "tmp" / "count"
    deadline = time.monotonic() + 10
    while not count.exists() and time.monotonic() < deadline:
        time.sleep(0.02)

    def read_count() -> int:
        for _ in range(100):  # `echo > file` truncates first: read until a number is there
            text = count.read_text().strip()
            if text:
                return int(text)
            time.sleep(0.01)
        raise AssertionError("counter file stays empty")

    first = read_count()
    assert first >= at_checkpoint  # restored, not started afresh (that would count from 1)
    time.sleep(0.5)
    assert read_count() > first  # the counter goes on from where it was
    shim.call("Kill", api.KillRequest(id="ck2", signal=9))
    assert shim.call("Wait", api.WaitRequest(id="ck2")).exit_status == 137
    topics = shim.events.topics("ck2")
    assert topics[:2] == ["/tasks/create", "/tasks/start"]


def test_checkpoint_failure_names_the_container_and_keeps_it_running(shim, tmp_path):
    from proto.containerd.runc.v1 import options_pb2

    shim.create("ckf", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="ckf"))
    # an image path that is a file: runc/CRIU cannot write there
    bogus = tmp_path / "file"
    bogus.write_text("x")
    opts = pack(options_pb2.CheckpointOptions(image_path=str(bogus / "sub")))
    err = shim.error("Checkpoint", api.CheckpointTaskRequest(id="ckf", path="", options=opts))
    assert_error(err, Code.INVALID_ARGUMENT, "ckf", "cannot create")
    assert shim.call("State", api.StateRequest(id="ckf")).status == 2
    wrong = pack(options_pb2.Options())
    assert_error(shim.error("Checkpoint", api.CheckpointTaskRequest(id="ckf", path=str(tmp_path / "i"), options=wrong)),
                 Code.INVALID_ARGUMENT, "CheckpointOptions")


def _pids_with(*words: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if all(w in args for w in words):
            out.append(int(d))
    return out


def test_warm_template_forks_daemons_and_steps_aside_when_stale(tmp_path):
    """`start` with a warm template: the daemon is a fork that shows its own command line; a template
    whose code changed on disk refuses and exits, and `start` falls back to a cold daemon."""
    import socket as socketlib

    from shim.binary import warm

    token = secrets.token_hex(3)
    run_dir = Path("/run") / f"kybw-{token}"
    run_dir.mkdir()
    fake_containerd = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    address = str(run_dir / "containerd.sock")
    fake_containerd.bind(address)
    fake_containerd.listen(8)
    ns = f"kybwarm-{token}"
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "KYBERNATE_WARM": "1"}
    template_path = warm.template_socket(address, str(SHIM_BINARY))
    daemons: list[tuple[int, str]] = []

    def start(cid: str) -> tuple[int, str]:
        bundle = tmp_path / cid
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        r = subprocess.run([str(SHIM_BINARY), "-namespace", ns, "-address", address, "-id", cid, "start"],
                           cwd=bundle, env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        pid = int((bundle / "shim.pid").read_text())
        daemons.append((pid, r.stdout.strip()))
        return pid, r.stdout.strip()

    try:
        start("first")  # cold: exec'd daemon, and a template on its way
        def template_up() -> bool:  # without connecting: a connection from here is refused and audited
            return os.path.exists(template_path) and warm.template_coming(template_path)

        deadline = time.monotonic() + 30
        while not template_up() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert template_up(), "no warm template came up"
        templates = _pids_with("-address", address, "warm")
        assert len(templates) == 1
        pid, addr = start("second")
        deadline = time.monotonic() + 10
        while True:  # a forked daemon shows its own command line a moment after `start` returns (until then
            # the template's, which it was forked from; a spare's, `... warm-spare`)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode() for a in f.read().split(b"\0") if a]
            if args[-1:] not in (["warm"], ["warm-spare"]) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert args[0] == str(SHIM_BINARY) and args[args.index("-id") + 1] == "second" and "warm" not in args
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid != templates[0], "the daemon must not stay the template's child"
        with BlockingClient(addr, timeout=10) as c:
            assert c.call(V2, "Connect", api.ConnectRequest(id="x"), api.ConnectResponse, timeout=10).shim_pid == pid
        # code changed under the template: it must not fork old code
        service_py = Path(__file__).resolve().parents[2] / "shim" / "task" / "service.py"
        st = service_py.stat()
        os.utime(service_py, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        try:
            pid3, _ = start("third")
            with open(f"/proc/{pid3}/cmdline", "rb") as f:
                assert b"python" in f.read().split(b"\0")[0]  # exec'd cold, not forked
            deadline = time.monotonic() + 10
            while _pid_alive(templates[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _pid_alive(templates[0]), "a stale template kept running"
        finally:
            os.utime(service_py, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        for pid, addr in daemons:
            try:
                with BlockingClient(addr, timeout=5) as c:
                    c.call(V2, "Shutdown", api.ShutdownRequest(id="x"), empty_pb2.Empty, timeout=5)
            except (TTRPCError, OSError):
                pass
        left = _pids_with("-address", address)
        for pid in left:  # SIGTERM first: a template removes its socket files on the way out
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(_pid_alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        fake_containerd.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_env_only_gpu_request_runs_as_a_cpu_container_with_runc(shim):
    """NVIDIA_VISIBLE_DEVICES from the image or pod alone grants nothing (the node config does not
    accept it by default): runc runs the container, without GPUs, whether or not
    nvidia-container-runtime is installed."""
    bundle = shim.bundle("gpuenv", ["sh", "-c", "test \"$NVIDIA_VISIBLE_DEVICES\" = all && ! ls /dev/nvidia*"],
                         env=["NVIDIA_VISIBLE_DEVICES=all"])
    shim.created.append("gpuenv")
    created = shim.call("Create", api.CreateTaskRequest(id="gpuenv", bundle=str(bundle)))
    assert created.pid > 0
    state = json.loads((bundle / "kybernate.json").read_text())
    assert state["binary"] == RUNC, state
    assert "NVIDIA_VISIBLE_DEVICES=all ignored" in state["reason"], state
    shim.call("Start", api.StartRequest(id="gpuenv"))
    assert shim.call("Wait", api.WaitRequest(id="gpuenv")).exit_status == 0
    # naming a runtime binary in the options still wins
    from proto.containerd.runc.v1 import options_pb2

    other = shim.bundle("gpuenv2", ["true"], env=["NVIDIA_VISIBLE_DEVICES=all"])
    shim.created.append("gpuenv2")
    opts = pack(options_pb2.Options(binary_name=RUNC))
    assert shim.call("Create", api.CreateTaskRequest(id="gpuenv2", bundle=str(other), options=opts)).pid > 0
    state = json.loads((other / "kybernate.json").read_text())
    assert state["binary"] == RUNC and "BinaryName" in state["reason"]


def test_gpu_devices_in_the_spec_run_with_plain_runc(shim):
    """The CDI case: containerd already put the /dev/nvidia* nodes into the spec, so nothing needs
    injecting and runc runs it, with no nvidia-container-runtime (none exists here) and no
    KYBERNATE_RUNTIME. The nodes are NVIDIA's numbers (195:0, 195:255); no driver answers them here,
    which runc does not mind: it only creates them."""
    assert "KYBERNATE_RUNTIME" not in os.environ
    bundle = shim.bundle("cdi", ["sh", "-c", "test -c /dev/nvidia0 && test -c /dev/nvidiactl"])
    spec = json.loads((bundle / "config.json").read_text())
    for path, minor in (("/dev/nvidia0", 0), ("/dev/nvidiactl", 255)):
        spec["linux"].setdefault("devices", []).append(
            {"path": path, "type": "c", "major": 195, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0})
        spec["linux"]["resources"]["devices"].append(
            {"allow": True, "type": "c", "major": 195, "minor": minor, "access": "rwm"})
    (bundle / "config.json").write_text(json.dumps(spec))
    shim.created.append("cdi")
    assert shim.call("Create", api.CreateTaskRequest(id="cdi", bundle=str(bundle))).pid > 0
    state = json.loads((bundle / "kybernate.json").read_text())
    assert state["binary"] == RUNC, state
    assert "GPU device nodes are already in the spec" in state["reason"] and "/dev/nvidia0" in state["reason"]
    shim.call("Start", api.StartRequest(id="cdi"))
    assert shim.call("Wait", api.WaitRequest(id="cdi")).exit_status == 0


def test_cri_style_toml_options_reach_the_runtime(shim, tmp_path):
    """containerd's CRI plugin sends our runtime type its config.toml options as TOML
    (runtimeoptions.v1.Options); BinaryName and Root must take effect."""
    from google.protobuf import any_pb2

    from shim.wire import encode_bytes_field

    root = tmp_path / "runc-root"
    body = f'BinaryName = "{RUNC}"\nRoot = "{root}"\n'.encode()
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=encode_bytes_field(3, body))
    bundle = shim.bundle("toml", ["sleep", "100"])
    shim.created.append("toml")
    shim.call("Create", api.CreateTaskRequest(id="toml", bundle=str(bundle), options=opts))
    assert (root / shim.namespace / "toml").is_dir()  # runc --root <Root>/<namespace>
    state = json.loads((bundle / "kybernate.json").read_text())
    assert state["binary"] == RUNC and state["options"] == "runtimeoptions.v1.Options"
    shim.call("Kill", api.KillRequest(id="toml", signal=9))
    shim.call("Wait", api.WaitRequest(id="toml"))
    shim.call("Delete", api.DeleteRequest(id="toml"))
    shim.created.remove("toml")
    assert not (root / shim.namespace / "toml").exists()
    bad = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=encode_bytes_field(3, b"SystemdCgroup = 'x'"))
    assert_error(shim.error("Create", api.CreateTaskRequest(id="badopt", bundle=str(shim.bundle("badopt", ["true"])),
                                                            options=bad)), Code.INVALID_ARGUMENT, "badopt", "SystemdCgroup")


def test_pod_containers_share_one_shim(shim, tmp_path):
    """Bundles annotated with the same io.kubernetes.cri.sandbox-id get the same shim from `start`."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "KYBERNATE_WARM": "0",
           "TTRPC_ADDRESS": shim.events.path}
    addresses, pids = [], []
    for cid in ("pause", "app"):
        bundle = shim.bundle(cid, ["sleep", "1000"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["annotations"] = {"io.kubernetes.cri.sandbox-id": "pod-" + shim.token,
                               "io.kubernetes.cri.container-type": "sandbox" if cid == "pause" else "container"}
        (bundle / "config.json").write_text(json.dumps(spec))
        r = subprocess.run([str(SHIM_BINARY), "-namespace", shim.namespace, "-address",
                            str(shim.run_dir / "containerd.sock"), "-id", cid, "start"], cwd=bundle, env=env,
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        addresses.append(r.stdout.strip())
        pids.append(int((bundle / "shim.pid").read_text()) if (bundle / "shim.pid").exists() else None)
        assert (bundle / "address").read_text() == r.stdout.strip()
    assert addresses[0] == addresses[1] != shim.address
    pod = BlockingClient(addresses[0], timeout=10)
    try:
        for cid in ("pause", "app"):
            pod.call(V2, "Create", api.CreateTaskRequest(id=cid, bundle=str(tmp_path / "bundles" / cid)),
                     api.CreateTaskResponse, timeout=30)
            pod.call(V2, "Start", api.StartRequest(id=cid), api.StartResponse, timeout=30)
        for cid in ("app", "pause"):
            pod.call(V2, "Kill", api.KillRequest(id=cid, signal=9), empty_pb2.Empty, timeout=10)
            pod.call(V2, "Wait", api.WaitRequest(id=cid), api.WaitResponse, timeout=10)
            pod.call(V2, "Delete", api.DeleteRequest(id=cid), api.DeleteResponse, timeout=30)
            if cid == "app":  # the pod's shim keeps serving its other container
                pod.call(V2, "Shutdown", api.ShutdownRequest(id=cid), empty_pb2.Empty, timeout=10)
                assert pod.call(V2, "State", api.StateRequest(id="pause"), api.StateResponse).status == 2
        pod.call(V2, "Shutdown", api.ShutdownRequest(id="pause"), empty_pb2.Empty, timeout=10)
    finally:
        pod.close()
    deadline = time.monotonic() + 10
    while _pid_alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pids[0])
    assert not Path(addresses[0].removeprefix("unix://")).exists()


def test_start_imports_no_protobuf_and_no_asyncio(tmp_path):
    """`start` is on the critical path of every `ctr run`: builtin modules only."""
    import sys

    run_dir = Path("/run") / f"kybs-{secrets.token_hex(3)}"
    run_dir.mkdir()
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"process": {"args": ["true"]}}')
    code = ("import sys; sys.argv = [sys.argv[1]]\n"
            "from shim.binary.cli import main\n"
            "rc = main(['-namespace', 'kybimp', '-address', sys.argv[0] + '.sock', '-id', 'imp', 'start'])\n"
            "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
            "sys.exit(rc)\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KYBERNATE_WARM": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", code, str(run_dir / "containerd")], cwd=bundle, env=env,
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    try:
        assert r.returncode == 0, r.stderr
        modules = set(r.stderr.split("MODULES ", 1)[1].split())
        for heavy in ("asyncio", "google.protobuf", "ttrpc", "json", "dataclasses", "subprocess", "socket",
                      "hashlib", "logging"):
            assert heavy not in modules, f"`start` imported {heavy}"
    finally:
        address = r.stdout.strip()
        if address:
            try:
                with BlockingClient(address, timeout=10) as c:
                    c.call(V2, "Shutdown", api.ShutdownRequest(id="imp"), empty_pb2.Empty, timeout=10)
            except (TTRPCError, OSError):
                pass
        shutil.rmtree(run_dir, ignore_errors=True)


def test_daemon_with_socket_flag(tmp_path):
    """The daemon run by hand with -socket (no `start`): serves there and removes it on Shutdown."""
    path = Path("/run") / f"kybsock-{secrets.token_hex(3)}.sock"
    proc = subprocess.Popen([str(SHIM_BINARY), "-namespace", "kybsock", "-id", "x", "-address", "/nowhere",
                             "-socket", str(path)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with BlockingClient(str(path), timeout=10) as c:
            assert c.call(V3, "Connect", api.ConnectRequest(id="x"), api.ConnectResponse, timeout=10).shim_pid == proc.pid
            c.call(V2, "Shutdown", api.ShutdownRequest(id="x"), empty_pb2.Empty, timeout=10)
        assert proc.wait(timeout=15) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not criu_works(), reason="CRIU missing or `criu check` fails here")
def test_a_pods_other_containers_keep_answering_while_one_is_checkpointed(shim, tmp_path):
    """One shim serves a whole pod: while one container's checkpoint runs (runc + CRIU dumping ~300 MB,
    then the shim's own work: marker, logs, scratch dir, the seal), State of another container answers fast."""
    import threading

    from proto.containerd.runc.v1 import options_pb2

    hold = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo ready > /tmp/ready; sleep 1000"
    shim.create("big", ["sh", "-c", hold])
    shim.call("Start", api.StartRequest(id="big"))
    shim.create("small", ["sleep", "1000"])
    shim.call("Start", api.StartRequest(id="small"))
    ready = tmp_path / "bundles" / "big" / "rootfs" / "tmp" / "ready"
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the big container never filled its memory"
        time.sleep(0.1)
    latencies: list[float] = []
    done = threading.Event()
    second = BlockingClient(shim.address, timeout=10)  # containerd's calls come on their own streams too

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            assert second.call(V2, "State", api.StateRequest(id="small"), api.StateResponse, timeout=30).status == 2
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        t0 = time.perf_counter()
        opts = pack(options_pb2.CheckpointOptions(image_path=str(tmp_path / "image")))
        shim.call("Checkpoint", api.CheckpointTaskRequest(id="big", path="", options=opts), timeout=120)
        took = time.perf_counter() - t0
    finally:
        done.set()
        poller.join()
        second.close()
    assert took > 0.2, f"the checkpoint took only {took:.2f} s: nothing to measure against"
    assert len(latencies) >= 3, latencies
    assert max(latencies) < 0.5, f"State of another container waited {max(latencies):.2f} s during the checkpoint"
    assert (tmp_path / "image" / "kybernate-seal.json").is_file(), "the seal (hashing ~300 MB) was part of it"
