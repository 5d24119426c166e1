"""The binary's lifecycle actions other than the daemon: ``start``, ``delete`` and ``-info``.

``start`` is on the critical path of every ``ctr run``: it imports only builtin modules (no protobuf,
no asyncio, not even ``socket`` or ``hashlib``). It binds the shim's socket, gets a daemon for it (a
fork of the warm template, see `shim.binary.warm`, else an exec of this binary without an action, in its own
session with the listening socket as fd 3), records the address in the bundle and prints it.

``delete`` is containerd's cleanup when the shim is gone (containerd 1.6+ also runs it after every
normal shim exit and waits for it): force-delete the container with the OCI runtime, unmount the
rootfs and report exit status 137, as containerd's runc shim does. When the daemon already deleted
the container cleanly it left a mark in the bundle, and there is nothing to force.

Imported by `cli` only; imports `warm` (lazily, in `start`) and never `cli` or `daemon` (the plan is
in `shim.binary.flags`).
"""
from __future__ import annotations

import os
import sys

from fsutil.atomic import atomic_write
from shim.binary.flags import RUNTIME_NAME, VERSION, Flags, binary_command
from shim.binary.sockets import EADDRINUSE, bind_unix, can_connect, remove_socket, socket_path
from shim.bundle import (ADDRESS_FILE, DELETED_MARK, INIT_PID_FILE, ROOTFS_DIR, RUNC_ROOT, SHIM_PID_FILE,
                         SPEC_FILE, STATE_FILE)

