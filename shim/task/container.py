"""A container: its bundle, rootfs, OCI runtime, init process and exec'd processes.

The Task service finds a Container and calls one method per RPC; each method finds the process and
hands the operation to its current state (`shim.task.process`), which refuses it or calls back here
for the runtime work (`shim.runtime.runc.Runc`; the methods under "mechanics", `ContainerOps`) and
moves the process on. Checkpoint and restore go through `shim.checkpoint.seam`; pause, resume,
checkpoint and restore call the container's layer stack (`shim.checkpoint.layer`: the plain CRIU path,
with the GPU layer on top for a container that has GPUs), chosen once at Create. The seam and the
layers get a `TaskHandle`, never the container.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal as _signal
from typing import Any, Optional

from fsutil.atomic import atomic_write
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.checkpoint import seam
from shim.checkpoint.layer import LifecycleLayer, PlainLayer, TaskHandle, describe_layers
from shim.checkpoint.profile import StageProfile
from shim.checkpoint.settings import CheckpointSettings
from shim.gpu import lifecycle as gpu_lifecycle
from shim.policy.node import NodeConfig, NodeConfigError
from shim.bundle import DELETED_MARK, INIT_PID_FILE, STATE_FILE
from shim.runtime import mount as mountlib
from shim.task.console import Console, ConsoleSocket
from shim.task.io import IOSetupError, ProcessIO, StdioPaths
from shim.task.process import ExecProcess, InitProcess, Process
from shim.runtime.reaper import Exit, Reaper
from shim.runtime.runc import RUNC_ROOT, Runc, RuntimeCommandError, read_pid_file
from shim.runtime.select import RuntimeChoice, RuntimeSelectionError, select_runtime

log = logging.getLogger("kybernate.shim")

# containerd's identifier rule (pkg/identifiers): alphanumerics separated by single . _ or -
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_ID_LENGTH = 76


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
                 spec: dict, rootfs: str, options: Any, reaper: Reaper, layer: LifecycleLayer | None = None):
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
        self.checkpoint_settings = CheckpointSettings({}, None)  # set by create (annotations, options)
        self.parent_checkpoint: str = ""
        self.restore_profile: Optional[StageProfile] = None  # a container created from a checkpoint
        self.own_pid_namespace = _uses_pid_namespace(spec)
        self.layer: LifecycleLayer = layer or PlainLayer()
        self.handle = TaskHandle(container_id, namespace, bundle, spec, runtime, self._init_pid)
        self.exec_wait_s = 0.0   # how long an exec's Start waits for a paused container's resume (node config)
        self.broker_socket = ""  # the node broker's socket: the wait applies only while a broker serves

    def _init_pid(self) -> int:
        return self.init.pid if self.init is not None else 0

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
            node = NodeConfig.load()
        except NodeConfigError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"create container {cid}: {exc}") from exc
        try:
            choice = select_runtime(spec, node, options.binary_name, container_id=cid, namespace=namespace)
        except RuntimeSelectionError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"create container {cid}: {exc}") from exc
        log.info("container %s: OCI runtime %s (%s)", cid, choice.binary, choice.reason)
        root = os.path.join(options.root or RUNC_ROOT, namespace)
        runtime = Runc(reaper, binary=choice.binary, root=root, log_path=os.path.join(bundle, "log.json"),
                       systemd_cgroup=options.systemd_cgroup, criu_path=options.criu_path,
                       deadlines={"checkpoint": node.checkpoint_timeout_s, "restore": node.restore_timeout_s})
        _write_state(bundle, {"binary": choice.binary, "root": root, "systemd_cgroup": options.systemd_cgroup,
                              "criu_path": options.criu_path, "reason": choice.reason, "options": options.source})

        # checkpoint settings, restore source (checked), CRIU config: before anything is created
        profile = StageProfile("restore", cid)  # kept only for a restore: where its time went
        settings, restore_image = await seam.prepare_create(req, spec, options, bundle, node, namespace, profile)
        # the layer stack, once: a malformed GPU annotation refuses the Create here
        layer = gpu_lifecycle.stack(PlainLayer(), cid, spec, has_gpus=choice.gpu, restore_image=restore_image,
                                    libcuda=node.libcuda, granted=choice.request)
        log.info("container %s: lifecycle layers: %s", cid, describe_layers(layer))

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

        c = cls(cid, bundle, namespace, runtime, choice, spec, rootfs if mounted else "", options, reaper, layer)
        c.checkpoint_settings = settings
        c.exec_wait_s = node.broker_exec_wait_s
        c.broker_socket = node.broker_socket
        c.restore_profile = profile if restore_image else None
        paths = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
        # created from a checkpoint: nothing in the runtime until Start restores it (`restore_init`)
        init = InitProcess(cid, cid, paths, restore_from=restore_image)
        c.init = init
        try:
            if restore_image:
                c.parent_checkpoint = req.parent_checkpoint
            else:
                await c._create_init(init)
        except BaseException:
            await c._cleanup_failed_create()
            raise
        c.layer.prepare(c.handle)  # the GPU layer loads the CUDA driver in the background now
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

    async def restore_init(self, init: InitProcess, image_dir: str) -> None:
        """Start of a container created from a checkpoint: the seam restores `image_dir` with this task's
        IO (pipes, or the console socket); then the IO is attached and the layer's after_restore runs.
        Any failure undoes the whole restore (`_undo_restore`)."""
        sock = ConsoleSocket() if init.paths.terminal else None
        try:
            if sock is None:
                init.io = await self._make_io(init)
            profile = self.restore_profile or StageProfile("restore", self.id)
            pid = await seam.restore(self.handle, self.layer, image_dir, self.checkpoint_settings,
                                     stdio=init.io.child if init.io else None,
                                     console_socket=sock.path if sock else None,
                                     terminal=init.paths.terminal, no_pivot=self.options.no_pivot_root,
                                     profile=profile)
            with profile.stage("io.attach"):
                await self._attach_io(init, sock)
            init.pid = pid
            with profile.stage(f"{self.layer.name}.after"):
                await self.layer.after_restore(self.handle, image_dir)
            log.info("%s", profile.line())
        except BaseException:
            await self._undo_restore()
            raise
        finally:
            if sock is not None:
                sock.close()

    async def _undo_restore(self) -> None:
        """A restore that failed leaves no process, runc state, cgroup or mount: CRIU kills what it
        restored, ``runc delete --force`` removes its state and cgroups, the rootfs is unmounted; the init
        process is marked stopped (status 255) so that containerd's Delete has nothing left to do."""
        init = self.init
        assert init is not None
        await init.close_io()
        # runc restore bind-mounts the rootfs at <runc root>/<id>/criu-root; killed half-way it leaves the
        # mount, and runc delete's RemoveAll would walk into the rootfs through it: unmount it first
        state = os.path.join(self.runtime.root, self.id)
        await asyncio.to_thread(mountlib.unmount_recursive, state)
        try:
            await self.runtime.delete(self.id, force=True)
        except RuntimeCommandError as exc:
            if not exc.not_exist:
                log.warning("container %s: runc delete after failed restore: %s", self.id, exc)
        # runc without a state.json (killed before writing it) removes its dir but not the cgroups
        await asyncio.to_thread(self._remove_half_made_runtime_state, state)
        if self.rootfs:
            try:
                await asyncio.to_thread(mountlib.unmount_recursive, self.rootfs)
                self.rootfs = ""
            except OSError as exc:
                log.warning("container %s: unmount rootfs after failed restore: %s", self.id, exc)
        init.set_exited(255)

    def _remove_half_made_runtime_state(self, state: str) -> None:
        """What a runc killed mid-restore leaves: its state dir (under its own root) and the spec's
        own cgroup, nothing else."""
        from shim.cgroups.cleanup import remove_container_cgroup

        linux = self.spec.get("linux") if isinstance(self.spec, dict) else None
        path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
        if isinstance(path, str) and path:
            left = remove_container_cgroup(path)
            if left:
                log.warning("container %s: cgroups left after a failed restore: %s", self.id, "; ".join(left))
        if os.path.isdir(state) and not os.path.islink(state):
            left = mountlib.remove_tree(state)  # unmounts first, never walks into a mount
            if left:
                log.warning("container %s: runc state %s left (still mounted: %s)", self.id, state, ", ".join(left))

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
            try:  # unmount retries sleep while the rootfs is busy: off the event loop
                await asyncio.to_thread(mountlib.unmount_recursive, self.rootfs)
            except OSError as exc:
                log.warning("container %s: unmount rootfs after failed create: %s", self.id, exc)

    # -- lookups ---------------------------------------------------------------------------------
    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self._init_process()
        p = self.execs.get(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"process {exec_id} does not exist in container {self.id}")
        return p

    def _init_process(self) -> InitProcess:
        assert self.init is not None
        return self.init

    # -- operations: find the process; its state refuses, or calls the mechanics below -------------
    async def start(self, exec_id: str) -> Exit | None:
        """Start the init process (restore it, when created from a checkpoint) or an exec'd one.
        Returns an exit the reaper reported while it started: the caller publishes it after the start event."""
        return await self.process(exec_id).current.start(self)

    def add_exec(self, exec_id: str, paths: StdioPaths, spec_any) -> ExecProcess:
        validate_id("exec", exec_id)
        if exec_id in self.execs:
            raise TTRPCError(Code.ALREADY_EXISTS, f"exec {exec_id} already exists in container {self.id}")
        return self._init_process().current.exec(self, exec_id, paths, spec_any)

    async def kill(self, exec_id: str, sig: int, all_processes: bool) -> None:
        await self.process(exec_id).current.kill(self, sig, all_processes)

    async def delete_exec(self, exec_id: str) -> ExecProcess:
        p = self.process(exec_id)
        assert isinstance(p, ExecProcess)
        await p.current.delete(self)  # release_exec, then deleted
        del self.execs[exec_id]
        return p

    async def delete(self) -> InitProcess:
        init = self._init_process()
        await init.current.delete(self)  # delete_init, then deleted
        return init

    async def pause(self) -> None:
        await self._init_process().current.pause(self)

    async def resume(self) -> None:
        await self._init_process().current.resume(self)

    async def update(self, resources_any) -> None:
        await self._init_process().current.update(self, resources_any)

    async def pids(self) -> list[int]:
        return await self._init_process().current.pids(self)

    async def checkpoint(self, request) -> str:
        """Returns the checkpoint's image dir."""
        return await self._init_process().current.checkpoint(self, request)

    # -- mechanics: the runtime work a state asks for (`shim.task.process.ContainerOps`) ---------------
    # (restore_init is with the create helpers above)
    async def start_init(self, init: InitProcess) -> None:
        try:
            await self.runtime.start(self.id)
        except RuntimeCommandError as exc:
            raise runtime_error(exc, f"start container {self.id}: OCI runtime start failed") from exc

    async def kill_init(self, sig: int, all_processes: bool) -> None:
        try:
            await self.runtime.kill(self.id, sig, all=all_processes)
        except RuntimeCommandError as exc:
            if exc.not_running or exc.not_exist:
                raise TTRPCError(Code.NOT_FOUND, f"kill container {self.id}: process already finished") from exc
            raise runtime_error(exc, f"kill container {self.id}") from exc

    def abort_restore(self) -> bool:
        """Kill a ``runc restore`` in flight (and its CRIU): its Start fails, which undoes the restore.
        False when none runs (the restore is in another step, or done)."""
        if not self.runtime.kill_inflight("restore"):
            return False
        log.warning("container %s: kill during its restore: runc restore and CRIU killed", self.id)
        return True

    async def delete_init(self, init: InitProcess, stopped: bool) -> None:
        """Remove the container from the runtime (forced unless its init has `stopped`), its IO and rootfs.
        For a live container a runtime failure is the error; for a stopped one it is only logged. Its
        output was drained by the caller, holding no lock (shim.task.io.drain_output)."""
        error: TTRPCError | None = None
        try:
            await self.runtime.delete(self.id, force=not stopped)
        except RuntimeCommandError as exc:
            # a checkpoint with exit, or a container never created in the runtime: nothing to delete
            if not exc.not_exist:
                error = runtime_error(exc, f"delete container {self.id}: OCI runtime delete failed")
        if error is not None and not stopped:
            raise error
        await init.close_io()
        for e in list(self.execs.values()):
            await e.close_io()
        self.close_watchers()
        if self.rootfs:
            try:  # unmount retries sleep while the rootfs is busy: off the event loop
                await asyncio.to_thread(mountlib.unmount_recursive, self.rootfs)
            except OSError as exc:
                error = error or TTRPCError(Code.UNKNOWN, f"delete container {self.id}: unmount rootfs: {exc}")
        if error is not None:
            log.warning("%s", error.message)
        else:
            _mark_deleted(self.bundle)

    async def pause_init(self) -> None:
        await self.layer.before_pause(self.handle)  # the GPU layer suspends CUDA: the freeze releases VRAM
        try:
            await self.runtime.pause(self.id)
        except BaseException as exc:
            await self.layer.after_pause(self.handle, exc)
            if isinstance(exc, RuntimeCommandError):
                raise runtime_error(exc, f"pause container {self.id}") from exc
            raise
        await self.layer.after_pause(self.handle, None)

    async def resume_init(self) -> None:
        try:
            await self.runtime.resume(self.id)
        except RuntimeCommandError as exc:
            raise runtime_error(exc, f"resume container {self.id}") from exc
        await self.layer.after_resume(self.handle)  # CUDA processes that Pause suspended

    async def update_init(self, resources_any) -> None:
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

    async def checkpoint_init(self, request, was_paused: bool) -> str:
        return await seam.checkpoint(self.handle, self.layer, self.checkpoint_settings, request,
                                     was_paused=was_paused)

    async def list_pids(self) -> list[int]:
        try:
            return await self.runtime.ps(self.id)
        except RuntimeCommandError as exc:
            if self.cgroup is not None:
                try:
                    return self.cgroup.pids()
                except Exception:
                    pass
            raise runtime_error(exc, f"list processes of container {self.id}") from exc

    def register_exec(self, exec_id: str, paths: StdioPaths, spec_any) -> ExecProcess:
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

    async def start_exec(self, p: ExecProcess) -> None:
        if self._init_process().has_exited:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"cannot start {p.subject}: the container's init process is not running")
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
        finally:
            if sock is not None:
                sock.close()
            try:
                os.unlink(process_file)
            except OSError:
                pass

    def signal_exec(self, p: ExecProcess, sig: int) -> None:
        if p.pid <= 0:
            raise TTRPCError(Code.NOT_FOUND, f"kill {p.subject}: process already finished")
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError as exc:
            raise TTRPCError(Code.NOT_FOUND, f"kill {p.subject}: process already finished") from exc
        except (OSError, ValueError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"kill {p.subject} with signal {sig}: {exc}") from exc

    async def release_exec(self, p: ExecProcess) -> None:
        """Delete of an exec'd process: its IO and its pid file (its output was drained by the caller,
        holding no lock: shim.task.io.drain_output)."""
        await p.close_io()
        try:
            os.unlink(os.path.join(self.bundle, f"{p.id}.pid"))
        except OSError:
            pass

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
    atomic_write(os.path.join(bundle, STATE_FILE), json.dumps(state), durable=False)  # the bundle: /run
