"""The warm template: where it listens, whom it serves, what it accepts, what it refuses and logs.

The checks are played with real processes (a foreign python, another uid, another mount namespace,
another interpreter file, a stand-in for the shim script) and a real template process; the template
under containerd is in tests/integration (test_shim_direct, test_attack_warm).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shim.binary import template, warm
from shim.binary.flags import Flags
from shim.binary.template import Refusal

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the template serves root only and checks root's files")
ADDRESS = "/run/containerd/containerd.sock"


@pytest.fixture
def run_dir():
    """A short private directory under /run (unix socket paths are limited to 108 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="kybw-", dir="/run" if os.geteuid() == 0 else None))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def warm_dir(run_dir, monkeypatch):
    d = run_dir / "warm"
    monkeypatch.setattr(warm, "WARM_DIR", str(d))
    return d


# -- names and directory ---------------------------------------------------------------------------

def test_template_socket_is_a_file_per_containerd_and_binary(warm_dir):
    a = warm.template_socket(ADDRESS, "/usr/bin/shim")
    assert a.startswith(str(warm_dir) + "/") and a.endswith(".sock")  # a file, never abstract
    assert a != warm.template_socket("/run/other/containerd.sock", "/usr/bin/shim")
    assert a != warm.template_socket(ADDRESS, "/opt/shim")
    assert {warm.boot_socket(a), warm.lock_path(a), warm.log_path(a)} == {
        a[:-5] + ".boot", a[:-5] + ".lock", a[:-5] + ".log"}
    warm.WARM_DIR = "/run/kybernate/warm"
    assert len(warm.template_socket(ADDRESS, "/usr/bin/shim")) < 108


def test_disable_switch():
    assert warm.enabled({}) is True
    assert warm.enabled({"KYBERNATE_WARM": "0"}) is False
    assert warm.enabled({"KYBERNATE_WARM": "off"}) is False


@needs_root
def test_the_directory_is_made_root_only(run_dir):
    d = run_dir / "new" / "warm"
    assert template.ensure_dir(str(d)) == ""
    assert d.stat().st_mode & 0o777 == 0o700 and d.parent.stat().st_mode & 0o777 == 0o700
    assert d.stat().st_uid == 0
    assert template.ensure_dir(str(d)) == ""  # again: it is there and fine


@needs_root
@pytest.mark.parametrize("make,why", [
    (lambda d: (d.mkdir(), d.chmod(0o755)), "has mode 0755"),
    (lambda d: (d.mkdir(), d.chmod(0o710)), "has mode 0710"),
    (lambda d: (d.mkdir(0o700), os.chown(d, 1000, 0)), "owned by uid 1000"),
    (lambda d: d.symlink_to(d.parent / "elsewhere", target_is_directory=True), "not a directory"),
    (lambda d: d.write_text(""), "not a directory"),
    (lambda d: (d.parent.chmod(0o777), d.mkdir(0o700)), "has mode 0777"),
    (lambda d: (os.chown(d.parent, 1000, 0), d.mkdir(0o700)), "owned by uid 1000"),
])
def test_an_unsafe_directory_is_refused(run_dir, make, why):
    d = run_dir / "p" / "warm"
    d.parent.mkdir()
    (d.parent / "elsewhere").mkdir()
    make(d)
    problem = template.ensure_dir(str(d))
    assert why in problem
    assert warm.dir_problem(str(d)) == problem  # `start` sees the same and does not connect
    assert warm.request_daemon(str(d / "x.sock"), b"", 0) == 0


# -- the request -----------------------------------------------------------------------------------

OWN_ENV = {b"PATH": b"/usr/bin:/bin", b"TTRPC_ADDRESS": ADDRESS.encode() + b".ttrpc", b"GRPC_ADDRESS": ADDRESS.encode()}


