"""Helpers shared by the checkpoint/restore integration tests (test_checkpoint*.py, test_restore.py).

- a counter container that writes its count into its rootfs (/tmp/count) and to stdout;
- containerd's Tasks API with CheckpointOptions set (what `ctr` drops for runtimes other than runc);
- a watcher of `ctr events`;
- a network namespace with a veth pair to the host (link-local addresses, traffic stays on the pair)
  and a TCP peer on the host side;
- what a failed restore must not leave behind: processes, mounts, runc state, the bundle.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .harness import (BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME, Containerd, _all_pids, _cmdline,
                      mounts_under)

# Counts ten times a second into the rootfs (survives in the rw layer) and to stdout.
# /tmp/hold (made by `hold_counter`) parks it between writes: a dump then never catches /tmp/count open,
# which a restore into a fresh rootfs (restore-from) could not reopen ("Can't open file tmp/count").
COUNTER = ("i=0; while :; do while [ -e /tmp/hold ]; do sleep 0.05; done; "
           "i=$((i+1)); echo $i > /tmp/count; echo $i; sleep 0.1; done")
# The same, continuing from a number given in the environment (so a fresh start is recognisable).
RESTORE_ANNOTATION = "kybernate.io/restore-from"
EXIT_ANNOTATION = "kybernate.io/checkpoint-exit"
TCP_ANNOTATION = "kybernate.io/checkpoint-tcp-established"


def wait_until(pred: Callable[[], object], timeout: float = 20.0, interval: float = 0.05):
    """Poll pred until it returns something truthy (returned) or the timeout passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def short(runtime: str) -> str:
    return "kyb" if runtime == KYBERNATE_RUNTIME else "runc"


def run_counter(cd: Containerd, cid: str, runtime: str, *extra: str, log: Path | None = None) -> None:
    """ctr run -d a counter; extra: further `ctr run` flags (annotations, --with-ns ...)."""
    args = ["run", "-d", "--runtime", runtime, *extra]
    if log is not None:
        args += ["--log-uri", f"file://{log}"]
    cd.ctr(*args, BUSYBOX_REF, cid, "sh", "-c", COUNTER)


