"""A warm template: an idle process with the daemon's modules already imported, forked per shim.

Why: a Python shim daemon needs ~250 ms of imports (asyncio, ttrpc, protobuf, the Task service)
before it can answer containerd's first Create, and that sits on the critical path of every
``ctr run``. The template pays it once. `start` sends it the shim's argv, working directory,
environment and the listening socket (SCM_RIGHTS); the template forks, the grandchild becomes the
daemon (new session, the bundle as cwd, stdio on /dev/null, the socket as fd 3) and its pid goes
back to `start`. When there is no template (or it is stale or busy) `start` spawns the daemon the
cold way (exec of this binary) and a template for the next container.

The template:
* is this same binary with the private action ``warm`` and containerd's ``-address`` (so tooling
  that looks for a containerd's shims finds it too);
* serves one containerd: its abstract socket's name hashes that containerd's address and this
  binary's path (abstract: nothing on disk to leak when the template is killed);
* answers only root (SO_PEERCRED), never runs an event loop or threads (so fork is safe), and never
  becomes a subreaper;
* refuses and exits when any of its loaded modules changed on disk (an upgraded shim must not fork
  old code), when its containerd is gone, or after `IDLE_EXIT` seconds without a request.
Disable with KYBERNATE_WARM=0 in containerd's environment.

`request_daemon` (used by `start`) imports only builtin modules.
"""
from __future__ import annotations

import os
import sys

IDLE_EXIT = 600.0
LIVENESS_CHECK = 15.0
REPLY_TIMEOUT = 2.0


def template_socket(containerd_address: str, binary: str) -> str:
    """The template's abstract socket name (no file to leak when the template is killed)."""
    from shim.binary._digest import sha256

    digest = sha256(f"kybernate-warm\0{containerd_address}\0{binary}".encode()).hexdigest()
    return f"\0kybernate-warm-{digest[:40]}"


def boot_socket(path: str) -> str:
    """Bound by a template from its first instant: "one is on its way, do not spawn another"."""
    return path + "-boot"


