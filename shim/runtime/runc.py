"""The OCI runtime's command line (`Runc`: runc, and runc-compatible runtimes such as
nvidia-container-runtime). Which binary a container gets is `shim.runtime.select`'s question.

Every runtime command is spawned with ``posix_spawn`` and its exit is awaited through the shim's
`Reaper` (registered right after the spawn, in the event loop thread, so the SIGCHLD handler cannot
run in between). Nothing here calls waitpid.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from shim.bundle import RUNC_ROOT
from shim.runtime.reaper import Reaper
from shim.runtime.select import DEFAULT_BINARY

DEFAULT_DEADLINE_S = 120.0  # any runc command but checkpoint/restore (those: node config, criu.*_timeout_s)


class RuntimeCommandError(Exception):
    """A runtime command failed; `message` is the runtime's own error sentence when it gave one."""

    def __init__(self, command: str, status: int, message: str, timed_out: bool = False):
        self.command = command
        self.status = status
        self.message = message
        self.timed_out = timed_out
        super().__init__(f"{command}: {message or f'exit status {status}'}")

    @property
    def not_exist(self) -> bool:
        m = self.message.lower()
        return "does not exist" in m or "not found" in m or "no such container" in m

    @property
    def not_running(self) -> bool:
        m = self.message.lower()
        return "not running" in m or "no such process" in m or "process already finished" in m


@dataclass
class Stdio:
    """File descriptors the runtime process gets as 0, 1, 2 (None: /dev/null)."""
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


async def _read_fd(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done = loop.create_future()

    def readable() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            chunks.append(data)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


@dataclass
class CommandResult:
    status: int
    stdout: bytes
    stderr: bytes


class CommandDeadlineExceeded(Exception):
    """The command outlived its deadline: its whole process group was killed (SIGKILL)."""

    def __init__(self, argv: Sequence[str], pid: int, timeout: float, status: int):
        self.argv, self.pid, self.timeout, self.status = list(argv), pid, timeout, status
        super().__init__(f"{os.path.basename(argv[0])} {argv[-1] if argv else ''}: no exit within {timeout:g} s; "
                         f"process group {pid} killed")


async def run_command(reaper: Reaper, argv: Sequence[str], stdio: Stdio | None = None,
                      input: bytes | None = None, capture: bool = True,
                      env: Mapping[str, str] | None = None, timeout: float | None = None,
                      on_spawn=None) -> CommandResult:
    """Spawn argv, await its exit through the reaper. stdout/stderr captured unless stdio names fds.

    With a timeout the command runs in a process group of its own (runc and the CRIU it runs), which
    is SIGKILLed as a whole when the deadline passes: CommandDeadlineExceeded. on_spawn(pid) is told
    the pid (the group), so that a caller can kill a command in flight (a stuck restore)."""
    stdio = stdio or Stdio()
    actions: list[tuple] = []
    close_after: list[int] = []
    readers: list[asyncio.Task] = []
    out_r = err_r = None
    try:
        if input is not None:
            mfd = os.memfd_create("kybernate-stdin", os.MFD_CLOEXEC)
            close_after.append(mfd)
            os.write(mfd, input)
            os.lseek(mfd, 0, os.SEEK_SET)
            actions.append((os.POSIX_SPAWN_DUP2, mfd, 0))
        elif stdio.stdin is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdio.stdin, 0))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        for target, fd in ((1, stdio.stdout), (2, stdio.stderr)):
            if fd is not None:
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
            elif capture:
                r, w = os.pipe2(os.O_CLOEXEC)
                close_after.append(w)
                actions.append((os.POSIX_SPAWN_DUP2, w, target))
                if target == 1:
                    out_r = r
                else:
                    err_r = r
            else:
                actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_WRONLY, 0))
        environ = dict(os.environ if env is None else env)
        pid = os.posix_spawnp(argv[0], list(argv), environ, file_actions=actions,
                              setpgroup=0 if timeout is not None else None)
        waiter = reaper.watch(pid)
    except BaseException:
        for fd in close_after + [x for x in (out_r, err_r) if x is not None]:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    for fd in close_after:
        os.close(fd)
    if out_r is not None:
        readers.append(asyncio.ensure_future(_read_fd(out_r)))
    if err_r is not None:
        readers.append(asyncio.ensure_future(_read_fd(err_r)))
    if on_spawn is not None:
        on_spawn(pid)
    if timeout is None:
        ex = await waiter
    else:
        try:
            ex = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            ex = await waiter
            for r in readers:  # a grandchild may still hold a pipe: do not wait for it
                r.cancel()
            raise CommandDeadlineExceeded(argv, pid, timeout, ex.status) from None
    outputs = [await r for r in readers]
    stdout = outputs[0] if out_r is not None else b""
    stderr = outputs[-1] if err_r is not None else b""
    return CommandResult(ex.status, stdout, stderr)