def stands_still(read: Callable[[], int], timeout: float = 10.0, interval: float = 0.3) -> bool:
    """True once two reads `interval` apart agree on a positive count (a parked counter)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last and now > 0:
            return True
        last = now
    return False


def hold_counter(cd: Containerd, cid: str, timeout: float = 10.0) -> int:
    """Park the counter (/tmp/hold in its rootfs) and wait until it stands still; returns its value."""
    (bundle_dir(cd, cid) / "rootfs" / "tmp" / "hold").touch()
    if not stands_still(lambda: read_count(cd, cid), timeout):
        raise AssertionError(f"counter {cid} did not stop at /tmp/hold")
    return read_count(cd, cid)


def read_count(cd: Containerd, cid: str) -> int:
    """The counter's value, read from the task's rootfs on the host (works for a paused task too);
    -1 when it cannot be read."""
    path = bundle_dir(cd, cid) / "rootfs" / "tmp" / "count"
    for _ in range(20):  # `echo $i > file` truncates, then writes: a read in between sees nothing
        try:
            text = path.read_text().strip()
        except OSError:
            return -1
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return -1


def log_counts(log: Path) -> list[int]:
    try:
        return [int(x) for x in log.read_text().split() if x.isdigit()]
    except FileNotFoundError:
        return []


def counting_past(cd: Containerd, cid: str, value: int, timeout: float = 15.0) -> int | None:
    """Wait until the counter of cid is above value; returns the value read (None on timeout)."""
    return wait_until(lambda: (lambda n: n if n > value else None)(read_count(cd, cid)), timeout, 0.1)


def task_status(cd: Containerd, cid: str) -> str | None:
    """STATUS column of `ctr tasks ls` for cid (RUNNING, PAUSED, STOPPED...), None without a task."""
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


def task_pid(cd: Containerd, cid: str) -> int:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    return 0


def remove(cd: Containerd, cid: str) -> None:
    """Kill, delete the task, delete the container (what is there of it)."""
    cd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False, timeout=15)
    wait_until(lambda: task_status(cd, cid) in (None, "STOPPED"), 10)
    cd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
    cd.ctr("containers", "delete", cid, check=False, timeout=30)


def bundle_dir(cd: Containerd, cid: str) -> Path:
    return cd.state / "io.containerd.runtime.v2.task" / cd.namespace / cid


def freezer_state(pid: int) -> str | None:
    """cgroup v1 freezer state of the process's cgroup (THAWED/FROZEN), None when not found."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(","):
                return (Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state").read_text().strip()
    except OSError:
        return None
    return None


# ---- containerd's Tasks API with options (ctr drops them for runtimes other than runc) ----------
def checkpoint_options(**fields):
    """A packed containerd.runc.v1.CheckpointOptions."""
    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2

    return pack(options_pb2.CheckpointOptions(**fields))


def api_checkpoint(cd: Containerd, cid: str, timeout: float = 120, **fields) -> None:
    """Tasks.Checkpoint with CheckpointOptions(**fields), without pausing the task first (ctr pauses).
    Raises grpc.RpcError on failure."""
    from kybernate.containerd_api import Containerd as Api

    if fields.get("exit"):  # an image to restore elsewhere: a COUNTER parks first (see COUNTER); others run on
        try:
            hold_counter(cd, cid, timeout=3.0)
        except AssertionError:
            pass
    with Api(cd.address) as api:
        api.checkpoint(cd.namespace, cid, checkpoint_options(**fields), timeout=timeout)


def store_image(cd: Containerd, cid: str, checkpoint_id: str = "ck") -> tuple[Path, str]:
    """(image dir, name for kybernate.io/restore-from) of a new checkpoint of the ctr container
    ``cid`` in the instance's checkpoint store, laid out as the shim scopes it
    (<store>/<namespace>/_/<cid>/<checkpoint id>, parents made root's alone as `kybernate` makes them)."""
    from shim.policy.store import make_dirs

    parent = make_dirs(str(cd.checkpoint_store), [cd.namespace, "_", cid])
    return Path(parent) / checkpoint_id, f"{cid}/{checkpoint_id}"


def audit_lines(cd: Containerd, *words: str) -> list[str]:
    """The shim's audit lines (logger kybernate.audit, in containerd's log) holding every word."""
    return [line for line in cd.log_text().splitlines() if "AUDIT " in line and all(w in line for w in words)]


def refused_code(cd: Containerd) -> str:
    """The gRPC code a PermissionDenied from the shim reaches containerd's clients with: containerd
    1.6/1.7 know no PermissionDenied in their error mapping (errdefs) and pass it on as Unknown."""
    return "PERMISSION_DENIED" if cd.version.startswith("2.") else "UNKNOWN"


def api_create_task(cd: Containerd, cid: str, timeout: float = 60) -> None:
    """Tasks.Create for an existing container, no IO, no rootfs (containerd's API subset in proto/ has
    no Create: CreateTaskRequest{container_id = 1} is encoded here). Raises grpc.RpcError."""
    import grpc

    from kybernate.containerd_api import NAMESPACE_METADATA, target

    raw = cid.encode()
    request = b"\x0a" + bytes([len(raw)]) + raw
    with grpc.insecure_channel(target(cd.address)) as channel:
        call = channel.unary_unary("/containerd.services.tasks.v1.Tasks/Create",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(request, timeout=timeout, metadata=((NAMESPACE_METADATA, cd.namespace),))


def rpc_error_text(exc) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:  # noqa: BLE001
        return str(exc)


class EventWatch:
    """`ctr events` in the background; `wait(topic, cid)` for an event line of that topic naming cid."""

    def __init__(self, cd: Containerd):
        cmd = [str(cd.install.ctr), "--address", cd.address, "--namespace", cd.namespace, "events"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=cd.env)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # subscribed before the caller acts

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def seen(self, topic: str, cid: str) -> list[str]:
        return [ln for ln in list(self.lines) if f" {topic} " in f" {ln} " and cid in ln]

    def wait(self, topic: str, cid: str, timeout: float = 10.0) -> list[str]:
        return wait_until(lambda: self.seen(topic, cid), timeout) or []

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "EventWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- what a failed restore must not leave behind ------------------------------------------------
def _names(args: list[str], cid: str) -> bool:
    """Whether a command line names exactly this container id (as an argument or a path part)."""
    return any(a == cid or f"/{cid}/" in f"{a}/" for a in args)


SHIM_BINARIES = ("containerd-shim-kybernate-v1", "containerd-shim-runc-v2")


def processes_of(cid: str, shims: bool = True) -> list[str]:
    """Processes whose command line names the container id (runc, criu, the container's own shim when
    shims, and container processes started with the id in their arguments)."""
    found = []
    for pid in _all_pids():
        args = _cmdline(pid)
        if not args or "pytest" in " ".join(args) or not _names(args, cid):
            continue
        shim = any(os.path.basename(a) in SHIM_BINARIES for a in args[:2])
        if shim and args[-1] in ("warm", "warm-spare"):
            continue  # the shim's warm template (started with the argv of the shim that spawned it), its spare
        if shim and not shims:
            continue
        found.append(f"{pid}: {' '.join(args)}")
    return found


def leftovers_of(cd: Containerd, cid: str, shims: bool = True) -> list[str]:
    """Processes, mounts, runc state and cgroups a container of that id left (shims: count its shim
    process too; it lives as long as containerd has the task)."""
    found = [f"process {p}" for p in processes_of(cid, shims)]
    bundle = bundle_dir(cd, cid)
    found += [f"mount {m}" for m in mounts_under(bundle)]
    runc_state = cd.runc_root / cid
    if runc_state.exists():
        found.append(f"runc state {runc_state}")
    for mnt in ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids",
                "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        p = Path(mnt) / cd.namespace / cid
        if p.is_dir():
            found.append(f"cgroup {p}")
    if cid in cd.ctr("tasks", "ls", "-q").stdout.split():
        found.append(f"task {cid}")
    return found


# ---- network: a namespace with a veth pair to the host, and a TCP peer on the host side --------
class NetPair:
    """/var/run/netns/<name> with <name>c inside and <name>h on the host; a random link-local /30.

    Only these two interfaces carry the addresses, so the traffic stays between them.
    """

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.name = f"kyb{token}"
        self.host_if = f"{self.name}h"
        self.ns_if = f"{self.name}c"
        a, b = secrets.randbelow(250) + 2, (secrets.randbelow(60) + 1) * 4
        self.host_ip = f"169.254.{a}.{b + 1}"
        self.ns_ip = f"169.254.{a}.{b + 2}"
        self.path = Path("/var/run/netns") / self.name

    def __enter__(self) -> "NetPair":
        from pyroute2 import IPRoute, NetNS, netns

        netns.create(self.name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth",
                         peer={"ifname": self.ns_if, "net_ns_fd": self.name})
                idx = ipr.link_lookup(ifname=self.host_if)[0]
                ipr.addr("add", index=idx, address=self.host_ip, prefixlen=30)
                ipr.link("set", index=idx, state="up")
            with NetNS(self.name) as ns:
                idx = ns.link_lookup(ifname=self.ns_if)[0]
                ns.addr("add", index=idx, address=self.ns_ip, prefixlen=30)
                ns.link("set", index=idx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        from pyroute2 import IPRoute, netns

        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.host_if):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=idx)
        with contextlib.suppress(Exception):
            netns.remove(self.name)


class TcpPeer:
    """A TCP server on the host side of a NetPair; accepts one client and echoes through it."""

    def __init__(self, host_ip: str):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host_ip, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self, timeout: float = 15.0) -> None:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(timeout)

    def roundtrip(self, text: str, timeout: float = 10.0) -> str:
        """Send a line; return what came back (the client runs `cat`, so the same line)."""
        assert self.conn is not None
        self.conn.sendall(text.encode() + b"\n")
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self.conn], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = self.conn.recv(4096)
            if not chunk:
                return data.decode() + "<EOF>"
            data += chunk
        return data.decode().rstrip("\n")

    def peer_closed(self) -> bool:
        """True when the client's side sent FIN/RST (a readable socket with nothing to read)."""
        assert self.conn is not None
        ready, _, _ = select.select([self.conn], [], [], 0)
        if not ready:
            return False
        try:
            return self.conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()


@contextlib.contextmanager
def tcp_client_container(cd: Containerd, cid: str, runtime: str, net: NetPair, *extra: str) -> Iterator[TcpPeer]:
    """A container in net's namespace whose busybox nc holds one connection to a TcpPeer (and echoes
    what it receives through `cat`)."""
    peer = TcpPeer(net.host_ip)
    try:
        cd.ctr("run", "-d", "--runtime", runtime, "--with-ns", f"network:{net.path}", *extra, BUSYBOX_REF, cid,
               "nc", net.host_ip, str(peer.port), "-e", "/bin/cat")
        peer.accept()
        yield peer
    finally:
        peer.close()