def enabled(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("KYBERNATE_WARM", "1") not in ("0", "false", "no", "off")


def request_daemon(path: str, argv: list[str], listen_fd: int) -> int:
    """Ask the template at `path` for a daemon; its pid, or 0 when there is no usable template."""
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(REPLY_TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            return 0
        body = encode_request(argv, os.getcwd(), os.environ)
        fds = listen_fd.to_bytes(4, sys.byteorder, signed=True)
        header = len(body).to_bytes(4, "big")
        s.sendmsg([header + body], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                return 0
            reply += chunk
        text = reply.decode().strip()
        return int(text) if text.isdigit() else 0
    except (OSError, ValueError):
        return 0
    finally:
        s.close()


def template_coming(path: str) -> bool:
    """Whether a template for `path` is running or starting (its boot socket answers)."""
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.setblocking(False)  # its backlog fills up (nobody accepts there): EAGAIN then, never block
    try:
        s.connect(boot_socket(path))
        return True
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.close()


MAGIC = b"KYBWARM1"


def encode_request(argv: list[str], cwd: str, env) -> bytes:
    """NUL-separated (no argv, path or environment string can hold a NUL): no json on the hot path."""
    parts = [MAGIC, os.fsencode(cwd), str(len(argv)).encode()]
    parts += [os.fsencode(a) for a in argv]
    parts += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"\0".join(parts)


def decode_request(body: bytes) -> tuple[list[str], str, dict[str, str]]:
    parts = body.split(b"\0")
    if len(parts) < 3 or parts[0] != MAGIC:
        raise ValueError("not a warm-template request")
    cwd = os.fsdecode(parts[1])
    n = int(parts[2])
    if n < 1 or len(parts) < 3 + n:
        raise ValueError("bad argv count")
    argv = [os.fsdecode(a) for a in parts[3:3 + n]]
    env = {}
    for item in parts[3 + n:]:
        k, sep, v = item.partition(b"=")
        if sep:
            env[os.fsdecode(k)] = os.fsdecode(v)
    return argv, cwd, env


# -- the template process ---------------------------------------------------------------------------

def _loaded_sources() -> dict[str, float]:
    """mtimes of every loaded module from this project, to notice an upgrade under our feet."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: shim/binary/warm.py
    out = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.startswith(root):
            try:
                out[f] = os.stat(f).st_mtime
            except OSError:
                pass
    return out


def _stale(sources: dict[str, float]) -> bool:
    for f, mtime in sources.items():
        try:
            if os.stat(f).st_mtime != mtime:
                return True
        except OSError:
            return True
    return False


def _preload() -> None:
    """Everything the daemon imports before it can serve Create, so a fork serves at once."""
    import asyncio  # noqa: F401
    import asyncio.unix_events  # noqa: F401

    import ttrpc  # noqa: F401
    from shim.task import container  # noqa: F401
    from shim.binary import daemon  # noqa: F401
    from shim.task import events  # noqa: F401
    from shim.checkpoint import seam as lifecycle  # noqa: F401
    from shim.task import service  # noqa: F401
    from proto.containerd.task.v3 import shim_pb2  # noqa: F401
    try:
        import shim.cgroups  # noqa: F401
    except Exception:
        pass


def serve(flags) -> int:
    """The ``warm`` action: become the template for containerd `flags.address`."""
    import socket
    import struct
    import time

    binary = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    path = template_socket(flags.address, binary)
    os.chdir("/")  # not the first container's bundle, which containerd removes
    os.closerange(3, 1 << 16)  # hold nothing of the `start` that spawned us (its shim's socket)
    boot = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        boot.bind(boot_socket(path))  # from the first instant: `start` spawns no second template
        boot.listen(1)
    except OSError:
        return 0  # another template is starting or running
    _preload()
    sources = _loaded_sources()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        return 0
    sock.listen(64)
    sock.settimeout(LIVENESS_CHECK)
    last_request = time.monotonic()
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                if time.monotonic() - last_request > IDLE_EXIT or not _containerd_alive(flags.address):
                    return 0
                if _stale(sources):
                    return 0
                continue
            last_request = time.monotonic()
            with conn:
                if _peer_uid(conn, struct) != 0:  # abstract sockets have no file permissions
                    continue
                if _stale(sources):
                    return 0  # the client falls back to a cold start (and a fresh template)
                try:
                    _handle(conn, [sock.fileno(), boot.fileno()])
                except Exception:
                    continue
    finally:
        sock.close()
        boot.close()


def _containerd_alive(address: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _peer_uid(conn, struct) -> int:
    import socket

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _handle(conn, template_fds: list[int]) -> None:
    import socket

    conn.settimeout(REPLY_TIMEOUT)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 1)
    try:
        if len(data) < 4 or not fds:
            return
        length = int.from_bytes(data[:4], "big")
        body = data[4:]
        while len(body) < length:
            more = conn.recv(length - len(body))
            if not more:
                return
            body += more
        argv, cwd, env = decode_request(body)
    except ValueError:
        for fd in fds:
            os.close(fd)
        return
    listen_fd = fds[0]
    for fd in fds[1:]:
        os.close(fd)
    pid = os.fork()
    if pid == 0:  # child: fork the daemon, report its pid, vanish (the daemon is re-parented)
        try:
            daemon_pid = os.fork()
            if daemon_pid == 0:
                _become_daemon(argv, cwd, env, listen_fd, [conn.fileno(), *template_fds])
            try:
                conn.sendall(f"{daemon_pid}\n".encode())
            except OSError:
                os.kill(daemon_pid, 9)  # start gave up on us and went cold: one daemon per socket
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(listen_fd)
    os.waitpid(pid, 0)


_CMDLINE_KEEP: list = []  # the memory /proc/<pid>/cmdline points at after set_cmdline


def set_cmdline(argv: list[str]) -> bool:
    """Make /proc/self/cmdline (ps, containerd tooling) show `argv` instead of the template's.

    A forked daemon would otherwise carry the template's command line (its ``warm`` action and the
    id of the container that spawned it). PR_SET_MM_MAP moves the kernel's argv window to a new
    buffer; unlike PR_SET_MM_ARG_START it needs no CAP_SYS_RESOURCE. Best effort: False on failure.
    """
    import ctypes
    import mmap

    class MmMap(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
            "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
            ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        libc.sbrk.argtypes = [ctypes.c_long]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
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


def _become_daemon(argv: list[str], cwd: str, env: dict, listen_fd: int, close: list[int]) -> None:
    import signal

    code = 1
    try:
        os.setsid()
        for fd in close:
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if listen_fd != 3:
            os.dup2(listen_fd, 3)
            os.close(listen_fd)
        if null > 3:
            os.close(null)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        sys.argv = list(argv)
        set_cmdline(argv)
        from shim.binary.cli import main

        code = main(argv[1:])
    finally:
        os._exit(code if isinstance(code, int) else 1)
