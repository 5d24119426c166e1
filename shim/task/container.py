"""A container: its bundle, rootfs, OCI runtime, init process and exec'd processes.

The Task service finds a Container and calls one method per RPC; each method checks the process's
state (`shim.task.process.transition`), does the runtime work (`shim.runtime.runc.Runc`) and records the new
state. Checkpoint and restore go through `shim.checkpoint.seam`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal as _signal
from typing import Any

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.gpu import lifecycle as gpu
from shim.checkpoint import seam as lifecycle
from shim.runtime import mount as mountlib
from shim.task.console import Console, ConsoleSocket
from shim.task.io import IOSetupError, ProcessIO, StdioPaths
from shim.task.process import ExecProcess, InitProcess, Op, Process, State
from shim.runtime.reaper import Reaper
from shim.runtime.runc import (RUNC_ROOT, Runc, RuntimeChoice, RuntimeCommandError, RuntimeSelectionError,
                          read_pid_file, select_runtime)

log = logging.getLogger("kybernate.shim")

# containerd's identifier rule (pkg/identifiers): alphanumerics separated by single . _ or -
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_ID_LENGTH = 76
INIT_PID_FILE = "init.pid"
STATE_FILE = "kybernate.json"
DELETED_MARK = "kybernate.deleted"


def validate_id(kind: str, value: str) -> None:
    """containerd's identifier rule; a path-like id (``../x``) must never reach a file name."""
    if not value:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{kind} id must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid {kind} id {value[:80]!r}: longer than {MAX_ID_LENGTH} characters")
    if not _ID_RE.match(value):
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"invalid {kind} id {value!r}: must be alphanumerics separated by single '.', '_' or '-'")


def runtime_error(err: RuntimeCommandError, what: str) -> TTRPCError:
    """A failed runtime command as the TTRPCError containerd sees (message names the container)."""
    if err.not_exist:
        return TTRPCError(Code.NOT_FOUND, f"{what}: {err}")
    return TTRPCError(Code.UNKNOWN, f"{what}: {err}")


