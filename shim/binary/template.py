"""The warm template: an idle process with the daemon's modules imported, forking a daemon per shim.

`shim.binary.warm` says why there is one and how `start` reaches it. For each request the template
forks; the grandchild becomes the daemon (new session, the bundle as cwd, stdio on /dev/null, the
shim's socket as fd 3, `shim.binary.daemon.run`) and its pid goes back to `start`. When the template
has been idle for `SPARE_AFTER` it forks that grandchild ahead of time, a spare (`Spare`: session,
stdio and event loop made, command line ending in ``warm-spare``) waiting on a socketpair only the
template holds; the next request it has checked goes to the spare (which checks it again), and
`start` gets the spare's pid without waiting for a fork. Requests that find no spare are forked for.

The daemons it forks run as host root, so the template serves the shim binary alone:

* Where: its socket is a file in a root-only directory (``/run/kybernate/warm``, 0700), never an
  abstract socket (an abstract name belongs to the network namespace: any root process of a
  ``--net-host`` container could find it in ``/proc/net/unix`` and connect, the CVE-2020-15257
  pattern). A path is reached through the mount namespace, and containers do not see this
  directory. The template creates the directory 0700 and refuses to run (nothing bound, logged)
  when it, or its parent, exists as anything but a directory owned by root (the directory with no
  group/other bits, the parent with no group/other write). An flock on ``<digest>.lock`` makes one
  template the owner of the ``.sock``/``.boot`` names, so it may replace what a killed template
  left there; it removes them when it exits.
* Who: the peer's SO_PEERCRED uid must be 0 and its ``/proc/PID/ns/mnt`` the template's own (a
  container, even a privileged root one, has its own mount namespace; in a user namespace its root
  is not uid 0 here). Those two are the guard: together they mean host root, which could do
  anything anyway. Then its ``/proc/PID/exe`` must be the very file (st_dev, st_ino) the template's
  interpreter is, and its command line this binary: the interpreter, this script's path (or ``-m
  shim.binary.cli``), containerd's flags and the action ``start``. That tells our own `start` from
  any other host root process: a stray ``python3`` run by root passes the first three checks and
  fails the last. (A command line can be rewritten by its process, so this is an identity check
  among the trusted, not a wall.) The request must then say what that command line and the peer's
  working directory say. The peer's pidfd (SO_PEERPIDFD, else pidfd_open) must still be alive
  after the checks, so a reused pid cannot stand in for the peer.
* What: a fixed request, not argv, cwd and environment. Only containerd's flags (``-namespace``,
  ``-id``, ``-address``, ``-publish-binary``, ``-debug``, the bundle) and containerd's two
  addresses (``TTRPC_ADDRESS``, ``GRPC_ADDRESS``), each validated: namespace and id by containerd's
  identifier rule, the address equal to the template's own containerd, the bundle an absolute
  normalized path of an existing directory (the daemon's cwd), the addresses absolute and equal to
  the template's. The daemon's environment is the template's own (containerd's, through the
  `start` that spawned it) with only ``NAMESPACE`` set per request. A `start` whose environment
  differs otherwise (containerd restarted with new settings) gets "stale": the template exits and
  a fresh one takes over.
* Refusals are answered ``refused: <key>=<value>: <why>``, logged as an audit line (logger
  ``kybernate.audit``, the shape of `shim.policy.audit`'s: ``AUDIT refused ... key= value= why=``),
  the received socket closed and nothing forked. Other failures are logged, never dropped. The log
  is ``/run/kybernate/warm/<digest>.log`` (made on the first line, 0600, one rotation at 1 MiB);
  when the directory itself is unsafe the reason goes to syslog (``/dev/log``) when there is one,
  and every shim starts cold.

The template is this binary with the private action ``warm`` and containerd's ``-address`` (so
tooling that looks for a containerd's shims finds it too). It never runs an event loop or threads
(so fork is safe), never becomes a subreaper, and exits when any of its loaded modules, its script
or its interpreter changed on disk (an upgraded shim must not fork old code), when its containerd is
gone, on SIGTERM, or after `IDLE_EXIT` seconds without a request; its spare exits with it (its
channel closes), and a spare is never used once the code on disk changed (the template steps aside
first).

Imports: `cli` runs it (action ``warm``); it imports `warm` (names, request format), `flags` and
`daemon` (preloaded, and run in the fork), never `cli` or `manager` (the plan is drawn in
`shim.binary.flags`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time
from typing import Optional

from shim.binary.flags import (MODULE_COMMAND, RUNTIME_NAME, Flags, UsageError, binary_command, identifier_error,
                               parse_flags)
from shim.binary.warm import (MAGIC, REPLY_TIMEOUT, REQUEST_FIELDS, S_IFDIR, S_IFMT, boot_socket,
                              dir_problem, exec_environ, lock_path, log_path, same_file, template_socket)

IDLE_EXIT = 600.0
LIVENESS_CHECK = 15.0
SPARE_AFTER = 0.5        # seconds without a request before the template forks a spare daemon
SPARE_ACTION = "warm-spare"  # what a spare's command line ends with until it serves a shim
LOG_ROTATE_BYTES = 1 << 20
MAX_REQUEST = 16 << 10
MAX_VALUE = 4096
REQUIRED_FIELDS = ("namespace", "id", "address", "bundle")
PER_SHIM_ENV = b"NAMESPACE"  # the one variable containerd sets differently for each shim
SO_PEERPIDFD = 77  # Linux 6.5+; pidfd_open(SO_PEERCRED's pid) before that


# -- the request, as the template reads it -----------------------------------------------------------

MAX_SHOWN = 200


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


class Refusal(Exception):
    """A request the template does not serve: answered, logged as an audit line, nothing spawned.

    `key` names what was refused (a request field, ``peer`` or ``request`` for its framing), `value`
    what it said, `why` the rule it broke; the audit line has the shape of `shim.policy.audit`'s."""
    def __init__(self, key: str, value: object, why: str):
        super().__init__(f"{key}={_short(value)}: {why}")
        self.key, self.value, self.why = key, value, why