def last_runtime_error(log_path: str, since: int = 0) -> str:
    """The last error message runc logged (JSON log) after byte offset `since`."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            data = f.read()
    except OSError:
        return ""
    message = ""
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message


@dataclass
class Runc:
    """runc's command line (and that of runc-compatible runtimes such as nvidia-container-runtime)."""
    reaper: Reaper
    binary: str = DEFAULT_BINARY
    root: str = RUNC_ROOT
    log_path: str = ""
    systemd_cgroup: bool = False
    criu_path: str = ""
    extra_env: dict = field(default_factory=dict)
    #: seconds each command may run before its process group is killed: op -> deadline, else default
    deadlines: dict = field(default_factory=dict)
    default_deadline: float = DEFAULT_DEADLINE_S
    #: pids (= process groups) of commands in flight, by op: a stuck restore can be killed
    inflight: dict = field(default_factory=dict)

    def kill_inflight(self, op: str) -> bool:
        """SIGKILL the process group of a command in flight (e.g. a restore stuck in CRIU)."""
        pid = self.inflight.get(op)
        if not pid:
            return False
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def _args(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if self.log_path:
            argv += ["--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if self.criu_path:
            argv += ["--criu", self.criu_path]
        argv.extend(args)
        return argv

    def _log_offset(self) -> int:
        try:
            return os.stat(self.log_path).st_size if self.log_path else 0
        except OSError:
            return 0

    async def _run(self, op: str, *args: str, stdio: Stdio | None = None, input: bytes | None = None,
                   capture: bool = True) -> CommandResult:
        offset = self._log_offset()
        argv = self._args(*args)
        timeout = self.deadlines.get(op, self.default_deadline)
        try:
            res = await run_command(self.reaper, argv, stdio=stdio, input=input, capture=capture,
                                    env={**os.environ, **self.extra_env} if self.extra_env else None,
                                    timeout=timeout, on_spawn=lambda pid: self.inflight.__setitem__(op, pid))
        except OSError as exc:
            raise RuntimeCommandError(f"{os.path.basename(self.binary)} {op}", -1, f"cannot run {self.binary}: {exc}") from exc
        except CommandDeadlineExceeded as exc:
            raise RuntimeCommandError(f"{os.path.basename(self.binary)} {op}", exc.status,
                                      f"no answer within its deadline of {timeout:g} s: runc and CRIU (process "
                                      f"group {exc.pid}) were killed", timed_out=True) from exc
        finally:
            self.inflight.pop(op, None)
        if res.status != 0:
            msg = ""
            if self.log_path:
                msg = last_runtime_error(self.log_path, offset)
            if not msg:
                msg = (res.stderr or res.stdout).decode(errors="replace").strip()
                # runc prints `time=... level=error msg="..."` on stderr when no log file is set
                if 'msg="' in msg:
                    msg = msg.rsplit('msg="', 1)[1].rsplit('"', 1)[0]
            raise RuntimeCommandError(f"{os.path.basename(self.binary)} {op}", res.status, msg)
        return res

    async def create(self, container_id: str, bundle: str, pid_file: str, stdio: Stdio | None = None,
                     console_socket: str = "", no_pivot: bool = False, no_new_keyring: bool = False) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        args.append(container_id)
        await self._run("create", *args, stdio=stdio, capture=False)

    async def run_args(self, op: str, args: Sequence[str], stdio: Stdio | None = None,
                       capture: bool = True) -> None:
        """A command line built elsewhere (criu.plans for checkpoint/restore), global flags prepended.
        capture=False for commands whose stdio a container process inherits (restore)."""
        await self._run(op, *args, stdio=stdio, capture=capture and stdio is None)

    async def start(self, container_id: str) -> None:
        await self._run("start", "start", container_id)

    async def exec(self, container_id: str, process_file: str, pid_file: str, stdio: Stdio | None = None,
                   console_socket: str = "") -> None:
        args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        args.append(container_id)
        await self._run("exec", *args, stdio=stdio, capture=False)

    async def kill(self, container_id: str, signal: int, all: bool = False) -> None:
        args = ["kill"]
        if all:
            args.append("--all")
        args += [container_id, str(signal)]
        await self._run("kill", *args)

    async def delete(self, container_id: str, force: bool = False) -> None:
        args = ["delete"]
        if force:
            args.append("--force")
        args.append(container_id)
        await self._run("delete", *args)

    async def pause(self, container_id: str) -> None:
        await self._run("pause", "pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self._run("resume", "resume", container_id)

    async def ps(self, container_id: str) -> list[int]:
        res = await self._run("ps", "ps", "--format", "json", container_id)
        try:
            pids = json.loads(res.stdout or b"[]")
        except ValueError as exc:
            raise RuntimeCommandError("runc ps", 0, f"unparseable output {res.stdout[:200]!r}") from exc
        return [int(p) for p in (pids or [])]

    async def state(self, container_id: str) -> dict:
        res = await self._run("state", "state", container_id)
        return json.loads(res.stdout)

    async def update(self, container_id: str, resources_json: bytes) -> None:
        await self._run("update", "update", "--resources", "-", container_id, input=resources_json)


def read_pid_file(path: str) -> int:
    with open(path) as f:
        data = f.read().strip()
    if not data:
        raise OSError(errno.ENODATA, f"pid file {path} is empty")
    return int(data)


def kill_orphaned(binary: str, root: str, container_id: str, proc: str = "/proc", wait_s: float = 3.0) -> list[int]:
    """After a shim died mid-checkpoint or mid-restore, its ``runc checkpoint``/``restore`` (and their
    CRIU) run on without anyone to wait for them or to enforce their deadline, holding runc's lock on
    the container (so ``runc delete --force`` blocks behind them) and maybe its freeze. Kill them:
    processes of `binary` (by name) whose argv is ``... --root ROOT ... checkpoint|restore ... ID``
    with this root and id; a command that leads its own process group (the shim starts every
    deadline-bound command so, CRIU in it) is killed with its group. Waits up to `wait_s` for them to
    be gone. Returns the pids killed. Called by the shim binary's `delete` (containerd's cleanup of a
    dead shim): its flags name the container, the state file the runtime and root."""
    name = os.path.basename(binary)
    want_root = os.path.realpath(root)
    killed = []
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return killed
    for entry in entries:
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not args or os.path.basename(args[0]) != name or args[-1] != container_id:
            continue
        if "--root" not in args or not any(a in ("checkpoint", "restore") for a in args):
            continue
        i = args.index("--root")
        if i + 1 >= len(args) or os.path.realpath(args[i + 1]) != want_root:
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + wait_s
    while killed and time.monotonic() < deadline and any(os.path.exists(os.path.join(proc, str(p))) for p in killed):
        time.sleep(0.05)
    return killed
