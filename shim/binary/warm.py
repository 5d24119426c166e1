"""The warm template, as `start` sees it: where it listens, how to ask it for a daemon.

Why a template: a Python shim daemon needs ~250 ms of imports (asyncio, ttrpc, protobuf, the Task
service) before it can answer containerd's first Create, and that sits on the critical path of
every ``ctr run``. A template (`shim.binary.template`) pays it once and forks a daemon per shim
(ahead of time, while idle: a spare daemon waits for the next request).
`start` sends it a fixed request (containerd's flags for the new shim, `encode_request`) and the
shim's listening socket (SCM_RIGHTS) and gets the daemon's pid back. When there is no template (or
it is stale, busy or refuses) `start` spawns the daemon the cold way (exec of this binary) and a
template for the next container. Disable it with KYBERNATE_WARM=0 in containerd's environment.

Where: a filesystem socket ``WARM_DIR/<digest>.sock`` (default ``/run/kybernate/warm``; the digest
hashes containerd's address and this binary's path, one template per containerd and installed
copy), never an abstract socket: those belong to the network namespace, where a ``--net-host``
container finds them in ``/proc/net/unix``. Before it hands its socket over, `start` checks that
the directory is root's and private (`dir_problem`) and that the process listening there is root
in `start`'s own mount namespace; anything else gets nothing, and `start` goes cold. What the
template checks in turn is in `shim.binary.template`.

Imported by `manager` on the hot path of `start`: builtin modules only, no ``socket``, no logging.
Imports only `flags` and `_digest` (the plan is drawn in `shim.binary.flags`).
"""
from __future__ import annotations

import os
import sys

from shim.binary.flags import Flags

WARM_DIR = "/run/kybernate/warm"
REPLY_TIMEOUT = 2.0

MAGIC = b"KYBWARM2"
# The request: containerd's flags for the new shim and the two addresses containerd puts in the
# environment of every shim. Nothing else is accepted.
REQUEST_FIELDS = ("namespace", "id", "address", "publish-binary", "bundle", "debug", "TTRPC_ADDRESS",
                  "GRPC_ADDRESS")
S_IFMT, S_IFDIR = 0o170000, 0o040000  # stat's, without importing it


def template_socket(containerd_address: str, binary: str) -> str:
    """The template's socket: one per containerd address and shim binary, in `WARM_DIR`."""
    from shim.binary._digest import sha256

    digest = sha256(f"kybernate-warm\0{containerd_address}\0{binary}".encode()).hexdigest()
    return os.path.join(WARM_DIR, digest[:40] + ".sock")


def _sibling(path: str, suffix: str) -> str:
    return (path[:-5] if path.endswith(".sock") else path) + suffix


def boot_socket(path: str) -> str:
    """Bound by a template from its first instant: "one is on its way, do not spawn another"."""
    return _sibling(path, ".boot")


def lock_path(path: str) -> str:
    return _sibling(path, ".lock")


def log_path(path: str) -> str:
    """Where the template of socket `path` logs (refusals as audit lines, failures)."""
    return _sibling(path, ".log")


def enabled(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("KYBERNATE_WARM", "1") not in ("0", "false", "no", "off")


def dir_problem(path: str) -> str:
    """Why `path` is no directory the template may trust, or "" when it is one.

    `path` must be a directory (not a link) owned by root without group/other bits; its parent a
    directory owned by root that group and other cannot write. Two lstat calls: cheap enough for
    `start`."""
    for d, forbidden in ((os.path.dirname(path), 0o022), (path, 0o077)):
        try:
            st = os.lstat(d)
        except OSError as exc:
            return f"{d}: {exc.strerror}"
        if st.st_mode & S_IFMT != S_IFDIR:
            return f"{d} is not a directory"
        if st.st_uid != 0:
            return f"{d} is owned by uid {st.st_uid}, not root"
        if st.st_mode & forbidden:
            return f"{d} has mode {st.st_mode & 0o7777:04o} (group/other bits {forbidden:03o} must be clear)"
    return ""


# -- the client: `start` asks for a daemon (hot path: builtin modules only) --------------------------

def encode_request(flags: Flags, bundle: str, environ=None) -> bytes:
    """The fixed request for a daemon of `flags`: NUL-separated ``key=value`` (no json on the hot path)."""
    env = os.environ if environ is None else environ
    fields = (("namespace", flags.namespace), ("id", flags.id), ("address", flags.address),
              ("publish-binary", flags.publish_binary), ("bundle", bundle),
              ("debug", "1" if flags.debug else "0"), ("TTRPC_ADDRESS", env.get("TTRPC_ADDRESS", "")),
              ("GRPC_ADDRESS", env.get("GRPC_ADDRESS", "")))
    return b"\0".join([MAGIC] + [os.fsencode(f"{k}={v}") for k, v in fields])


def exec_environ(pid: int | str = "self") -> dict[bytes, bytes]:
    """The environment process `pid` was exec'd with (Python adds LC_CTYPE to its own view of it
    when it coerces the C locale; /proc keeps what the process was given)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read(1 << 20)
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env.setdefault(key, value)  # the first of duplicates wins, as in Python's os.environ
    return env


def peer_creds(sock) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket."""
    import _socket

    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[0:4], sys.byteorder), int.from_bytes(raw[4:8], sys.byteorder)


def same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def request_daemon(path: str, request: bytes, listen_fd: int) -> int:
    """Ask the template at `path` for a daemon; its pid, or 0 when there is no usable template.

    The shim's listening socket goes only to a root process of this mount namespace listening in a
    safe directory: anything else gets nothing, and `start` goes cold."""
    import _socket

    if dir_problem(os.path.dirname(path)):
        return 0
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(REPLY_TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            return 0
        pid, uid = peer_creds(s)
        if uid != 0 or not same_file(f"/proc/{pid}/ns/mnt", "/proc/self/ns/mnt"):
            return 0
        fds = listen_fd.to_bytes(4, sys.byteorder, signed=True)
        header = len(request).to_bytes(4, "big")
        s.sendmsg([header + request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                return 0
            reply += chunk
        text = reply.decode(errors="replace").strip()
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