class Stale(Exception):
    """The template no longer matches what `start` runs (code or containerd's environment changed)."""


class WarmRequest:
    """A validated request: containerd's flags for one new shim daemon."""

    __slots__ = ("namespace", "id", "address", "publish_binary", "bundle", "debug", "ttrpc_address",
                 "grpc_address")

    def __init__(self, fields: dict[str, str]):
        self.namespace = fields["namespace"]
        self.id = fields["id"]
        self.address = fields["address"]
        self.publish_binary = fields.get("publish-binary", "")
        self.bundle = fields["bundle"]
        self.debug = fields.get("debug", "0") == "1"
        self.ttrpc_address = fields.get("TTRPC_ADDRESS", "")
        self.grpc_address = fields.get("GRPC_ADDRESS", "")

    def flags(self) -> Flags:
        return Flags(namespace=self.namespace, id=self.id, address=self.address,
                     publish_binary=self.publish_binary, bundle=self.bundle, debug=self.debug,
                     ttrpc_address=self.ttrpc_address)


def _absolute_path_problem(value: str) -> str:
    if not value.startswith("/"):
        return "is not an absolute path"
    if os.path.normpath(value) != value:
        return "is not a normalized path (no '..', '.', '//' or trailing '/')"
    return ""


def parse_request(body: bytes, containerd_address: str, environ) -> WarmRequest:
    """Decode and validate a request for the template of `containerd_address`; `Refusal` naming the
    field and value when anything is off. `environ`: the template's own environment (bytes keys)."""
    parts = body.split(b"\0")
    if parts[0] != MAGIC:
        raise Refusal("request", parts[0][:32].decode("ascii", "backslashreplace"),
                      f"not a warm-template request (want {MAGIC.decode()})")
    fields: dict[str, str] = {}
    for item in parts[1:]:
        key, sep, raw = item.partition(b"=")
        name = key.decode("ascii", "backslashreplace")[:64]
        shown = raw[:64].decode("utf-8", "backslashreplace")
        if not sep or name not in REQUEST_FIELDS:
            raise Refusal(name, shown, f"unknown field (accepted: {', '.join(REQUEST_FIELDS)})")
        if name in fields:
            raise Refusal(name, shown, "given twice")
        if len(raw) > MAX_VALUE:
            raise Refusal(name, shown, f"longer than {MAX_VALUE} bytes")
        try:
            fields[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal(name, shown, "not UTF-8") from None
    for name in REQUIRED_FIELDS:
        if not fields.get(name):
            raise Refusal(name, "", "missing")
    for name in ("namespace", "id"):
        problem = identifier_error(fields[name])
        if problem:
            raise Refusal(name, fields[name], f"{problem} (containerd's identifier rule)")
    if fields["address"] != containerd_address:
        raise Refusal("address", fields["address"], f"not this template's containerd ({containerd_address})")
    if fields.get("debug", "0") not in ("0", "1"):
        raise Refusal("debug", fields["debug"], "not 0 or 1")
    for name in ("publish-binary", "TTRPC_ADDRESS", "GRPC_ADDRESS"):
        value = fields.get(name, "")
        path = value[len("unix://"):] if value.startswith("unix://") else value
        problem = path and _absolute_path_problem(path)
        if problem:
            raise Refusal(name, value, problem)
    for name in ("TTRPC_ADDRESS", "GRPC_ADDRESS"):
        own = os.fsdecode(environ.get(name.encode(), b""))
        if fields.get(name, "") != own:
            raise Refusal(name, fields.get(name, ""), f"not this template's containerd's ({own!r})")
    bundle = fields["bundle"]
    problem = _absolute_path_problem(bundle)
    if problem:
        raise Refusal("bundle", bundle, problem)
    try:
        st = os.lstat(bundle)
    except OSError as exc:
        raise Refusal("bundle", bundle, exc.strerror) from None
    if st.st_mode & S_IFMT != S_IFDIR:
        raise Refusal("bundle", bundle, "not a directory")
    return WarmRequest(fields)


# -- the peer: who is asking ----------------------------------------------------------------------

class Peer:
    """What /proc says about the process that connected (read once, checked by `check_peer`)."""

    __slots__ = ("pid", "uid", "pidfd", "exe", "cmdline", "cwd", "environ")

    def __init__(self, pid: int, uid: int, pidfd: int):
        self.pid, self.uid, self.pidfd = pid, uid, pidfd
        self.exe = self.cwd = ""
        self.cmdline: list[str] = []
        self.environ: dict[bytes, bytes] = {}

    def describe(self) -> str:
        shown = " ".join(self.cmdline[:6]) + (" ..." if len(self.cmdline) > 6 else "")
        return f"pid {self.pid} uid {self.uid} exe {self.exe or '?'} cmdline [{shown[:300]}]"

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def alive(self) -> bool:

        try:
            signal.pidfd_send_signal(self.pidfd, 0)
            return True
        except OSError:
            return False


def shim_flag_args(cmdline: list[str], binary: str) -> list[str] | None:
    """The flags in `cmdline` when it runs this shim binary (interpreter, then `binary`), else None."""
    if len(cmdline) >= 2 and cmdline[1] == binary:
        return cmdline[2:]
    module_file = os.path.join("shim", "binary", "cli.py")
    if binary.endswith(os.sep + module_file) and tuple(cmdline[1:3]) == MODULE_COMMAND:
        return cmdline[3:]
    return None


def _read_proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read(1 << 20)


def read_peer(conn) -> Peer:
    """SO_PEERCRED and a pidfd for the peer, then its /proc entries (a `Refusal` when unreadable)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise Refusal("peer", f"pid {pid} uid {uid}", f"gone before it could be checked ({exc.strerror})") from None
    peer = Peer(pid, uid, pidfd)
    try:
        peer.exe = os.readlink(f"/proc/{pid}/exe")
        peer.cmdline = [os.fsdecode(a) for a in _read_proc(pid, "cmdline").split(b"\0")[:-1]]
        peer.cwd = os.readlink(f"/proc/{pid}/cwd")
        peer.environ = exec_environ(pid)
    except OSError as exc:
        peer.close()
        raise Refusal("peer", f"pid {pid} uid {uid}", f"cannot read its /proc entries ({exc.strerror})") from None
    return peer


def check_peer(peer: Peer, binary: str) -> list[str]:
    """The peer's containerd flags when it is this shim's `start` run by host root; else `Refusal`."""
    who = peer.describe()
    if peer.uid != 0:
        raise Refusal("peer", who, "not root")
    try:
        if not same_file(f"/proc/{peer.pid}/ns/mnt", "/proc/self/ns/mnt"):
            raise Refusal("peer", who, "in another mount namespace than the template (a container?)")
        if not same_file(f"/proc/{peer.pid}/exe", "/proc/self/exe"):
            raise Refusal("peer", who, f"not this shim's interpreter {os.readlink('/proc/self/exe')}")
    except OSError as exc:
        raise Refusal("peer", who, f"cannot compare it with the template ({exc.strerror})") from None
    args = shim_flag_args(peer.cmdline, binary)
    if args is None:
        raise Refusal("peer", who, f"its command line does not run the shim binary {binary}")
    return args


def match_request(request: WarmRequest, peer: Peer, peer_args: list[str]) -> None:
    """The request must say what the peer's own command line and working directory say."""
    try:
        started = parse_flags(peer_args, environ={})
    except UsageError as exc:  # not a command line containerd writes
        raise Refusal("peer", peer.describe(), f"its command line has bad flags ({exc})") from None
    if started.action != "start":
        raise Refusal("peer", peer.describe(), f"its action is {started.action!r}, not 'start'")
    bundle = started.bundle or peer.cwd
    pairs = (("namespace", started.namespace, request.namespace), ("id", started.id, request.id),
             ("address", started.address, request.address),
             ("publish-binary", started.publish_binary, request.publish_binary),
             ("debug", started.debug, request.debug), ("bundle", bundle, request.bundle))
    for name, said, asked in pairs:
        if said != asked:
            raise Refusal(name, asked, f"not what the command line of peer pid {peer.pid} says ({said!r})")
    namespace = peer.environ.get(PER_SHIM_ENV)
    if namespace is not None and os.fsdecode(namespace) != request.namespace:
        raise Refusal("NAMESPACE", os.fsdecode(namespace), f"peer pid {peer.pid}'s environment says another "
                      f"namespace than its -namespace {request.namespace!r}")


def environment_difference(peer_environ: dict[bytes, bytes], own: dict[bytes, bytes]) -> str:
    """The first variable (but NAMESPACE) in which the peer's environment differs from the
    template's, as a phrase; "" when there is none."""
    for key in sorted(set(peer_environ) | set(own)):
        if key == PER_SHIM_ENV:
            continue
        if peer_environ.get(key) != own.get(key):
            return f"{os.fsdecode(key)} differs"
    return ""


# -- the template process ---------------------------------------------------------------------------

def _loaded_sources(binary: str) -> dict[str, float]:
    """mtimes of every loaded module of this project, the script and the interpreter: an upgrade of
    any of them under our feet makes the template stale."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    files = [getattr(mod, "__file__", None) for mod in list(sys.modules.values())]
    files = [f for f in files if f and f.startswith(root + os.sep)]
    files += [binary, os.path.realpath(sys.executable)]
    for f in files:
        try:
            out[f] = os.stat(f).st_mtime
        except OSError:
            pass
    return out


def _stale(sources: dict[str, float]) -> str:
    """The first of `sources` that changed on disk (or is gone), "" when none did."""
    for f, mtime in sources.items():
        try:
            if os.stat(f).st_mtime != mtime:
                return f
        except OSError:
            return f
    return ""


#: Everything a forked daemon imports on its way through the Task API of a CPU container (serve,
#: Create, Start, restore from a checkpoint with its rootfs diff, exec, pause, checkpoint with its
#: seal and CRIU's stats, the first event it publishes):
#: imported here once, so that no RPC pays for an import (a few ms each; tomllib and criu over ten
#: together). A daemon lists what it had to import itself when it shuts down (debug level,
#: `shim.binary.daemon.report_late_imports`); tests/integration/test_checkpoint.py keeps that list empty.
PRELOAD = (
    "asyncio", "asyncio.unix_events", "concurrent.futures.thread", "ctypes", "mmap", "tomllib",
    "ttrpc", "ttrpc.server", "ttrpc.client", "ttrpc.calls", "ttrpc.unix",
    "proto.containerd.task.v3.shim_pb2", "proto.containerd.services.ttrpc.events.v1.events_pb2",
    "shim.binary.daemon", "shim.wire", "shim.runtime.options", "shim.task.container", "shim.task.events",
    "shim.task.service", "shim.checkpoint.seam", "shim.checkpoint.witness", "shim.checkpoint.rootfs_diff",
    "criu.images", "criu.plans", "criu.config", "criu.logs", "criu.stats", "tarfile", "grp", "pwd",
)


def _preload() -> None:
    """Import `PRELOAD` (and the cgroup helpers where this host has them) and parse the node config,
    then freeze what is loaded out of the garbage collector's reach: a forked daemon's collections
    then never walk (and so never copy-on-write) the template's objects."""
    import gc
    from importlib import import_module

    for name in PRELOAD:
        import_module(name)
    try:
        import shim.cgroups  # noqa: F401
    except Exception:
        pass
    from shim.policy.node import NodeConfig, NodeConfigError

    try:
        NodeConfig.load()  # parsed once here: a daemon's Create then finds the file unchanged
    except NodeConfigError:
        pass  # each Create reports it
    try:
        _cmdline_tools()
    except (OSError, AttributeError):
        pass  # set_cmdline says so in each daemon
    from shim.checkpoint import witness

    witness.fs_type(0)  # libc's fstatfs looked up here: a restore's seal check does not
    gc.collect()
    gc.freeze()


class LogFileHandler(logging.Handler):
    """Appends to the template's log file: opened on the first line (most templates never log),
    0600, links not followed, rotated once at `LOG_ROTATE_BYTES`."""
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fd = -1

    def _open(self) -> None:
        if self.fd >= 0:
            if os.fstat(self.fd).st_size < LOG_ROTATE_BYTES:
                return
            os.close(self.fd)
            self.fd = -1
            os.replace(self.path, self.path + ".1")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._open()
            os.write(self.fd, self.format(record).encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def _setup_logging(path: str | None, containerd_address: str):
    """Root logger -> the template's log file (or syslog when `path` is None); returns the handler."""
    from shim.binary.daemon import LogrusFormatter

    formatter = LogrusFormatter({"runtime": RUNTIME_NAME, "warm": "template", "address": containerd_address})
    if path is None:
        from logging.handlers import SysLogHandler

        if not os.path.exists("/dev/log"):
            return None
        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("containerd-shim-kybernate-v1 warm template: %(message)s"))
    else:
        handler = LogFileHandler(path)
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.raiseExceptions = False
    return handler


def ensure_dir(path: str) -> str:
    """Create `path` (and its parent) 0700 when missing; "" when it is safe to use, else why not."""
    for d in (os.path.dirname(path), path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create {d}: {exc.strerror}"
    return dir_problem(path)


def _take_lock(path: str) -> int:
    """An exclusive flock on `path` that is still the file at `path`; -1 when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        try:
            st, fst = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed it as we opened it: take the new one


def _bind_fresh(sock, path: str) -> None:
    """Bind `path`, replacing what a dead template left there (the caller holds the lock)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock.bind(path)
    os.chmod(path, 0o600)


def serve(flags: Flags) -> int:
    """The ``warm`` action: become the template for containerd `flags.address`."""
    binary = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    path = template_socket(flags.address, binary)
    os.chdir("/")  # not the first container's bundle, which containerd removes
    os.closerange(3, 1 << 16)  # hold nothing of the `start` that spawned us (its shim's socket)
    log = logging.getLogger("kybernate.warm")
    problem = ensure_dir(os.path.dirname(path))
    if problem:
        _setup_logging(None, flags.address)
        log.error("warm template for containerd %s not started: %s (want a directory owned by root, "
                  "mode 0700); every shim starts cold", flags.address, problem)
        return 1
    lock = _take_lock(lock_path(path))
    if lock < 0:
        return 0  # another template is starting or running
    handler = _setup_logging(log_path(path), flags.address)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up the socket files on the way out
    boot = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    spares: list[Spare] = []  # at most one
    try:
        _bind_fresh(boot, boot_socket(path))  # from the first instant: `start` spawns no second template
        boot.listen(1)
        _preload()
        sources = _loaded_sources(binary)
        own_environ = exec_environ()  # containerd's, as the `start` that spawned us got it
        _bind_fresh(sock, path)
        sock.listen(64)
        last_request = time.monotonic()
        spare_failed = False
        while True:
            sock.settimeout(LIVENESS_CHECK if spares or spare_failed else SPARE_AFTER)
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                if time.monotonic() - last_request > IDLE_EXIT or not _containerd_alive(flags.address):
                    return 0
                if _stale(sources):
                    return 0
                if not spares and not spare_failed:  # idle: the next `start` will find a daemon waiting
                    spare = _make_spare(flags.address, own_environ, handler, [sock.fileno(), boot.fileno(), lock])
                    spares += [spare] if spare is not None else []
                    spare_failed = spare is None  # tried again after the next request
                continue
            last_request = time.monotonic()
            spare_failed = False
            with conn:
                try:
                    changed = _stale(sources)
                    if changed:
                        raise Stale(f"the shim's code changed on disk ({changed})")
                    _handle(conn, binary, flags.address, own_environ, handler,
                            [sock.fileno(), boot.fileno(), lock], spares)
                except Stale as exc:
                    log.info("warm template stepping aside: %s", exc)
                    _reply(conn, f"stale: {exc}")
                    return 0
                except Exception:
                    log.exception("warm template: a request failed")
                    _reply(conn, "error: see the template's log")
    except OSError:
        log.exception("warm template for containerd %s failed", flags.address)
        return 1
    finally:
        for spare in spares:
            spare.close()  # it sees the end of its channel and exits
        for p in (path, boot_socket(path), lock_path(path)):  # ours: we hold the lock
            try:
                os.unlink(p)
            except OSError:
                pass
        sock.close()
        boot.close()
        os.close(lock)


def _containerd_alive(address: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _reply(conn, text: str) -> None:
    try:
        conn.sendall(text.replace("\n", " ").encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def _check_listener(fd: int) -> None:
    """The handed-over fd must be a listening unix stream socket (the shim's)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError as exc:
        raise Refusal("request", "fd", f"not a socket ({exc.strerror})") from None
    try:
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM or not s.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise Refusal("request", f"fd of {s.family!r} {s.type!r}", "not a listening unix stream socket")
    finally:
        s.detach()


def _receive(conn) -> tuple[bytes, list[int]]:
    """One request: a 4-byte length, the body, and exactly one fd (closed again on any error)."""
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST + 4, 4)
    try:
        if len(fds) != 1:
            raise Refusal("request", f"{len(fds)} fds", "want the shim's listening socket and nothing else")
        if len(data) < 4:
            raise Refusal("request", f"{len(data)} bytes", "truncated")
        length = int.from_bytes(data[:4], "big")
        if length > MAX_REQUEST:
            raise Refusal("request", f"{length} bytes", f"longer than {MAX_REQUEST} bytes")
        body = data[4:]
        while len(body) < length:
            more = conn.recv(length - len(body))
            if not more:
                raise Refusal("request", f"{len(body)} of {length} bytes", "cut short")
            body += more
        if len(body) != length:
            raise Refusal("request", f"{len(body) - length} more bytes", "data after the request")
        _check_listener(fds[0])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return body, fds


def _handle(conn, binary: str, containerd_address: str, own_environ: dict[bytes, bytes], handler,
            template_fds: list[int], spares: list["Spare"]) -> None:
    """Serve one connection: check the peer, read and check its request, hand it to the spare daemon
    (`spares`, taken from the list) or fork its daemon; a `Refusal` is answered and audited, `Stale`
    and other errors go up to the loop."""
    conn.settimeout(REPLY_TIMEOUT)
    listen_fd = -1
    peer = request = None
    try:
        peer = read_peer(conn)
        peer_args = check_peer(peer, binary)
        difference = environment_difference(peer.environ, own_environ)
        if difference:
            raise Stale(f"containerd's environment changed ({difference}): a fresh template takes over")
        body, fds = _receive(conn)
        listen_fd = fds[0]
        request = parse_request(body, containerd_address, own_environ)
        match_request(request, peer, peer_args)
        if not peer.alive():
            raise Refusal("peer", peer.describe(), "exited during the check")
        peer.close()  # no daemon inherits the pidfd
        spare = spares.pop() if spares else None
        if spare is None or not _hand_to_spare(spare, conn, request, body, listen_fd):
            _fork_daemon(conn, request, listen_fd, handler, template_fds)
    except Refusal as refusal:
        logging.getLogger("kybernate.audit").warning(
            "AUDIT refused container=%s namespace=%s key=%s value=%s why=%s source=warm-template peer_pid=%s "
            "(nothing was started)", request.id if request else "-", request.namespace if request else "-",
            refusal.key, _short(refusal.value), refusal.why, peer.pid if peer else "?")
        _reply(conn, f"refused: {refusal}")
    finally:
        if peer is not None:
            peer.close()
        if listen_fd >= 0:
            os.close(listen_fd)


def _fork_daemon(conn, request: WarmRequest, listen_fd: int, handler, template_fds: list[int]) -> None:
    """Fork twice: the grandchild becomes the daemon, the child reports its pid and exits, so the
    daemon is nobody's child here (re-parented to containerd's subreaper or init), as an exec'd one."""
    preloaded = _loaded_modules()
    pid = os.fork()
    if pid == 0:  # child: fork the daemon, report its pid, vanish (the daemon is re-parented)
        try:
            daemon_pid = os.fork()
            if daemon_pid == 0:
                _become_daemon(request, listen_fd, [conn.fileno(), *template_fds], handler, preloaded)
            try:
                conn.sendall(f"{daemon_pid}\n".encode())
            except OSError:
                os.kill(daemon_pid, signal.SIGKILL)  # start gave up on us and went cold: one daemon per socket
                logging.getLogger("kybernate.warm").warning(
                    "warm template: start for %s gave up before the reply; daemon %d killed", request.id, daemon_pid)
            os._exit(0)
        except BaseException:
            logging.getLogger("kybernate.warm").exception("warm template: forking a daemon for %s failed", request.id)
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the fork for {request.id} exited with status {status:#x}")


_CMDLINE_KEEP: list = []  # the memory /proc/<pid>/cmdline points at after set_cmdline


_CMDLINE_TOOLS: list = []  # [libc, MmMap], made once by `_cmdline_tools`


def _cmdline_tools() -> list:
    """libc (sbrk, prctl typed) and the prctl_mm_map structure: made once, by the template before it
    forks (a ctypes Structure class and libc's function objects cost a forked daemon ~1 ms and two
    hundred copy-on-write faults to make)."""
    if not _CMDLINE_TOOLS:
        import ctypes

        class MmMap(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in (
                "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
                "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
                ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        libc.sbrk.argtypes = [ctypes.c_long]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _CMDLINE_TOOLS[:] = [libc, MmMap]
    return _CMDLINE_TOOLS


def set_cmdline(argv: list[str]) -> bool:
    """Make /proc/self/cmdline (ps, containerd tooling) show `argv` instead of the template's.

    A forked daemon would otherwise carry the template's command line (its ``warm`` action and the
    id of the container that spawned it). PR_SET_MM_MAP moves the kernel's argv window to a new
    buffer; unlike PR_SET_MM_ARG_START it needs no CAP_SYS_RESOURCE. Best effort: False on failure.
    """
    import ctypes
    import mmap

    try:
        libc, MmMap = _cmdline_tools()
        data = b"\0".join(a.encode() for a in argv) + b"\0"
        # private anonymous memory: the kernel reads cmdline with FOLL_ANON
        buf = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.write(data)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        field = lambda n: int(fields[n - 3])  # noqa: E731  (fields[0] is stat field 3)
        mm = MmMap(start_code=field(26), end_code=field(27), start_data=field(45), end_data=field(46),
                   start_brk=field(47), brk=libc.sbrk(0) or field(47), start_stack=field(28), arg_start=addr,
                   arg_end=addr + len(data), env_start=field(50), env_end=field(51), auxv=0, auxv_size=0,
                   exe_fd=0xFFFFFFFF)
        if libc.prctl(35, 14, ctypes.addressof(mm), ctypes.sizeof(mm), 0) != 0:  # PR_SET_MM, PR_SET_MM_MAP
            return False
        _CMDLINE_KEEP.append(buf)
        return True
    except (OSError, ValueError, AttributeError, IndexError):
        return False


_LOADED: frozenset[str] = frozenset()


def _loaded_modules() -> frozenset[str]:
    """The names of the modules loaded here (a daemon reports what it imports beyond them), made
    again only when there are more: a daemon that made the set itself would touch every name, and
    so copy every page that holds one (a few hundred page faults before it can serve)."""
    global _LOADED
    if len(_LOADED) != len(sys.modules):
        _LOADED = frozenset(sys.modules)
    return _LOADED


def _become_daemon(request: WarmRequest, listen_fd: int, close: list[int], handler,
                   preloaded: frozenset[str]) -> None:
    """In the grandchild: shed the template, become the daemon for `request`, never return."""
    code = 1
    try:
        _shed_template(close)
        code = _run_daemon(request, listen_fd, handler, preloaded)
    except BaseException:
        logging.getLogger("kybernate.warm").exception("warm template: daemon for %s failed to start", request.id)
    finally:
        os._exit(code if isinstance(code, int) else 1)


def _shed_template(close: list[int]) -> None:
    """In a fork that is to be a daemon: a session of its own, default signals, none of the template's
    descriptors in `close`, stdio on /dev/null."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
    for fd in close:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _run_daemon(request: WarmRequest, listen_fd: int, handler, preloaded: frozenset[str], loop=None) -> int:
    """The daemon for `request`: its bundle as cwd, its namespace, the shim's socket as fd 3, its own
    command line, then `shim.binary.daemon.run` (on `loop` when one was made ahead)."""
    os.chdir(request.bundle)
    if PER_SHIM_ENV in os.environb:
        os.environb[PER_SHIM_ENV] = os.fsencode(request.namespace)
    if listen_fd != 3:
        os.dup2(listen_fd, 3)
        os.close(listen_fd)
    flags = request.flags()
    argv = binary_command() + flags.daemon_args()
    sys.argv = list(argv)
    set_cmdline(argv)
    from shim.binary import daemon

    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()  # the daemon logs to its bundle's fifo; the template's file stays shut
    return daemon.run(flags, preloaded, loop)


# -- the spare: a daemon forked while the template is idle ----------------------------------------

class Spare:
    """A daemon forked ahead of time, as any daemon is (twice, so that it is nobody's child here), that
    has shed the template and made its event loop (and the thread its blocking work goes to), and
    waits on a private socketpair (no name anywhere: only the template holds the other end) for the
    one request it will serve. A `start` that finds one waits for no fork, and the daemon is serving
    sooner: on a 2-core node `start` took 21.7 ms instead of 24.0, and containerd's connection was
    accepted 2.3 ms after it exited instead of 6.1 (bench/results/cpu-restore). It exits when the
    channel closes unused (the template stepped aside, exited or was killed)."""

    def __init__(self, pid: int, pidfd: int, chan: socket.socket):
        self.pid, self.pidfd, self.chan = pid, pidfd, chan

    def take(self, body: bytes, listen_fd: int) -> bool:
        """Hand over a request the template has checked and the shim's socket; True once the spare
        said it took them (it checks the request again). Otherwise it is killed: one daemon per
        socket, and the caller forks one."""
        try:
            socket.send_fds(self.chan, [body], [listen_fd])
            answer = self.chan.recv(4096)
        except OSError as exc:
            answer = f"no answer ({exc.strerror or exc})".encode()
        if answer == b"ok":
            return True
        logging.getLogger("kybernate.warm").warning("warm template: spare daemon %d did not take a request: %s",
                                                    self.pid, answer.decode("utf-8", "replace")[:300])
        self.kill()
        return False

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        self.chan.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _hand_to_spare(spare: Spare, conn, request: WarmRequest, body: bytes, listen_fd: int) -> bool:
    """Serve a checked request with the spare: True when it took it and `start` has its pid."""
    try:
        if not spare.take(body, listen_fd):
            return False
        try:
            conn.sendall(f"{spare.pid}\n".encode())
        except OSError:
            spare.kill()  # start gave up on us and went cold: one daemon per socket
            logging.getLogger("kybernate.warm").warning(
                "warm template: start for %s gave up before the reply; daemon %d killed", request.id, spare.pid)
        return True
    finally:
        spare.close()


def _make_spare(containerd_address: str, own_environ: dict[bytes, bytes], handler,
                template_fds: list[int]) -> Optional[Spare]:
    """Fork a spare daemon (see `Spare`); None, logged, when that fails."""
    log = logging.getLogger("kybernate.warm")
    preloaded = _loaded_modules()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:  # child: fork the spare, vanish (the spare is re-parented, as a daemon is)
            try:
                if os.fork() == 0:
                    ours.close()  # the spare holds its own end only: it sees the template go
                    _spare(theirs, containerd_address, own_environ, handler, preloaded, template_fds)
                os._exit(0)
            except BaseException:
                log.exception("warm template: forking a spare daemon failed")
                os._exit(1)
        _, status = os.waitpid(pid, 0)
    except OSError:
        log.exception("warm template: forking a spare daemon failed")
        ours.close()
        return None
    finally:
        theirs.close()
    try:
        if status != 0:
            raise OSError(f"the fork exited with status {status:#x}")
        ours.settimeout(REPLY_TIMEOUT)
        spare_pid = int(ours.recv(64).decode().strip() or "0")  # once it shed the template
        pidfd = os.pidfd_open(spare_pid)
    except (OSError, ValueError) as exc:
        log.warning("warm template: no spare daemon: %s", exc)
        ours.close()
        return None
    return Spare(spare_pid, pidfd, ours)


def _spare(chan: socket.socket, containerd_address: str, own_environ: dict[bytes, bytes], handler,
           preloaded: frozenset[str], close: list[int]) -> None:
    """In the spare (the grandchild): shed the template, make the event loop, wait for the request,
    then become its daemon; never returns. Its command line says it is the spare until then."""
    import asyncio

    code = 0
    request = None
    try:
        _shed_template(close)
        if chan.fileno() == 3:  # the template's lock holds 3 while it forks: not reached, but fd 3 is the shim's
            moved = fcntl.fcntl(3, fcntl.F_DUPFD_CLOEXEC, 4)
            chan.detach()
            os.close(3)
            chan = socket.socket(fileno=moved)
        os.dup2(0, 3)  # fd 3 held for the shim's socket: the event loop's descriptors go above it
        set_cmdline(binary_command() + ["-address", containerd_address, SPARE_ACTION])
        loop = asyncio.new_event_loop()
        loop.run_in_executor(None, int)  # the default executor's thread, started now: no RPC waits for it
        chan.settimeout(None)
        chan.sendall(f"{os.getpid()}\n".encode())
        body, fds, _flags, _addr = socket.recv_fds(chan, MAX_REQUEST, 1)
        if not body:
            return  # the template is gone, or stepped aside: nothing to serve
        try:
            if len(fds) != 1:
                raise Refusal("request", f"{len(fds)} fds", "want the shim's listening socket and nothing else")
            _check_listener(fds[0])
            request = parse_request(body, containerd_address, own_environ)  # checked by the template; again
        except Refusal as refusal:
            chan.sendall(f"refused: {refusal}".encode())
            code = 1
            return
        chan.sendall(b"ok")
        chan.close()
        code = _run_daemon(request, fds[0], handler, preloaded, loop)
    except BaseException:
        logging.getLogger("kybernate.warm").exception("warm template: spare daemon%s failed",
                                                      f" for {request.id}" if request else "")
        code = 1
    finally:
        os._exit(code if isinstance(code, int) else 1)
