"""The checkpoint/restore seam: the one place the Task service calls for Checkpoint and for Create
with a checkpoint (or a restore source in the spec: `shim.checkpoint.settings`).

- `prepare_create`: at Create, before anything is created: the container's checkpoint settings, the
  image to restore from (checked: a bad one refuses the Create) and the per-task CRIU config file
  named in config.json (runc hands it to CRIU: plugin dir).
- `checkpoint`: containerd's CheckpointOptions OR-ed with the container's annotations ->
  ``runc checkpoint`` (`criu.plans`), CUDA quiesced around it (`shim.gpu.lifecycle`); on success the image is
  marked complete and a note goes into containerd's directory; on failure the task is left running
  and thawed, the error quotes CRIU's first error and the image is not claimed as good.
- `restore`: at Start, ``runc restore`` with the new task's IO (pipes, or the console socket), the
  CRIU options the checkpoint used; on failure nothing of the container is left but containerd's
  record of a stopped task.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.gpu import lifecycle as gpu
from shim.runtime import mount as mountlib
from shim.checkpoint.settings import (RESTORE_FIELDS, CheckpointSettings, prepare_bundle, recorded_options,
                                      resolve_image, restore_source, write_note)
from shim.task.process import State
from shim.runtime.runc import RuntimeCommandError, read_pid_file

if TYPE_CHECKING:  # pragma: no cover
    from shim.task.container import Container

log = logging.getLogger("kybernate.shim")


def prepare_create(req, spec: dict, options: Any, bundle: str) -> tuple[CheckpointSettings, str]:
    """At Create, before anything is mounted or created: (the container's checkpoint settings, the
    checked image dir to restore from or ""). Raises TTRPCError (InvalidArgument/FailedPrecondition)
    for bad annotations or a bad image, so that a refused restore leaves nothing behind."""
    cid = req.id
    settings = CheckpointSettings.from_spec(spec, options, cid)
    source, origin = restore_source(req.checkpoint, spec)
    image = resolve_image(source, cid, origin) if source else ""
    prepare_bundle(bundle, spec, settings, cid)
    return settings, image


def _checkpoint_options(request, container_id: str):
    if not request.HasField("options") or not request.options.type_url:
        return None
    from proto.anyutil import TypeMismatch, unpack
    from proto.containerd.runc.v1 import options_pb2

    try:
        return unpack(request.options, options_pb2.CheckpointOptions)
    except TypeMismatch:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint container {container_id}: options of type {request.options.type_url} are "
                         f"not containerd.runc.v1.CheckpointOptions") from None
    except Exception as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint container {container_id}: undecodable CheckpointOptions: {exc}") from exc


def _keep_log(work_dir: str, name: str, keep: str) -> None:
    """CRIU's log outlives a scratch work dir: a copy in the bundle, for `kybernate`/operators."""
    try:
        shutil.copyfile(os.path.join(work_dir, name), keep)
    except OSError:
        pass


async def _leave_running(container: "Container", was_paused: bool) -> None:
    """After a failed checkpoint: a task that was running must not stay frozen (CRIU freezes it and
    thaws it on failure, unless it dies first). A task that was paused (by its user, or by containerd
    around the checkpoint) stays paused: its Resume comes from them."""
    if was_paused:
        return
    try:
        state = await container.runtime.state(container.id)
    except Exception as exc:  # noqa: BLE001 - best effort: the checkpoint's own error is what the caller gets
        log.warning("container %s: state after failed checkpoint: %s", container.id, exc)
        return
    if state.get("status") == "paused":
        log.warning("container %s: frozen after a failed checkpoint: thawing it", container.id)
        try:
            await container.runtime.resume(container.id)
        except RuntimeCommandError as exc:
            log.error("container %s: cannot thaw after a failed checkpoint: %s", container.id, exc)


