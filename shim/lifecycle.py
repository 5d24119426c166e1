"""The checkpoint/restore seam: the one place the Task service calls for Checkpoint and for Create
with a checkpoint.

Today it maps containerd's CheckpointOptions to ``runc checkpoint`` / ``runc restore`` through
`criu.plans` and reads CRIU's log into the error on failure. The GPU lifecycle (quiesce CUDA before
the runtime checkpoint, resume or roll back after; resume CUDA after restore) wraps these two
functions later without the service changing.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim import gpu
from shim.runtime import RuntimeCommandError, read_pid_file

if TYPE_CHECKING:  # pragma: no cover
    from shim.container import Container

log = logging.getLogger("kybernate.shim")


def _checkpoint_options(request):
    if not request.HasField("options") or not request.options.type_url:
        return None
    from proto.anyutil import TypeMismatch, unpack
    from proto.containerd.runc.v1 import options_pb2

    try:
        return unpack(request.options, options_pb2.CheckpointOptions)
    except TypeMismatch:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint: options of type {request.options.type_url} are not "
                         f"containerd.runc.v1.CheckpointOptions") from None
    except Exception as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint: undecodable CheckpointOptions: {exc}") from exc


async def checkpoint(container: "Container", request) -> None:
    """``runc checkpoint`` with containerd's options; the image lands in the requested directory."""
    from criu.logs import describe_failure
    from criu.plans import CheckpointPlan

    opts = _checkpoint_options(request)
    configured_work = container.options.criu_work_path
    scratch = ""
    work = configured_work
    if not work and not (opts is not None and opts.work_path):
        scratch = os.path.join(container.bundle, "criu-work")
        work = scratch
    if not (request.path or (opts is not None and opts.image_path) or container.options.criu_image_path):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {container.id}: no image path given")
    try:
        plan = CheckpointPlan.from_options(container.id, opts,
                                           path=request.path or container.options.criu_image_path,
                                           work_path=work)
    except ValueError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {container.id}: {exc}") from exc
    try:
        os.makedirs(plan.image_path, exist_ok=True)
        if plan.work_path:
            os.makedirs(plan.work_path, exist_ok=True)
    except OSError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint container {container.id}: cannot create {exc.filename}: {exc.strerror}") from exc
    log.info("container %s: checkpoint to %s (leave running: %s)", container.id, plan.image_path, plan.keeps_running)
    try:
        async with gpu.checkpointing(container, plan.image_path, plan.keeps_running):  # CUDA quiesced around it
            await container.runtime.run_args("checkpoint", plan.args())
    except RuntimeCommandError as exc:
        detail = describe_failure("dump", plan.work_path, plan.image_path)
        keep = os.path.join(container.bundle, "criu-dump.log")
        src = os.path.join(plan.work_path or plan.image_path, "dump.log")
        try:
            shutil.copyfile(src, keep)
        except OSError:
            pass
        raise TTRPCError(Code.UNKNOWN, f"checkpoint container {container.id}: {exc.message or exc}; {detail}") from exc
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


async def restore(container: "Container") -> None:
    """Start of a container created from a checkpoint: ``runc restore --detach`` with its IO."""
    from criu.logs import describe_failure
    from criu.plans import RestorePlan

    from shim.console import ConsoleSocket

    init = container.init
    assert init is not None
    image = container.restore_from
    if not os.path.isdir(image):
        raise TTRPCError(Code.FAILED_PRECONDITION,
                         f"restore container {container.id}: checkpoint image {image} is not a directory")
    work = container.options.criu_work_path or os.path.join(container.bundle, "criu-work")
    os.makedirs(work, exist_ok=True)
    pid_file = os.path.join(container.bundle, "init.pid")
    sock = ConsoleSocket() if init.paths.terminal else None
    try:
        if sock is None:
            init.io = await container._make_io(init)
        try:
            plan = RestorePlan(container_id=container.id, bundle=container.bundle, image_path=image,
                               pid_file=pid_file, work_path=work, terminal=init.paths.terminal,
                               console_socket=sock.path if sock else None,
                               no_pivot=container.options.no_pivot_root)
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"restore container {container.id}: {exc}") from exc
        log.info("container %s: restore from %s", container.id, image)
        try:
            await container.runtime.run_args("restore", plan.args(), stdio=init.io.child if init.io else None,
                                             capture=False)
        except RuntimeCommandError as exc:
            detail = describe_failure("restore", work, image)
            await init.close_io()
            raise TTRPCError(Code.UNKNOWN, f"restore container {container.id}: {exc.message or exc}; {detail}") from exc
        await container._attach_io(init, sock)
        init.pid = read_pid_file(pid_file)
        await gpu.after_restore(container)  # resume restored CUDA processes
    finally:
        if sock is not None:
            sock.close()