def _uses_pid_namespace(spec: dict) -> bool:
    """Whether the container has its own pid namespace (then its processes die with its init)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "pid":
            return not ns.get("path")
    return False


def _parse_options(container_id: str, options_any):
    """The runtime options (runc's protobuf Options, or CRI's TOML for other runtime types)."""
    from shim.runtime.options import OptionsError, parse

    if options_any is None:
        return parse("", b"")
    try:
        opts = parse(options_any.type_url, options_any.value)
    except OptionsError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"create container {container_id}: {exc}") from exc
    if opts.source.startswith("ignored"):
        log.warning("container %s: %s", container_id, opts.source)
    return opts


class Container:
    def __init__(self, container_id: str, bundle: str, namespace: str, runtime: Runc, choice: RuntimeChoice,
                 spec: dict, rootfs: str, options: Any, reaper: Reaper):
        self.id = container_id
        self.bundle = bundle
        self.namespace = namespace
        self.runtime = runtime
        self.choice = choice
        self.spec = spec
        self.rootfs = rootfs  # mounted by us ("" when containerd passed no rootfs mounts)
        self.options = options
        self.reaper = reaper
        self.init: InitProcess | None = None
        self.execs: dict[str, ExecProcess] = {}
        self.lock = asyncio.Lock()
        self.cgroup = None
        self.oom_watcher = None
        self.restore_from: str = ""  # checkpoint image dir when created from a checkpoint
        self.checkpoint_settings = lifecycle.CheckpointSettings({}, None)  # set by create (annotations, options)
        self.parent_checkpoint: str = ""
        self.own_pid_namespace = _uses_pid_namespace(spec)

    # -- create --------------------------------------------------------------------------------
    @classmethod
    async def create(cls, req, namespace: str, reaper: Reaper) -> "Container":
        cid = req.id
        bundle = req.bundle
        if not bundle or not os.path.isabs(bundle):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"create container {cid}: bundle path {bundle!r} is not absolute")
        if not os.path.isdir(bundle):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"create container {cid}: bundle {bundle} is not a directory")
        try:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                spec = json.load(f)
            if not isinstance(spec, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"create container {cid}: invalid bundle {bundle}: config.json: {exc}") from exc
        options = _parse_options(cid, req.options if req.HasField("options") else None)
        try:
            choice = select_runtime(spec, options.binary_name, container_id=cid)
        except RuntimeSelectionError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"create container {cid}: {exc}") from exc
        log.info("container %s: OCI runtime %s (%s)", cid, choice.binary, choice.reason)
        root = os.path.join(options.root or RUNC_ROOT, namespace)
        runtime = Runc(reaper, binary=choice.binary, root=root, log_path=os.path.join(bundle, "log.json"),
                       systemd_cgroup=options.systemd_cgroup, criu_path=options.criu_path)
        _write_state(bundle, {"binary": choice.binary, "root": root, "systemd_cgroup": options.systemd_cgroup,
                              "criu_path": options.criu_path, "reason": choice.reason, "options": options.source})

        # checkpoint settings, restore source (checked), CRIU config: before anything is created
        settings, restore_image = lifecycle.prepare_create(req, spec, options, bundle)

        rootfs = ""
        mounted = False
        if len(req.rootfs):
            rootfs = os.path.join(bundle, "rootfs")
            try:
                os.makedirs(rootfs, mode=0o711, exist_ok=True)
                mountlib.mount_all([mountlib.Mount.from_proto(m) for m in req.rootfs], rootfs)
                mounted = True
            except OSError as exc:
                raise TTRPCError(Code.UNKNOWN, f"create container {cid}: mount rootfs: {exc}") from exc

        c = cls(cid, bundle, namespace, runtime, choice, spec, rootfs if mounted else "", options, reaper)
        c.checkpoint_settings = settings
        paths = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
        init = InitProcess(cid, cid, paths)
        c.init = init
        try:
            if restore_image:
                c.restore_from = restore_image
                c.parent_checkpoint = req.parent_checkpoint
                init.state = State.CREATED_CHECKPOINT  # the runtime restores it on Start (lifecycle.restore)
            else:
                await c._create_init(init)
        except BaseException:
            await c._cleanup_failed_create()
            raise
        gpu.prepare(c)  # a GPU bundle: load the CUDA driver in the background, before the first checkpoint
        return c

    async def _create_init(self, init: InitProcess) -> None:
        pid_file = os.path.join(self.bundle, INIT_PID_FILE)
        sock = None
        try:
            if init.paths.terminal:
                sock = ConsoleSocket()
            else:
                init.io = await self._make_io(init)
            try:
                await self.runtime.create(self.id, self.bundle, pid_file,
                                          stdio=init.io.child if init.io else None,
                                          console_socket=sock.path if sock else "",
                                          no_pivot=self.options.no_pivot_root,
                                          no_new_keyring=self.options.no_new_keyring)
            except RuntimeCommandError as exc:
                raise TTRPCError(Code.UNKNOWN, f"create container {self.id}: OCI runtime create failed: {exc.message or exc}") from exc
            await self._attach_io(init, sock)
            init.pid = read_pid_file(pid_file)
        finally:
            if sock is not None:
                sock.close()

    async def _make_io(self, proc: Process) -> ProcessIO:
        try:
            return await ProcessIO.create(proc.paths, proc.id, self.namespace, self.reaper,
                                          uid=self.options.io_uid, gid=self.options.io_gid)
        except IOSetupError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"set up IO of {proc.subject}: {exc}") from exc

    async def _attach_io(self, proc: Process, sock: ConsoleSocket | None) -> None:
        """After the runtime created the process: start copying its IO."""
        if sock is not None:
            try:
                master = await sock.receive_master()
                proc.console = Console(master, proc.paths, proc.id)
                proc.console.start()
            except (IOSetupError, OSError) as exc:
                raise TTRPCError(Code.UNKNOWN, f"console of {proc.subject}: {exc}") from exc
        elif proc.io is not None:
            proc.io.close_after_start()
            proc.io.start()

    async def _cleanup_failed_create(self) -> None:
        if self.init is not None:
            await self.init.close_io()
        try:
            await self.runtime.delete(self.id, force=True)
        except RuntimeCommandError:
            pass
        if self.rootfs:
            try:
                mountlib.unmount_recursive(self.rootfs)
            except OSError as exc:
                log.warning("container %s: unmount rootfs after failed create: %s", self.id, exc)

    # -- lookups ---------------------------------------------------------------------------------
    def process(self, exec_id: str) -> Process:
        if not exec_id:
            assert self.init is not None
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"process {exec_id} does not exist in container {self.id}")
        return p

    def running_execs(self) -> list[ExecProcess]:
        return [p for p in self.execs.values() if p.state is State.RUNNING and not p.has_exited]

    # -- operations ------------------------------------------------------------------------------
    async def start(self, exec_id: str) -> Process:
        p = self.process(exec_id)
        p.check(Op.START)
        if isinstance(p, InitProcess):
            if p.state is State.CREATED_CHECKPOINT:
                await lifecycle.restore(self)
            else:
                try:
                    await self.runtime.start(self.id)
                except RuntimeCommandError as exc:
                    raise runtime_error(exc, f"start container {self.id}: OCI runtime start failed") from exc
            p.apply(Op.START)
            return p
        await self._start_exec(p)
        return p

    async def _start_exec(self, p: ExecProcess) -> None:
        pid_file = os.path.join(self.bundle, f"{p.id}.pid")
        process_file = os.path.join(self.bundle, f".{p.id}.process.json")
        spec = dict(p.spec)
        spec["terminal"] = p.paths.terminal
        sock = None
        try:
            with open(process_file, "w") as f:
                json.dump(spec, f)
            if p.paths.terminal:
                sock = ConsoleSocket()
            else:
                p.io = await self._make_io(p)
            try:
                await self.runtime.exec(self.id, process_file, pid_file,
                                        stdio=p.io.child if p.io else None,
                                        console_socket=sock.path if sock else "")
            except RuntimeCommandError as exc:
                await p.close_io()
                p.set_exited(255)
                code = Code.NOT_FOUND if exc.not_exist else Code.UNKNOWN
                raise TTRPCError(code, f"start {p.subject}: OCI runtime exec failed: {exc.message or exc}") from exc
            await self._attach_io(p, sock)
            p.pid = read_pid_file(pid_file)
            p.apply(Op.START)
        finally:
            if sock is not None:
                sock.close()
            try:
                os.unlink(process_file)
            except OSError:
                pass

    def add_exec(self, exec_id: str, paths: StdioPaths, spec_any) -> ExecProcess:
        validate_id("exec", exec_id)
        if exec_id in self.execs:
            raise TTRPCError(Code.ALREADY_EXISTS, f"exec {exec_id} already exists in container {self.id}")
        assert self.init is not None
        self.init.check(Op.EXEC)
        if spec_any is None or not spec_any.value:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec {exec_id} in container {self.id}: no process spec")
        try:
            spec = json.loads(spec_any.value)
            if not isinstance(spec, dict) or not spec.get("args"):
                raise ValueError("process spec has no args")
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec {exec_id} in container {self.id}: invalid process spec: {exc}") from exc
        p = ExecProcess(self.id, exec_id, paths, spec)
        self.execs[exec_id] = p
        return p

    async def kill(self, exec_id: str, sig: int, all_processes: bool) -> None:
        p = self.process(exec_id)
        p.check(Op.KILL)
        if isinstance(p, InitProcess):
            try:
                await self.runtime.kill(self.id, sig, all=all_processes)
            except RuntimeCommandError as exc:
                if exc.not_running or exc.not_exist:
                    raise TTRPCError(Code.NOT_FOUND, f"kill container {self.id}: process already finished") from exc
                raise runtime_error(exc, f"kill container {self.id}") from exc
            return
        if p.has_exited or p.pid <= 0:
            raise TTRPCError(Code.NOT_FOUND, f"kill {p.subject}: process already finished")
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError as exc:
            raise TTRPCError(Code.NOT_FOUND, f"kill {p.subject}: process already finished") from exc
        except (OSError, ValueError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"kill {p.subject} with signal {sig}: {exc}") from exc

    async def delete_exec(self, exec_id: str) -> ExecProcess:
        p = self.process(exec_id)
        assert isinstance(p, ExecProcess)
        p.check(Op.DELETE)  # its output was drained by the caller, holding no lock (shim.task.io)
        await p.close_io()
        try:
            os.unlink(os.path.join(self.bundle, f"{p.id}.pid"))
        except OSError:
            pass
        p.apply(Op.DELETE)
        del self.execs[exec_id]
        return p

    async def delete(self) -> InitProcess:
        p = self.init
        assert p is not None
        p.check(Op.DELETE)  # its output was drained by the caller, holding no lock (shim.task.io)
        error: TTRPCError | None = None
        try:
            await self.runtime.delete(self.id, force=p.state is not State.STOPPED)
        except RuntimeCommandError as exc:
            # a checkpoint with exit, or a container never created in the runtime: nothing to delete
            if not exc.not_exist:
                error = runtime_error(exc, f"delete container {self.id}: OCI runtime delete failed")
        if error is not None and p.state is not State.STOPPED:
            raise error
        await p.close_io()
        for e in list(self.execs.values()):
            await e.close_io()
        self.close_watchers()
        if self.rootfs:
            try:
                mountlib.unmount_recursive(self.rootfs)
            except OSError as exc:
                error = error or TTRPCError(Code.UNKNOWN, f"delete container {self.id}: unmount rootfs: {exc}")
        p.apply(Op.DELETE)
        if error is not None:
            log.warning("%s", error.message)
        else:
            _mark_deleted(self.bundle)
        return p

    async def pause(self) -> None:
        p = self.init
        assert p is not None
        p.check(Op.PAUSE)
        async with gpu.pausing(self):  # CUDA processes suspended first: the freeze releases their VRAM
            try:
                await self.runtime.pause(self.id)
            except RuntimeCommandError as exc:
                raise runtime_error(exc, f"pause container {self.id}") from exc
        p.apply(Op.PAUSE)

    async def resume(self) -> None:
        p = self.init
        assert p is not None
        p.check(Op.RESUME)
        try:
            await self.runtime.resume(self.id)
        except RuntimeCommandError as exc:
            raise runtime_error(exc, f"resume container {self.id}") from exc
        await gpu.after_thaw(self)  # CUDA processes that Pause suspended
        p.apply(Op.RESUME)

    async def update(self, resources_any) -> None:
        p = self.init
        assert p is not None
        p.check(Op.UPDATE)
        if resources_any is None or not resources_any.value:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"update container {self.id}: no resources given")
        try:
            resources = json.loads(resources_any.value)
            if not isinstance(resources, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"update container {self.id}: resources are not OCI LinuxResources JSON: {exc}") from exc
        try:
            await self.runtime.update(self.id, json.dumps(resources).encode())
        except RuntimeCommandError as exc:
            raise runtime_error(exc, f"update container {self.id}") from exc

    async def pids(self) -> list[int]:
        p = self.init
        assert p is not None
        if p.state in (State.STOPPED, State.DELETED) or p.has_exited:
            return []
        try:
            return await self.runtime.ps(self.id)
        except RuntimeCommandError as exc:
            if self.cgroup is not None:
                try:
                    return self.cgroup.pids()
                except Exception:
                    pass
            raise runtime_error(exc, f"list processes of container {self.id}") from exc

    async def checkpoint(self, request) -> str:
        """Returns the checkpoint's image dir."""
        p = self.init
        assert p is not None
        p.check(Op.CHECKPOINT)
        return await lifecycle.checkpoint(self, request)

    async def kill_all(self) -> None:
        """SIGKILL everything left in the container (init exited and no pid namespace of its own)."""
        try:
            await self.runtime.kill(self.id, int(_signal.SIGKILL), all=True)
        except RuntimeCommandError as exc:
            log.debug("container %s: kill --all after init exit: %s", self.id, exc)

    def close_watchers(self) -> None:
        if self.oom_watcher is not None:
            self.oom_watcher.close()
            self.oom_watcher = None


def _mark_deleted(bundle: str) -> None:
    """Tell the `delete` action (containerd runs it after the shim exits) that nothing is left to force."""
    try:
        with open(os.path.join(bundle, DELETED_MARK), "w"):
            pass
    except OSError:
        pass


def _write_state(bundle: str, state: dict) -> None:
    path = os.path.join(bundle, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)