async def checkpoint(container: "Container", request) -> str:
    """``runc checkpoint`` with containerd's options, OR-ed with the container's annotations; returns
    the image dir. On failure the task is left running and thawed (as it was: a task containerd
    paused stays paused), the error quotes CRIU's first error, and no image is claimed as good."""
    from criu.images import clear_complete, mark_complete, remove_incomplete
    from criu.logs import describe_failure
    from criu.plans import CheckpointPlan

    cid = container.id
    opts = _checkpoint_options(request, cid)
    settings = container.checkpoint_settings
    wanted = settings.merged(opts)
    image = settings.image_dir(wanted["image_path"], request.path, container.namespace, cid)
    if not image:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {cid}: no image path given")
    work = settings.work_dir(wanted["work_path"], cid)
    scratch = "" if work else os.path.join(container.bundle, "criu-work")
    try:
        plan = CheckpointPlan(container_id=cid, image_path=image, work_path=work or scratch,
                              exit=wanted["exit"], open_tcp=wanted["open_tcp"],
                              external_unix_sockets=wanted["external_unix_sockets"],
                              terminal=wanted["terminal"], file_locks=wanted["file_locks"],
                              empty_namespaces=tuple(wanted["empty_namespaces"]),
                              cgroups_mode=wanted["cgroups_mode"])
    except ValueError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {cid}: {exc}") from exc
    created_image = not os.path.exists(plan.image_path)
    try:
        os.makedirs(plan.image_path, exist_ok=True)
        os.makedirs(plan.work_path, exist_ok=True)
        clear_complete(plan.image_path)
    except OSError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint container {cid}: cannot create {exc.filename}: {exc.strerror}") from exc
    was_paused = container.init is not None and container.init.state is State.PAUSED
    log.info("container %s: checkpoint to %s (leave running: %s)", cid, plan.image_path, plan.keeps_running)
    started = time.monotonic()
    try:
        async with gpu.checkpointing(container, plan.image_path, plan.keeps_running):  # CUDA quiesced around it
            await container.runtime.run_args("checkpoint", plan.args())
    except BaseException as exc:
        detail = ""
        if isinstance(exc, RuntimeCommandError):
            detail = describe_failure("dump", plan.work_path, plan.image_path)
            _keep_log(plan.work_path, "dump.log", os.path.join(container.bundle, "criu-dump.log"))
        await _leave_running(container, was_paused)
        if created_image:
            remove_incomplete(plan.image_path)
        if isinstance(exc, RuntimeCommandError):
            raise TTRPCError(Code.UNKNOWN, f"checkpoint container {cid}: {exc.message or exc}; {detail}") from exc
        raise
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    record = {"container_id": cid, "namespace": container.namespace, "image_path": plan.image_path,
              "checkpointed_at": time.time(), "seconds": round(elapsed, 3), "exit": plan.exit,
              "runtime": getattr(container.runtime, "binary", ""),
              "options": {f: getattr(plan, f) for f in ("open_tcp", "external_unix_sockets", "terminal",
                                                         "file_locks", "cgroups_mode")}}
    record["options"]["empty_namespaces"] = list(plan.empty_namespaces)
    mark_complete(plan.image_path, record)
    if request.path:
        # containerd stores request.path as a blob (1.6/1.7 refuse the same blob twice); our note makes
        # each one distinct and tells a restore from containerd's copy where the image is
        try:
            os.makedirs(request.path, exist_ok=True)
            write_note(request.path, record)
        except OSError as exc:
            log.warning("container %s: cannot write the checkpoint note into %s: %s", cid, request.path, exc)
    log.info("container %s: checkpoint to %s done in %.3fs", cid, plan.image_path, elapsed)
    return plan.image_path


async def restore(container: "Container") -> None:
    """Start of a container created from a checkpoint: ``runc restore --detach`` with the new task's IO
    (its pipes become the restored process's stdio; a terminal task gets the console socket)."""
    from criu.logs import describe_failure
    from criu.plans import RestorePlan

    from shim.task.console import ConsoleSocket

    init = container.init
    assert init is not None
    cid = container.id
    image = container.restore_from
    try:  # GPU placement (identity, remap, or refused): decided before runc restore creates anything
        await gpu.before_restore(container)
    except BaseException:
        await _undo_restore(container)
        raise
    settings = container.checkpoint_settings
    recorded = recorded_options(image)
    # what CRIU needs again on restore: as the checkpoint had it, or as this container asks
    flags = {f: bool(recorded.get(f)) or bool(settings.annotated.get(f)) for f in RESTORE_FIELDS}
    work = settings.work_dir("", cid)
    scratch = "" if work else os.path.join(container.bundle, "criu-work")
    os.makedirs(work or scratch, exist_ok=True)
    pid_file = os.path.join(container.bundle, "init.pid")
    sock = ConsoleSocket() if init.paths.terminal else None
    try:
        if sock is None:
            init.io = await container._make_io(init)
        try:
            plan = RestorePlan(container_id=cid, bundle=container.bundle, image_path=image,
                               pid_file=pid_file, work_path=work or scratch,
                               terminal=init.paths.terminal or flags["terminal"],
                               open_tcp=flags["open_tcp"], external_unix_sockets=flags["external_unix_sockets"],
                               file_locks=flags["file_locks"],
                               cgroups_mode=str(recorded.get("cgroups_mode") or ""),
                               console_socket=sock.path if sock else None,
                               no_pivot=container.options.no_pivot_root)
        except ValueError as exc:
            await _undo_restore(container)
            raise TTRPCError(Code.INVALID_ARGUMENT, f"restore container {cid}: {exc}") from exc
        log.info("container %s: restore from %s (%s)", cid, image,
                 ", ".join(f for f, on in flags.items() if on) or "no extra CRIU options")
        try:
            await container.runtime.run_args("restore", plan.args(), stdio=init.io.child if init.io else None,
                                             capture=False)
        except RuntimeCommandError as exc:
            detail = describe_failure("restore", plan.work_path, image)
            _keep_log(plan.work_path, "restore.log", os.path.join(container.bundle, "criu-restore.log"))
            await _undo_restore(container)
            raise TTRPCError(Code.UNKNOWN, f"restore container {cid}: {exc.message or exc}; {detail}") from exc
        await container._attach_io(init, sock)
        init.pid = read_pid_file(pid_file)
        try:
            await gpu.after_restore(container)  # resume restored CUDA processes
        except BaseException:
            await _undo_restore(container)  # it killed the task: leave nothing of it
            raise
    finally:
        if sock is not None:
            sock.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


async def _undo_restore(container: "Container") -> None:
    """A restore that failed leaves no process, runc state, cgroup or mount: CRIU kills what it
    restored, ``runc delete --force`` removes its state and cgroups, the rootfs is unmounted; the init
    process is marked stopped (status 255) so that containerd's Delete has nothing left to do."""
    init = container.init
    assert init is not None
    await init.close_io()
    try:
        await container.runtime.delete(container.id, force=True)
    except RuntimeCommandError as exc:
        if not exc.not_exist:
            log.warning("container %s: runc delete after failed restore: %s", container.id, exc)
    if container.rootfs:
        try:
            mountlib.unmount_recursive(container.rootfs)
            container.rootfs = ""
        except OSError as exc:
            log.warning("container %s: unmount rootfs after failed restore: %s", container.id, exc)
    init.set_exited(255)