def _body(tmp_path, drop=(), extra=b"", **fields) -> bytes:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    values = {"namespace": "k8s.io", "id": "c1", "address": ADDRESS, "publish-binary": "/usr/bin/containerd",
              "bundle": str(bundle), "debug": "0", "TTRPC_ADDRESS": ADDRESS + ".ttrpc", "GRPC_ADDRESS": ADDRESS}
    values.update({k.replace("_", "-") if k.islower() else k: v for k, v in fields.items()})
    parts = [warm.MAGIC] + [f"{k}={v}".encode() for k, v in values.items() if k not in drop]
    return b"\0".join(parts) + extra


def test_request_round_trip(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    flags = Flags(namespace="k8s.io", id="c1", address=ADDRESS, publish_binary="/usr/bin/containerd", debug=True)
    env = {k.decode(): v.decode() for k, v in OWN_ENV.items()}
    request = template.parse_request(warm.encode_request(flags, str(bundle), env), ADDRESS, OWN_ENV)
    assert request.flags() == Flags(namespace="k8s.io", id="c1", address=ADDRESS, publish_binary="/usr/bin/containerd",
                                    debug=True, bundle=str(bundle), ttrpc_address=ADDRESS + ".ttrpc")
    assert request.grpc_address == ADDRESS


ACCEPTED = "unknown field (accepted: namespace, id, address, publish-binary, bundle, debug, TTRPC_ADDRESS, GRPC_ADDRESS)"


@pytest.mark.parametrize("change,key,value,why", [
    (dict(namespace="../../etc"), "namespace", "../../etc", "must be letters and digits"),
    (dict(namespace=""), "namespace", "", "missing"),
    (dict(id="a" * 77), "id", "a" * 77, "longer than 76 characters (containerd's identifier rule)"),
    (dict(id="x;rm"), "id", "x;rm", "must be letters and digits joined by single"),
    (dict(address="/run/other.sock"), "address", "/run/other.sock", f"not this template's containerd ({ADDRESS})"),
    (dict(bundle="relative/dir"), "bundle", "relative/dir", "is not an absolute path"),
    (dict(bundle="/tmp/../etc"), "bundle", "/tmp/../etc", "is not a normalized path"),
    (dict(bundle="/nonexistent-kyb"), "bundle", "/nonexistent-kyb", "No such file or directory"),
    (dict(bundle="/etc/hostname"), "bundle", "/etc/hostname", "not a directory"),
    (dict(debug="yes"), "debug", "yes", "not 0 or 1"),
    (dict(publish_binary="containerd"), "publish-binary", "containerd", "is not an absolute path"),
    (dict(TTRPC_ADDRESS="relative.sock"), "TTRPC_ADDRESS", "relative.sock", "is not an absolute path"),
    (dict(TTRPC_ADDRESS="/run/elsewhere.ttrpc"), "TTRPC_ADDRESS", "/run/elsewhere.ttrpc",
     "not this template's containerd's"),
    (dict(GRPC_ADDRESS="/run/elsewhere.sock"), "GRPC_ADDRESS", "/run/elsewhere.sock", "not this template's"),
    (dict(extra=b"\0LD_PRELOAD=/tmp/x.so"), "LD_PRELOAD", "/tmp/x.so", ACCEPTED),
    (dict(extra=b"\0KYBERNATE_RUNTIME=/tmp/evil"), "KYBERNATE_RUNTIME", "/tmp/evil", ACCEPTED),
    (dict(extra=b"\0id=c2"), "id", "c2", "given twice"),
    (dict(extra=b"\0argv"), "argv", "", ACCEPTED),
    (dict(id="\xff"), "id", "\\xff", "not UTF-8"),
    (dict(drop=("bundle",)), "bundle", "", "missing"),
])
def test_bad_requests_are_refused_naming_field_and_value(tmp_path, change, key, value, why):
    body = _body(tmp_path, **change)
    if change.get("id") == "\xff":
        body = body.replace("id=\xff".encode("utf-8"), b"id=\xff")
    with pytest.raises(Refusal) as info:
        template.parse_request(body, ADDRESS, OWN_ENV)
    assert (info.value.key, info.value.value) == (key, value)
    assert why in info.value.why
    assert str(info.value).startswith(f"{key}={value!r}: ")


def test_the_old_argv_request_is_refused(tmp_path):
    old = b"\0".join([b"KYBWARM1", b"/", b"3", b"/bin/sh", b"-c", b"touch /tmp/x", b"LD_PRELOAD=/x.so"])
    with pytest.raises(Refusal, match="not a warm-template request"):
        template.parse_request(old, ADDRESS, OWN_ENV)


def test_a_symlinked_bundle_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(Refusal, match="link': not a directory"):
        template.parse_request(_body(tmp_path, bundle=str(tmp_path / "link")), ADDRESS, OWN_ENV)


def test_environment_differences_but_namespace():
    own = {b"PATH": b"/bin", b"NAMESPACE": b"default", b"KYBERNATE_RUNTIME": b"/usr/bin/runc"}
    assert template.environment_difference({**own, b"NAMESPACE": b"k8s.io"}, own) == ""
    assert template.environment_difference({b"PATH": b"/bin", b"NAMESPACE": b"x"}, own) == "KYBERNATE_RUNTIME differs"
    assert template.environment_difference({**own, b"LD_PRELOAD": b"/x.so"}, own) == "LD_PRELOAD differs"


def test_shim_command_lines():
    script = "/opt/kybernate/venv/bin/containerd-shim-kybernate-v1"
    flags = ["-namespace", "n", "-id", "i", "-address", "/a", "start"]
    assert template.shim_flag_args(["/opt/kybernate/venv/bin/python", script, *flags], script) == flags
    module = "/opt/kybernate/venv/lib/python3.11/site-packages/shim/binary/cli.py"
    assert template.shim_flag_args(["/usr/bin/python3", "-m", "shim.binary.cli", *flags], module) == flags
    assert template.shim_flag_args(["/usr/bin/python3", "-c", "import x", script], script) is None
    assert template.shim_flag_args(["/usr/bin/python3", "/tmp/evil.py", *flags], script) is None
    assert template.shim_flag_args(["/usr/bin/python3", "-m", "shim.binary.cli", *flags], script) is None
    assert template.shim_flag_args([script], script) is None


def test_the_request_must_match_the_peers_command_line(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    request = template.parse_request(_body(tmp_path), ADDRESS, OWN_ENV)
    peer = template.Peer(1, 0, -1)
    peer.cwd = str(bundle)
    args = ["-namespace", "k8s.io", "-address", ADDRESS, "-publish-binary", "/usr/bin/containerd", "-id", "c1", "start"]
    template.match_request(request, peer, args)
    for bad, why in ((["-namespace", "k8s.io", "-id", "c2", "-address", ADDRESS, "start"],
                      "id='c1': not what the command line of peer pid 1 says ('c2')"),
                     (args[:-1] + ["delete"], "its action is 'delete'"),
                     (["-nope"] + args, "bad flags"),
                     (args[:-1] + ["-debug", "start"], "debug=False: not what the command line")):
        with pytest.raises(Refusal) as info:
            template.match_request(request, peer, bad)
        assert why in str(info.value)
    peer.cwd = str(tmp_path)
    with pytest.raises(Refusal, match=f"bundle='{bundle}': not what the command line of peer pid 1 says"):
        template.match_request(request, peer, args)
    peer.cwd = str(bundle)
    peer.environ = {b"NAMESPACE": b"default"}
    with pytest.raises(Refusal, match="NAMESPACE='default': peer pid 1's environment says another namespace"):
        template.match_request(request, peer, args)


# -- the peer, played by real processes ------------------------------------------------------------

CONNECT_AND_WAIT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"


def _peer_of(run_dir: Path, argv_before: list[str], argv_after: list[str] = (), **popen) -> tuple[object, list]:
    """Run a process that connects to a fresh socket and waits; what read_peer + check_peer say of it."""
    d = run_dir / "open"
    d.mkdir(exist_ok=True)
    run_dir.chmod(0o711)
    d.chmod(0o777)  # so that another uid can connect too
    path = d / f"s{len(list(d.iterdir()))}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(1)
    server.settimeout(20)
    proc = subprocess.Popen([*argv_before, str(path), *argv_after], stdin=subprocess.PIPE, **popen)
    try:
        conn, _ = server.accept()
        with conn:
            try:
                peer = template.read_peer(conn)
            except Refusal as exc:
                return exc, []
            try:
                return None, template.check_peer(peer, str(run_dir / "containerd-shim-kybernate-v1"))
            except Refusal as exc:
                return exc, []
            finally:
                peer.close()
    finally:
        proc.stdin.close()
        proc.wait(10)
        server.close()


@needs_root
def test_a_root_python_on_the_host_is_not_the_shim(run_dir):
    refusal, _ = _peer_of(run_dir, [sys.executable, "-c", CONNECT_AND_WAIT])
    assert "its command line does not run the shim binary" in str(refusal)
    assert f"exe {os.path.realpath(sys.executable)}" in str(refusal)


@needs_root
def test_another_uid_is_refused(run_dir):
    refusal, _ = _peer_of(run_dir, [sys.executable, "-c", CONNECT_AND_WAIT], user=65534)
    assert "uid 65534" in str(refusal) and "not root" in str(refusal)


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) not installed")
def test_another_mount_namespace_is_refused(run_dir):
    refusal, _ = _peer_of(run_dir, ["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                                    CONNECT_AND_WAIT])
    assert "in another mount namespace" in str(refusal)


@needs_root
def test_another_interpreter_is_refused(run_dir):
    other = run_dir / "python3"
    shutil.copy2(os.path.realpath(sys.executable), other)
    refusal, _ = _peer_of(run_dir, [str(other), "-c", CONNECT_AND_WAIT])
    assert "not this shim's interpreter" in str(refusal)


@needs_root
def test_the_shim_script_with_containerds_flags_passes(run_dir):
    script = run_dir / "containerd-shim-kybernate-v1"
    script.write_text(CONNECT_AND_WAIT.replace("sys.argv[1]", "sys.argv[-1]"))
    flags = ["-namespace", "n", "-id", "i", "-address", ADDRESS, "start"]
    refusal, args = _peer_of(run_dir, [sys.executable, str(script), *flags])
    assert refusal is None
    assert args[:-1] == flags and args[-1].endswith(".sock")  # what follows the action is not containerd's


# -- a real template process -----------------------------------------------------------------------

FAKE_START = """
import socket, sys
sock_path, body_path = sys.argv[-2:]
body = open(body_path, "rb").read()
shim_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
shim_socket.bind("")  # autobind: a listening socket to hand over, as start does
shim_socket.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sock_path)
try:
    socket.send_fds(c, [len(body).to_bytes(4, "big") + body], [shim_socket.fileno()])
except BrokenPipeError:
    pass  # the template answered before reading (stale): the answer is still there
print(c.recv(4096).decode().strip())
"""


class Template:
    """A template process for a fake containerd, serving the stand-in shim script `script`."""

    def __init__(self, run_dir: Path, env: dict):
        self.run_dir = run_dir
        self.env = env
        self.script = run_dir / "containerd-shim-kybernate-v1"
        self.script.write_text(FAKE_START)
        self.script.chmod(0o755)
        self.address = str(run_dir / "containerd.sock")
        self.containerd = None
        if not os.path.exists(self.address):  # a second template serves the first one's containerd
            self.containerd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.containerd.bind(self.address)
            self.containerd.listen(8)
        self.warm_dir = run_dir / "warm"
        code = ("import sys; from shim.binary import template, warm; from shim.binary.flags import Flags; "
                f"warm.WARM_DIR = {str(self.warm_dir)!r}; sys.argv = [{str(self.script)!r}]; "
                f"sys.exit(template.serve(Flags(address={self.address!r})))")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        warm.WARM_DIR = str(self.warm_dir)
        self.socket = warm.template_socket(self.address, str(self.script))
        deadline = time.monotonic() + 60
        while not self._fresh_socket():
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the template did not come up"
            time.sleep(0.05)

    def _fresh_socket(self) -> bool:
        """The socket is there, made after this template started (not what a killed one left)."""
        try:
            made = os.stat(self.socket).st_ctime
        except FileNotFoundError:
            return False
        return made >= self.started - 0.05

    def log(self) -> str:
        try:
            return Path(warm.log_path(self.socket)).read_text()
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
        return out

    def start(self, body: bytes, cid: str = "c1", env: dict | None = None, bundle: Path | None = None) -> str:
        """The stand-in `start` of container `cid`, run as containerd runs it; the template's reply."""
        bundle = bundle or self.run_dir / "bundle"
        bundle.mkdir(exist_ok=True)
        body_file = self.run_dir / "body"
        body_file.write_bytes(body)
        r = subprocess.run([sys.executable, str(self.script), "-namespace", "k8s.io", "-id", cid, "-address",
                            self.address, "start", self.socket, str(body_file)], cwd=bundle,
                           env=self.env if env is None else env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def body(self, cid: str = "c1", bundle: Path | None = None, extra: bytes = b"") -> bytes:
        flags = Flags(namespace="k8s.io", id=cid, address=self.address)
        return warm.encode_request(flags, str(bundle or self.run_dir / "bundle"), self.env) + extra

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        if self.containerd is not None:
            self.containerd.close()


@pytest.fixture
def make_template(run_dir, monkeypatch):
    monkeypatch.setattr(warm, "WARM_DIR", warm.WARM_DIR)  # Template sets it; put it back after
    made = []

    def make(env=None):
        t = Template(run_dir, env or {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KYB_TEST": "1"})
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


@needs_root
def test_template_refuses_and_audits_foreign_peers_and_bad_requests_then_serves_the_shim(make_template, run_dir):
    t = make_template()
    assert os.stat(t.warm_dir).st_mode & 0o777 == 0o700
    # 1. this test's own python (root, host mount namespace): not the shim; nothing forked
    shim_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    shim_socket.bind("")
    shim_socket.listen(1)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(t.socket)
    body = t.body()
    socket.send_fds(c, [len(body).to_bytes(4, "big") + body], [shim_socket.fileno()])
    c.settimeout(10)
    reply = c.recv(4096).decode()
    c.close()
    assert reply.startswith(f"refused: peer='pid {os.getpid()} uid 0 exe {os.path.realpath(sys.executable)}")
    assert reply.endswith(f"its command line does not run the shim binary {t.script}\n")
    audit = [line for line in t.log().splitlines() if "logger=kybernate.audit" in line]
    assert len(audit) == 1 and "AUDIT refused container=- namespace=- key=peer value='pid" in audit[0]
    assert "why=its command line does not run the shim binary" in audit[0] and "(nothing was started)" in audit[0]
    assert t.children() == []
    # 2. the shim binary with a request that says more than containerd's flags
    reply = t.start(t.body(extra=b"\0LD_PRELOAD=/tmp/evil.so"))
    assert reply == "refused: LD_PRELOAD='/tmp/evil.so': unknown field (accepted: namespace, id, address, " \
                    "publish-binary, bundle, debug, TTRPC_ADDRESS, GRPC_ADDRESS)"
    # 3. a request for another container than the command line's
    reply = t.start(t.body(cid="other"), cid="c1")
    assert reply.startswith("refused: id='other': not what the command line of peer pid") and "('c1')" in reply
    # 4. a bundle that is not the working directory containerd gave
    elsewhere = run_dir / "elsewhere"
    elsewhere.mkdir()
    reply = t.start(t.body(bundle=elsewhere))
    assert reply.startswith(f"refused: bundle='{elsewhere}': not what the command line of peer pid")
    audit = [line for line in t.log().splitlines() if "logger=kybernate.audit" in line]
    assert len(audit) == 4, t.log()
    assert "AUDIT refused container=other namespace=k8s.io key=id value='other'" in audit[2]
    assert t.children() == [] and t.proc.poll() is None
    # 5. the shim's own request: a daemon, whose command line is containerd's flags
    reply = t.start(t.body(cid="good"), cid="good")
    assert reply.isdigit(), reply
    daemon = int(reply)
    try:
        deadline = time.monotonic() + 10
        while True:  # the pid comes back as the daemon is forked; it shows its own command line soon after
            with open(f"/proc/{daemon}/cmdline", "rb") as f:
                args = f.read().split(b"\0")[:-1]
            if b"-id" in args or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert args[0] == str(t.script).encode() and args[args.index(b"-id") + 1] == b"good"
        assert os.readlink(f"/proc/{daemon}/cwd") == str(run_dir / "bundle")
        with open(f"/proc/{daemon}/environ", "rb") as f:
            assert b"KYB_TEST=1" in f.read().split(b"\0")
    finally:
        os.kill(daemon, signal.SIGKILL)
    assert len([line for line in t.log().splitlines() if "logger=kybernate.audit" in line]) == 4
    # SIGTERM: the template removes its socket files
    t.stop()
    assert not any(t.warm_dir.iterdir()) or [p.name for p in t.warm_dir.iterdir()] == [Path(warm.log_path(t.socket)).name]


def _cmdline_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def _spares_of(t: "Template") -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()
            and _cmdline_of(int(d)) == [str(t.script), "-address", t.address, template.SPARE_ACTION]]


def _wait_for(find, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (found := find()):
        assert time.monotonic() < deadline, "not there in time"
        time.sleep(0.05)
    return found


@needs_root
def test_an_idle_template_keeps_a_spare_daemon_that_the_next_start_gets(make_template, run_dir):
    """Idle, the template forks the next daemon ahead: nobody's child, a session of its own, its command
    line saying what it is. The next checked request goes to it: `start` gets its pid, and it becomes
    that shim's daemon. A spare that is gone is forked for instead; the template's end is the spare's."""
    t = make_template()
    spare = _wait_for(lambda: _spares_of(t))[0]
    with open(f"/proc/{spare}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) != t.proc.pid and int(fields[3]) == spare  # ppid, session id
    assert t.children() == []
    reply = t.start(t.body(cid="good"), cid="good")
    assert reply == str(spare)
    try:
        args = _wait_for(lambda: (lambda a: a if "-id" in a else None)(_cmdline_of(spare)))
        assert args[0] == str(t.script) and args[args.index("-id") + 1] == "good"
        assert os.readlink(f"/proc/{spare}/cwd") == str(run_dir / "bundle")
    finally:
        os.kill(spare, signal.SIGKILL)
    # idle again: another spare; killed, the next start gets a daemon forked for it
    second = _wait_for(lambda: [p for p in _spares_of(t) if p != spare])[0]
    os.kill(second, signal.SIGKILL)
    _wait_for(lambda: not os.path.exists(f"/proc/{second}/cmdline") or _cmdline_of(second) == [])
    reply = t.start(t.body(cid="next"), cid="next")
    assert reply.isdigit() and int(reply) != second, reply
    os.kill(int(reply), signal.SIGKILL)
    assert f"spare daemon {second} did not take a request" in t.log()
    third = _wait_for(lambda: _spares_of(t))[0]
    t.stop()  # the template's end closes the spare's channel: it goes too
    _wait_for(lambda: third not in _spares_of(t))
    assert "Traceback" not in t.log(), t.log()


@needs_root
def test_a_changed_containerd_environment_makes_the_template_step_aside(make_template):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KYB_TEST": "1"}
    t = make_template(env)
    reply = t.start(t.body(), env={**env, "KYBERNATE_RUNTIME": "/usr/bin/runc"})
    assert reply.startswith("stale: containerd's environment changed (KYBERNATE_RUNTIME differs)")
    t.proc.wait(10)
    assert not os.path.exists(t.socket) and not os.path.exists(warm.boot_socket(t.socket))
    assert "warm template stepping aside" in t.log()


@needs_root
def test_a_second_template_leaves_the_first_alone_and_a_stale_socket_is_replaced(make_template):
    t = make_template()
    second = subprocess.run([sys.executable, "-c", (
        "import sys; from shim.binary import template, warm; from shim.binary.flags import Flags; "
        f"warm.WARM_DIR = {str(t.warm_dir)!r}; sys.argv = [{str(t.script)!r}]; "
        f"sys.exit(template.serve(Flags(address={t.address!r})))")], env=t.env, timeout=30)
    assert second.returncode == 0 and t.proc.poll() is None and os.path.exists(t.socket)
    t.proc.kill()  # a killed template leaves its files behind ...
    t.proc.wait(10)
    assert os.path.exists(t.socket) and warm.template_coming(t.socket) is False
    t2 = make_template(t.env)  # ... and the next one replaces them
    assert t2.socket == t.socket and t2.proc.poll() is None
    assert warm.template_coming(t2.socket) is True


def test_set_cmdline_changes_what_ps_shows():
    code = ("import sys; from shim.binary.template import set_cmdline; "
            "ok = set_cmdline(['/usr/bin/containerd-shim-kybernate-v1', '-id', 'a-rather-long-container-id-42']); "
            "print(ok); print(open('/proc/self/cmdline', 'rb').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    ok, cmdline = out.stdout.splitlines()
    if ok != "True":
        pytest.skip("PR_SET_MM_MAP not permitted here")
    assert cmdline == repr(b'/usr/bin/containerd-shim-kybernate-v1\x00-id\x00a-rather-long-container-id-42\x00')


def test_the_template_preloads_the_daemons_modules_and_freezes_them():
    """What a forked daemon needs is loaded before the fork (every name in PRELOAD exists), and the
    loaded objects are out of the collector's reach (a daemon's collections do not copy the
    template's pages)."""
    code = ("import gc, sys; from shim.binary import template; template._preload(); "
            "missing = [m for m in template.PRELOAD if m not in sys.modules]; "
            "print(missing, gc.get_freeze_count() > 10000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"], out.stdout


SQUATTER = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
if sys.argv[2] == "drop":
    os.setuid(65534)  # SO_PEERCRED carries the credentials of listen()
s.listen(1)
print("up", flush=True)
c, _ = s.accept()
c.settimeout(10)
data, fds, _, _ = socket.recv_fds(c, 100, 1)
print(f"received {len(fds)} fds", flush=True)
"""


@needs_root
@pytest.mark.parametrize("how", ["drop", "unshare"])
def test_start_hands_its_socket_only_to_root_in_its_mount_namespace(warm_dir, how):
    """Something in the template's place that is not host root gets no socket: `start` goes cold."""
    if how == "unshare" and shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    assert template.ensure_dir(str(warm_dir)) == ""
    path = str(warm_dir / "squat.sock")
    prefix = ["unshare", "-m", "--propagation", "private"] if how == "unshare" else []
    squatter = subprocess.Popen([*prefix, sys.executable, "-c", SQUATTER, path, how], stdout=subprocess.PIPE,
                                text=True)
    shim_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    shim_socket.bind("")
    shim_socket.listen(1)
    try:
        assert squatter.stdout.readline() == "up\n"
        assert warm.request_daemon(path, b"KYBWARM2", shim_socket.fileno()) == 0
        assert squatter.stdout.readline() == "received 0 fds\n"
    finally:
        squatter.kill()
        squatter.wait()
        shim_socket.close()


@needs_root
def test_a_template_in_an_unsafe_directory_does_not_start(run_dir):
    unsafe = run_dir / "warm"
    unsafe.mkdir(0o755)
    unsafe.chmod(0o755)
    script = run_dir / "containerd-shim-kybernate-v1"
    script.write_text("")
    r = subprocess.run([sys.executable, "-c", (
        "import sys; from shim.binary import template, warm; from shim.binary.flags import Flags; "
        f"warm.WARM_DIR = {str(unsafe)!r}; sys.argv = [{str(script)!r}]; "
        f"sys.exit(template.serve(Flags(address={str(run_dir / 'containerd.sock')!r})))")],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert list(unsafe.iterdir()) == []  # nothing bound, no lock, no log in a directory others may read
    if not os.path.exists("/dev/log"):  # no syslog: the reason goes to stderr (/dev/null under containerd)
        assert f"{unsafe} has mode 0755" in r.stderr and "every shim starts cold" in r.stderr