SOCKET_DIR = "/run/containerd/s"
# Annotations that put several containers on one shim (a Kubernetes pod), first match wins.
GROUP_ANNOTATIONS = (
    "io.containerd.kybernate.v1.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)


def _err(msg: str) -> None:
    sys.stderr.write(f"{RUNTIME_NAME}: {msg}\n")


def grouping_id(bundle: str, task_id: str) -> str:
    """The id the socket is named after: the pod's sandbox id when the bundle says so, else the task's."""
    try:
        with open(os.path.join(bundle, SPEC_FILE), "rb") as f:
            raw = f.read()
    except OSError:
        return task_id
    if not any(key.encode() in raw for key in GROUP_ANNOTATIONS):
        return task_id  # the common case: no JSON parsing on the hot path
    import json

    try:
        spec = json.loads(raw)
    except ValueError:
        return task_id
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    if isinstance(annotations, dict):
        for key in GROUP_ANNOTATIONS:
            value = annotations.get(key)
            if isinstance(value, str) and value:
                return value
    return task_id


def socket_address(containerd_address: str, namespace: str, group: str, debug: bool = False) -> str:
    """``unix:///run/containerd/s/<sha256 of address/namespace/group>`` as containerd's shims name it."""
    from shim.binary._digest import sha256

    path = os.path.normpath(os.path.join(containerd_address, namespace, group))
    if debug:
        path = os.path.join(path, "debug")
    return f"unix://{SOCKET_DIR}/{sha256(path.encode()).hexdigest()}"


def _daemon_argv(flags: Flags, action: str = "") -> list[str]:
    return binary_command() + flags.daemon_args(action)


def _spawn(argv: list[str], listen_fd: int | None, env=None) -> int:
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    if listen_fd is not None:
        if listen_fd == 3:
            os.set_inheritable(listen_fd, True)
        else:
            actions.append((os.POSIX_SPAWN_DUP2, listen_fd, 3))
    return os.posix_spawn(argv[0], argv, dict(os.environ) if env is None else env, file_actions=actions,
                          setsid=True)


def _start_daemon(flags: Flags, listen_fd: int) -> int:
    """A daemon serving `listen_fd`: forked by the warm template if there is one, else exec'd."""
    from shim.binary import warm

    if not warm.enabled():
        return _spawn(_daemon_argv(flags), listen_fd)
    path = warm.template_socket(flags.address, os.path.abspath(sys.argv[0]))
    pid = warm.request_daemon(path, warm.encode_request(flags, flags.bundle_path), listen_fd)
    if pid > 0:
        return pid
    pid = _spawn(_daemon_argv(flags), listen_fd)
    os.set_inheritable(listen_fd, False)  # the template must not hold this container's socket
    if not warm.template_coming(path):  # one template at a time (20 containers at once)
        try:
            # containerd's environment as it reached us (not Python's view of it, which may add
            # LC_CTYPE): the template compares it with each later `start`'s
            _spawn(_daemon_argv(flags, "warm"), None, warm.exec_environ())  # for the next container
        except OSError:
            pass
    return pid


def _join_cgroup(pid: int, cgroup: str) -> None:
    """Put the daemon into the cgroup containerd's config names (runtime option ShimCgroup)."""
    rel = cgroup.lstrip("/")
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2 unified
        targets = [os.path.join("/sys/fs/cgroup", rel, "cgroup.procs")]
    else:
        targets = []
        for entry in os.listdir("/sys/fs/cgroup"):
            d = os.path.join("/sys/fs/cgroup", entry)
            if os.path.islink(d) or not os.path.isdir(os.path.join(d, rel)):
                continue
            targets.append(os.path.join(d, rel, "cgroup.procs"))
        if not targets:
            raise OSError(2, f"cgroup {cgroup} not found in any hierarchy")
    for target in targets:
        with open(target, "w") as f:
            f.write(str(pid))


def _adjust_oom_score(pid: int) -> None:
    """The shim gets its parent's (containerd's) OOM score + 1, so the OOM killer takes it first."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj") as f:
            score = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except OSError:
        pass


def bootstrap_output(address: str, environ=None, parent_major: int | None = None) -> str:
    """What `start` prints: the bare address, or the bootstrap JSON when containerd takes version 3.

    containerd 1.6 reads only the bare address; 1.7 also parses JSON up to version 2; 2.x parses
    JSON up to version 3 (task API v3) and takes a bare address as version 2. 1.7 and 2.x both set
    MAX_SHIM_VERSION=2, so that variable cannot tell them apart: when it is there, the parent
    containerd's own version decides (`containerd_major`, cached per binary). A MAX_SHIM_VERSION of
    3 or more, or KYBERNATE_SHIM_API_VERSION=2|3, decides without asking.
    """
    env = os.environ if environ is None else environ
    forced = env.get("KYBERNATE_SHIM_API_VERSION", "")
    if forced in ("2", "3"):
        version = int(forced)
    else:
        try:
            version = int(env.get("MAX_SHIM_VERSION") or 0)
        except ValueError:
            version = 0
        if version == 2:
            major = containerd_major() if parent_major is None else parent_major
            version = 3 if major >= 2 else 2
    if version >= 3:
        return '{"version":3,"address":"%s","protocol":"ttrpc"}' % address
    return address


VERSION_CACHE_DIR = "/run/kybernate"


def containerd_major(pid: int | None = None) -> int:
    """The major version of the containerd that runs us (our parent), 0 when unknown.

    Asked once per containerd binary (``containerd --version``, ~20 ms) and cached in /run by the
    binary's identity (path, inode, size, mtime), so `start` pays a stat and a small read.
    """
    from shim.binary._digest import sha256

    ppid = os.getppid() if pid is None else pid
    try:
        exe = os.readlink(f"/proc/{ppid}/exe")
        st = os.stat(exe)
    except OSError:
        return 0
    if not os.path.basename(exe).startswith("containerd"):
        return 0
    key = sha256(f"{exe}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = os.path.join(VERSION_CACHE_DIR, f"containerd-major-{key}")
    try:
        with open(cache) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        pass
    major = _ask_version(exe)
    try:
        os.makedirs(VERSION_CACHE_DIR, mode=0o700, exist_ok=True)
        atomic_write(cache, str(major))
    except OSError:
        pass
    return major


def _ask_version(exe: str) -> int:
    """``containerd --version``: 'containerd github.com/containerd/containerd[/v2] 2.1.9 ...'."""
    import subprocess

    try:
        out = subprocess.run([exe, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=5).stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return 0
    parts = out.split()
    if len(parts) < 3:
        return 0
    head = parts[2].lstrip("v").split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def start(flags: Flags) -> int:
    if not flags.id:
        _err("start: -id is required")
        return 1
    bundle = flags.bundle_path
    group = grouping_id(bundle, flags.id)
    address = socket_address(flags.address, flags.namespace, group)
    try:
        listener = bind_unix(address)
    except OSError as exc:
        if exc.errno != EADDRINUSE:
            _err(f"start {flags.id}: create shim socket {address}: {exc}")
            return 1
        if can_connect(address):
            # a shim for this group (pod) is already serving: containerd talks to it
            atomic_write(os.path.join(bundle, ADDRESS_FILE), address, durable=False)
            sys.stdout.write(bootstrap_output(address))
            return 0
        try:
            os.unlink(socket_path(address))
            listener = bind_unix(address)
        except OSError as exc2:
            _err(f"start {flags.id}: create shim socket {address} after removing a stale one: {exc2}")
            return 1

    try:
        # the bundle is containerd's state dir (/run): its files are replaced atomically, not fsync'ed
        atomic_write(os.path.join(bundle, ADDRESS_FILE), address, durable=False)
        pid = _start_daemon(flags, listener.fileno())
    except OSError as exc:
        listener.close()
        remove_socket(address)
        _err(f"start {flags.id}: start shim daemon: {exc}")
        return 1
    listener.close()
    try:
        atomic_write(os.path.join(bundle, SHIM_PID_FILE), str(pid), durable=False)
        cgroup = _shim_cgroup_from_stdin()
        if cgroup:
            _join_cgroup(pid, cgroup)
        _adjust_oom_score(pid)
    except (OSError, ValueError) as exc:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        remove_socket(address)
        _err(f"start {flags.id}: {exc}")
        return 1
    sys.stdout.write(bootstrap_output(address))
    return 0


def _shim_cgroup_from_stdin() -> str:
    """ShimCgroup from the runtime options containerd writes on stdin ("" when it names none).

    Options that do not decode fail `start` with a ValueError naming them, as containerd's runc shim
    fails its start ("failed to read runtime options"): a ShimCgroup dropped in silence would leave the
    shim in containerd's cgroup. No stdin (a terminal, or nothing written, as for ``ctr run``) means no
    options, and then the options parser is not even imported (a millisecond of every `start`)."""
    try:
        if os.isatty(0):
            return ""
        data = os.read(0, 1 << 20)
    except OSError:
        return ""
    if not data:
        return ""
    from shim.runtime.options import OptionsError, parse_marshalled_any

    try:
        return parse_marshalled_any(data).shim_cgroup
    except OptionsError as exc:
        raise ValueError(f"runtime options on stdin do not decode ({len(data)} bytes): {exc}") from exc


def read_state(bundle: str) -> dict:
    import json

    try:
        with open(os.path.join(bundle, STATE_FILE)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def delete(flags: Flags) -> int:
    """Clean up after a shim that is gone; print a marshalled DeleteResponse (exit status 137)."""
    bundle = flags.bundle_path
    clean = os.path.exists(os.path.join(bundle, DELETED_MARK))
    if not clean:
        _force_delete(flags, bundle)
    pid = 0
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pass
    # the socket of a shim that died (SIGKILL) stays behind; remove it unless a shim still serves it
    try:
        with open(os.path.join(bundle, ADDRESS_FILE)) as f:
            address = f.read().strip()
        if address and not can_connect(address):
            remove_socket(address)
    except OSError:
        pass

    import time

    from shim.wire import delete_response

    sys.stdout.buffer.write(delete_response(pid, 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0


def _force_delete(flags: Flags, bundle: str) -> None:
    import subprocess

    from shim.runtime import mount

    state = read_state(bundle)
    binary = state.get("binary") or "runc"
    root = state.get("root") or os.path.join(RUNC_ROOT, flags.namespace)
    if flags.id:
        from shim.runtime.runc import kill_orphaned

        orphans = kill_orphaned(binary, root, flags.id)  # a dead shim's runc checkpoint/restore + CRIU
        if orphans:
            _err(f"delete {flags.id}: killed {binary} checkpoint/restore left running by the dead shim: {orphans}")
        cmd = [binary, "--root", root]
        if state.get("systemd_cgroup"):
            cmd.append("--systemd-cgroup")
        cmd += ["delete", "--force", flags.id]
        try:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 timeout=30)
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).decode(errors="replace").strip()
                if "does not exist" not in msg and "not found" not in msg:
                    _err(f"delete {flags.id}: {binary} delete --force: {msg}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _err(f"delete {flags.id}: {binary} delete --force: {exc}")
    try:
        mount.unmount_recursive(os.path.join(bundle, ROOTFS_DIR))
    except OSError as exc:
        _err(f"delete {flags.id}: unmount rootfs: {exc}")


def info(flags: Flags) -> int:
    """``-info`` (containerd 2.x introspection): a marshalled containerd.types.RuntimeInfo."""
    from shim.wire import runtime_info

    sys.stdout.buffer.write(runtime_info(RUNTIME_NAME, VERSION))
    sys.stdout.flush()
    return 0
