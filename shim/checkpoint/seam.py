"""The checkpoint/restore seam: the one place a container calls for Checkpoint and for Create/Start
with a checkpoint (or a restore source in the spec: `shim.policy.untrusted`). It works on a
`TaskHandle` and the container's layer stack (`shim.checkpoint.layer`), never on the container.

- `prepare_create`: at Create, before anything is created: the container's checkpoint settings and
  the image to restore from, both from `shim.policy.untrusted` (a bad one refuses the Create; the
  image's seal is verified where the store's resolution finds it, `shim.checkpoint.seal`), and
  the per-task CRIU config file named in config.json (runc hands it to CRIU: the node's plugin dir).
- `checkpoint`: containerd's CheckpointOptions OR-ed with the container's annotations ->
  ``runc checkpoint`` (`criu.plans`), the layer's hooks around it (CUDA: `shim.gpu.lifecycle`); on success the image is
  marked complete, a note goes into containerd's directory, and the image is sealed with the node's
  key (`shim.checkpoint.seal`); on failure the task is left running
  and thawed, the error quotes CRIU's first error and the image is not claimed as good.
- `restore`: at Start, the image found again beneath its root (`shim.policy.store`: CRIU reads the
  directory that was checked, through the shim's fd), the layer's before_restore, then
  ``runc restore`` with the new task's IO (pipes, or the console socket) and the CRIU options the
  checkpoint used; returns the restored init's pid. The container attaches its IO, then calls the
  layer's after_restore; on any failure the container undoes the restore (nothing of it is left but
  containerd's record of a stopped task).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import time
from typing import Any, Mapping, Optional

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.bundle import INIT_PID_FILE
from shim.checkpoint import seal
from shim.checkpoint.layer import LifecycleLayer, TaskHandle
from shim.checkpoint.profile import StageProfile
from shim.checkpoint.settings import (RESTORE_FIELDS, CheckpointSettings, containerd_checkpoint_source, image_problem,
                                      prepare_bundle, recorded_options, write_note)
from shim.policy import store, untrusted
from shim.policy.audit import refuse
from shim.policy.node import NodeConfig, NodeConfigError
from shim.runtime.runc import RuntimeCommandError, read_pid_file

log = logging.getLogger("kybernate.shim")


async def prepare_create(req, spec: dict, options: Any, bundle: str, node: Optional[NodeConfig] = None,
                         namespace: str = "", profile: Optional[StageProfile] = None
                         ) -> tuple[CheckpointSettings, str]:
    """At Create, before anything is mounted or created: (the container's checkpoint settings, the
    checked image dir to restore from or ""). Raises TTRPCError (InvalidArgument, PermissionDenied,
    FailedPrecondition) for bad annotations or a bad image, so that a refused restore leaves nothing
    behind. The image's seal (`shim.checkpoint.seal.check_restore`) is verified inside the store's
    resolution, once the image is found and before anything reads its records (our own checks, the
    layer stack) and long before CRIU or the CUDA driver does; the resolution runs in a thread, since
    the seal reads the whole image. A fresh start pays no thread, and neither does containerd's
    checkpoint of a small image (`_small_image`: a CPU container's few hundred KiB take less time to
    verify here than the hand-over to a thread costs)."""
    cid = req.id
    if node is None:
        try:
            node = NodeConfig.load()
        except NodeConfigError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"create container {cid}: {exc}") from exc
    settings = CheckpointSettings.from_pod(untrusted.checkpoint_settings(spec, node, cid, namespace), options)
    verify = functools.partial(seal.check_restore, node=node, container_id=cid, namespace=namespace, spec=spec)
    profile = profile if profile is not None else StageProfile("restore", cid)
    locate = functools.partial(_locate_by_id, node=node, container_id=cid, namespace=namespace) if node.tiers else None
    if req.checkpoint:   # containerd's own (a trusted client's): wins over what the spec asks
        with profile.stage("create.resolve+seal"):
            resolve = functools.partial(containerd_checkpoint_source, req.checkpoint, settings, node, cid,
                                        namespace, verify)
            source = resolve() if _small_image(req.checkpoint) else await asyncio.to_thread(resolve)
    elif _asks_for_restore(spec):
        with profile.stage("create.resolve+seal"):
            source = await asyncio.to_thread(untrusted.pod_restore_source, spec, settings.scope, node, cid,
                                             namespace, image_problem, verify, locate)
    else:
        source = None
    settings = dataclasses.replace(settings, restore=source)
    prepare_bundle(bundle, spec, settings, cid)
    return settings, source.path if source else ""


#: TierError kind -> the code a pod's Create fails with
_TIER_CODES = {"malformed": Code.INVALID_ARGUMENT, "unknown": Code.NOT_FOUND, "foreign-scope": Code.PERMISSION_DENIED,
               "unreachable": Code.UNAVAILABLE, "server-error": Code.UNAVAILABLE, "unauthorized": Code.FAILED_PRECONDITION,
               "not-found": Code.NOT_FOUND, "missing-blob": Code.DATA_LOSS, "corrupt": Code.DATA_LOSS,
               "full": Code.RESOURCE_EXHAUSTED, "io": Code.UNAVAILABLE, "refused": Code.UNAVAILABLE,
               "config": Code.FAILED_PRECONDITION}


def _locate_by_id(value: str, scope: store.Scope, key: str, *, node: NodeConfig, container_id: str,
                  namespace: str) -> Optional[tuple[str, str]]:
    """`untrusted.IdLocator` over the node's tiers: a checkpoint id is looked up in the catalog and
    the directory tiers of the container's own scope, then in the registry (pulled into tier 1 or
    2, every blob checked against its digest); the seal and the image check follow where the store's
    resolution opens it. An id the tiers cannot serve is refused naming the id and the tier (an
    audit line); a value that is no id is left to the store's name resolution."""
    from tiers import TierError
    from tiers.ids import is_id
    from tiers.store import TierStore

    if not is_id(value):
        return None
    try:
        found = TierStore(node).locate(value, scope.containerd_namespace, scope.pod_namespace)
    except TierError as exc:
        raise refuse(_TIER_CODES.get(exc.kind, Code.UNAVAILABLE), container_id, key, value, str(exc),
                     action="restore", namespace=namespace) from None
    log.info("container %s: checkpoint %s %s the %s tier", container_id, value,
             "pulled into" if found.pulled else "found in", found.tier)
    return found.root, found.name


#: containerd's checkpoint dir holding an image of at most this many bytes is checked on the event
#: loop (verifying its seal reads all of it: about 1 ms per MiB), without the hand-over to a thread
INLINE_IMAGE_BYTES = 2 << 20
INLINE_IMAGE_FILES = 256


def _small_image(path: str) -> bool:
    """Whether `path` holds a CRIU image (its inventory) of regular files that are few and small
    enough to check inline (`INLINE_IMAGE_BYTES`): one lstat per entry, nothing read. Anything else
    (a note that names an image elsewhere, a big image, something odd) goes to the thread, where the
    checks that count are made."""
    from criu.images import INVENTORY

    total = 0
    try:
        with os.scandir(path) as entries:
            for n, entry in enumerate(entries):
                if n >= INLINE_IMAGE_FILES or not entry.is_file(follow_symlinks=False):
                    return False
                total += entry.stat(follow_symlinks=False).st_size
                if total > INLINE_IMAGE_BYTES:
                    return False
    except OSError:
        return False
    return os.path.lexists(os.path.join(path, INVENTORY))


def _asks_for_restore(spec: Mapping) -> bool:
    """Whether the spec names a restore source at all (whether `untrusted.pod_restore_source` takes
    it is its business): only then is the resolution worth a thread."""
    return bool(untrusted.annotations_of(spec).get(untrusted.RESTORE_FROM_ANNOTATION)
                or untrusted.env_of(spec, untrusted.RESTORE_FROM_ENV))


def _rootfs_of(bundle: str, spec) -> str:
    root = spec.get("root") if isinstance(spec, dict) else None
    path = root.get("path") if isinstance(root, dict) else None
    path = path if isinstance(path, str) and path else "rootfs"
    return path if os.path.isabs(path) else os.path.join(bundle, path)


def _requested_dir(task: TaskHandle, key: str, value: str) -> tuple[str, bool]:
    """A CheckpointOptions dir from containerd's client: (real path, existed before), or
    InvalidArgument naming it (relative, inside the bundle or rootfs, not new or empty)."""
    try:
        return store.target_dir(value, [task.bundle, _rootfs_of(task.bundle, task.spec)])
    except ValueError as exc:
        raise refuse(Code.INVALID_ARGUMENT, task.id, f"CheckpointOptions.{key}", value, str(exc),
                     action="checkpoint", namespace=task.namespace) from None


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


KEEP_LOG_HEAD = 1 << 20  # of CRIU's log, kept in the bundle: its start (the first error is there)...
KEEP_LOG_TAIL = 3 << 20  # ... and its end (what it did last); a spinning restorer writes gigabytes


def _keep_log(work_dir: str, name: str, keep: str) -> None:
    """CRIU's log outlives a scratch work dir: a copy in the bundle, for `kybernate`/operators, capped
    to its first and last megabytes. Blocking: call in a thread."""
    try:
        with open(os.path.join(work_dir, name), "rb") as src, open(keep, "wb") as dst:
            size = os.fstat(src.fileno()).st_size
            if size <= KEEP_LOG_HEAD + KEEP_LOG_TAIL:
                shutil.copyfileobj(src, dst)
                return
            dst.write(src.read(KEEP_LOG_HEAD))
            dst.write(f"\n[kybernate: {size - KEEP_LOG_HEAD - KEEP_LOG_TAIL} bytes of this log left out]\n".encode())
            src.seek(size - KEEP_LOG_TAIL)
            shutil.copyfileobj(src, dst)
    except OSError:
        pass


def _failure_detail(action: str, work_path: str, image: str, bundle: str) -> str:
    """CRIU's first error and where its log is kept (blocking: call in a thread)."""
    from criu.logs import describe_failure

    keep = os.path.join(bundle, f"criu-{action}.log")
    _keep_log(work_path, f"{action}.log", keep)
    return describe_failure(action, work_path, image) + f" (CRIU's log: {keep})"


def _runtime_failure(what: str, exc: RuntimeCommandError, detail: str) -> TTRPCError:
    """DeadlineExceeded when runc and CRIU had to be killed, else Unknown with runc's own words."""
    code = Code.DEADLINE_EXCEEDED if exc.timed_out else Code.UNKNOWN
    return TTRPCError(code, f"{what}: {exc.message or exc}; {detail}")


def _criu_numbers(action: str, work_path: str) -> dict:
    """CRIU's own split of a dump or restore (`criu.stats`), read before a scratch work dir goes.
    Blocking: call in a thread."""
    from criu.stats import summary

    return summary(action, work_path, os.path.join(work_path, f"{action}.log"))


async def _remove_scratch(path: str, container_id: str) -> None:
    """CRIU's scratch work dir, unmounted first and never walked into a mount (off the event loop)."""
    from shim.runtime.mount import remove_tree

    try:
        left = await asyncio.to_thread(remove_tree, path)
    except OSError as exc:
        log.warning("container %s: cannot remove CRIU's work dir %s: %s", container_id, path, exc)
        return
    if left:
        log.warning("container %s: CRIU left mounts under %s that could not be unmounted; left in place, "
                    "not walked into: %s", container_id, path, ", ".join(left))


async def _leave_running(task: TaskHandle, was_paused: bool) -> None:
    """After a failed checkpoint: a task that was running must not stay frozen (CRIU freezes it and
    thaws it on failure, unless it dies first). A task that was paused (by its user, or by containerd
    around the checkpoint) stays paused: its Resume comes from them."""
    if was_paused:
        return
    try:
        state = await task.runtime.state(task.id)
    except Exception as exc:  # noqa: BLE001 - best effort: the checkpoint's own error is what the caller gets
        log.warning("container %s: state after failed checkpoint: %s", task.id, exc)
        return
    if state.get("status") == "paused":
        log.warning("container %s: frozen after a failed checkpoint: thawing it", task.id)
        try:
            await task.runtime.resume(task.id)
        except RuntimeCommandError as exc:
            log.error("container %s: cannot thaw after a failed checkpoint: %s", task.id, exc)


async def checkpoint(task: TaskHandle, layer: LifecycleLayer, settings: CheckpointSettings, request,
                     was_paused: bool) -> str:
    """``runc checkpoint`` with containerd's options, OR-ed with the container's annotations; returns
    the image dir. On failure the task is left running and thawed (as it was: a task containerd
    paused stays paused), the error quotes CRIU's first error, and no image is claimed as good."""
    from criu.images import clear_complete, clear_in_progress, mark_complete, mark_in_progress, remove_incomplete
    from criu.plans import CheckpointPlan

    cid = task.id
    opts = _checkpoint_options(request, cid)
    wanted = settings.merged(opts)
    tier_store = _tier_store(cid)
    if wanted["image_path"]:
        image, _ = _requested_dir(task, "image_path", wanted["image_path"])
        if tier_store is not None:
            image = await asyncio.to_thread(_tier_fallback, tier_store, task, image)
    elif tier_store is not None and not settings.image_root:
        image = await asyncio.to_thread(_tier_place, tier_store, task, settings)
    else:
        try:
            image = settings.image_dir("", request.path, task.namespace, cid)
        except OSError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"checkpoint container {cid}: cannot make the checkpoint "
                             f"dir under CriuImagePath {settings.image_root}: {exc.strerror or exc}") from exc
    if not image:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {cid}: no image path given")
    if wanted["work_path"]:
        work, _ = _requested_dir(task, "work_path", wanted["work_path"])
    else:
        work = settings.work_dir("", cid)
    scratch = "" if work else os.path.join(task.bundle, "criu-work")
    try:
        plan = CheckpointPlan(container_id=cid, image_path=image, work_path=work or scratch,
                              exit=wanted["exit"], open_tcp=wanted["open_tcp"],
                              external_unix_sockets=wanted["external_unix_sockets"],
                              terminal=wanted["terminal"], file_locks=wanted["file_locks"],
                              empty_namespaces=tuple(wanted["empty_namespaces"]),
                              cgroups_mode=wanted["cgroups_mode"])
    except ValueError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {cid}: {exc}") from exc
    seal_key = seal.checkpoint_key(cid)  # a broken key file fails here, before CRIU freezes anything
    created_image = not os.path.lexists(plan.image_path)  # only what the shim made is removed on failure
    try:
        os.makedirs(plan.image_path, mode=0o700, exist_ok=True)
        os.makedirs(plan.work_path, exist_ok=True)
        clear_complete(plan.image_path)
        # who writes it: a shim killed mid-checkpoint leaves a half image that says so ("abandoned")
        mark_in_progress(plan.image_path, {"container_id": cid, "namespace": task.namespace})
    except OSError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"checkpoint container {cid}: cannot create {exc.filename}: {exc.strerror}") from exc
    log.info("container %s: checkpoint to %s (leave running: %s)", cid, plan.image_path, plan.keeps_running)
    profile = StageProfile("checkpoint", cid)
    try:
        with profile.stage(f"{layer.name}.before"):
            await layer.before_checkpoint(task, plan.image_path, plan.keeps_running, was_paused)
        # the page images' whole pieces are hashed for the seal while CRIU writes them
        early = seal.PieceHasher(plan.image_path).start() if seal_key is not None else None
        try:
            with profile.stage("runc.checkpoint"):
                await task.runtime.run_args("checkpoint", plan.args())
        except BaseException as exc:
            if early is not None:
                await asyncio.to_thread(early.stop)
            await layer.after_checkpoint(task, plan.image_path, plan.keeps_running, was_paused, exc)
            raise
        known = await asyncio.to_thread(early.stop) if early is not None else None
        with profile.stage(f"{layer.name}.after"):
            await layer.after_checkpoint(task, plan.image_path, plan.keeps_running, was_paused, None)
        profile.add_criu(await asyncio.to_thread(_criu_numbers, "dump", plan.work_path))
    except BaseException as exc:
        detail = ""
        if isinstance(exc, RuntimeCommandError):
            detail = await asyncio.to_thread(_failure_detail, "dump", plan.work_path, plan.image_path, task.bundle)
        await _leave_running(task, was_paused)
        if created_image:
            await asyncio.to_thread(remove_incomplete, plan.image_path)
        else:
            clear_in_progress(plan.image_path)
        if isinstance(exc, RuntimeCommandError):
            raise _runtime_failure(f"checkpoint container {cid}", exc, detail) from exc
        raise
    finally:
        if scratch:
            await _remove_scratch(scratch, cid)
    elapsed = profile.total  # from the layer's before_checkpoint to the runtime's and the layer's end
    record = {"container_id": cid, "namespace": task.namespace, "image_path": plan.image_path,
              "checkpointed_at": time.time(), "seconds": round(elapsed, 3), "exit": plan.exit,
              "runtime": getattr(task.runtime, "binary", ""), "layer": layer.name,
              "options": {f: getattr(plan, f) for f in ("open_tcp", "external_unix_sockets", "terminal",
                                                         "file_locks", "cgroups_mode")}}
    record["options"]["empty_namespaces"] = list(plan.empty_namespaces)
    diff = None
    tier_s = 0.0
    if tier_store is not None:  # the writable layer travels with the image (before the seal: it covers it)
        t0 = time.monotonic()
        with profile.stage("tiers.rootfs"):
            diff = await asyncio.to_thread(_capture_rootfs, task, plan.image_path)
        tier_s += time.monotonic() - t0
    record["profile"] = profile.as_dict()  # up to here: the seal and its marker come after
    clear_in_progress(plan.image_path)
    with profile.stage("complete"):
        await asyncio.to_thread(mark_complete, plan.image_path, record)  # an fsync walk: off the event loop
    if request.path:
        # containerd stores request.path as a blob (1.6/1.7 refuse the same blob twice); our note makes
        # each one distinct and tells a restore from containerd's copy where the image is
        try:
            os.makedirs(request.path, exist_ok=True)
            write_note(request.path, record)
        except OSError as exc:
            log.warning("container %s: cannot write the checkpoint note into %s: %s", cid, request.path, exc)
    # last: covers every file, the completion marker and a note (the in-progress marker is gone); in a
    # thread, as it reads the whole image
    with profile.stage("seal"):
        await asyncio.to_thread(seal.seal_checkpoint, task, plan.image_path, seal_key, known)
    if tier_store is not None:
        t0 = time.monotonic()
        with profile.stage("tiers.register"):
            await asyncio.to_thread(_register, tier_store, task, settings, plan.image_path, diff is not None)
        tier_s += time.monotonic() - t0
        log.info("container %s: the tiers' own work (rootfs diff %s, catalog, job) took %.3fs", cid,
                 f"of {diff} entries" if diff is not None else "none", tier_s)
    log.info("container %s: checkpoint to %s done in %.3fs", cid, plan.image_path, elapsed)
    log.info("%s", profile.line())
    return plan.image_path


# ---- the node's checkpoint tiers (`tiers`) -----------------------------------------------------
def _tier_store(container_id: str):
    """The node's tier store, or None when the node keeps no tiers ([store] ram_dir and registry
    unset): then checkpoints go where they always went."""
    try:
        node = NodeConfig.load()
    except NodeConfigError as exc:
        raise TTRPCError(Code.FAILED_PRECONDITION, f"checkpoint container {container_id}: {exc}") from exc
    if not node.tiers:
        return None
    from tiers.store import TierStore

    return TierStore(node)


def _scope(task: TaskHandle, settings: CheckpointSettings) -> store.Scope:
    return settings.scope or store.Scope(task.namespace, "", (task.id,))


def memory_estimate(pid: int) -> int:
    """About how many bytes a dump of the task will write: its cgroup's anonymous and shared memory
    (memory.stat: v2 anon + shmem, v1 total_rss + total_shmem), plus a little; 0 when unknown. A GPU
    task's VRAM is not in it (its dump holds it too)."""
    from shim.cgroups.cgroup import Cgroup, CgroupError

    try:
        mem = Cgroup.for_pid(pid).memory_dir()
        text = (mem / "memory.stat").read_text() if mem is not None else ""
    except (CgroupError, OSError, ValueError):
        return 0
    stats = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            stats[k] = int(v)
    total = (stats.get("anon", 0) + stats.get("shmem", 0)) if "anon" in stats else \
        (stats.get("total_rss", stats.get("rss", 0)) + stats.get("total_shmem", stats.get("shmem", 0)))
    return int(total * 1.05) + (1 << 20) if total else 0


def _init_pid(task: TaskHandle) -> int:
    try:
        return task.init_pid()
    except Exception:  # noqa: BLE001 - no pid, no estimate
        return 0


def _tier_place(tiers, task: TaskHandle, settings: CheckpointSettings) -> str:
    """A new checkpoint with no place asked for: a new id in tier 1 when it has room, else tier 2."""
    from tiers.ids import new_id

    scope = _scope(task, settings)
    placed = tiers.place(scope.containerd_namespace, scope.pod_namespace, scope.name, new_id(),
                         memory_estimate(_init_pid(task)))
    if placed.why:
        log.warning("container %s: %s (%s)", task.id, placed.why, placed.path)
    return placed.path


def _tier_fallback(tiers, task: TaskHandle, image: str) -> str:
    """An image_path in tier 1 (as `kybernate checkpoint` names one) that tier 1 has no room for:
    the same name in tier 2, said in the log (kybernate looks for it in both)."""
    from tiers import DISK, RAM

    if tiers.tier_of_path(image) != RAM or not tiers.roots[DISK]:
        return image
    estimate = memory_estimate(_init_pid(task))
    ok, why = tiers.has_room(RAM, estimate)
    if not ok and tiers.make_room(RAM, estimate):   # LRU images a lower tier holds make way
        ok, why = tiers.has_room(RAM, estimate)
    if ok:
        return image
    rel = os.path.relpath(os.path.realpath(image), os.path.realpath(tiers.roots[RAM]))
    parts = rel.split("/")
    try:
        parent = store.make_dirs(tiers.roots[DISK], parts[:-1])
    except (OSError, ValueError) as exc:
        log.warning("container %s: tier 1 is full (%s) and tier 2 cannot take it (%s): tier 1 it is", task.id, why, exc)
        return image
    moved = os.path.join(parent, parts[-1])
    if os.path.lexists(moved):
        return image
    log.warning("container %s: tier 1 full: %s; the checkpoint goes to tier 2 (%s)", task.id, why, moved)
    return moved


def _capture_rootfs(task: TaskHandle, image_dir: str) -> Optional[int]:
    from shim.checkpoint import rootfs_diff

    try:
        return rootfs_diff.capture(_rootfs_of(task.bundle, task.spec), image_dir, task.id)
    except (OSError, ValueError) as exc:
        log.warning("container %s: cannot capture its rootfs diff: %s (the checkpoint restores only where the "
                    "image's filesystem is enough)", task.id, exc)
        try:
            os.unlink(os.path.join(image_dir, rootfs_diff.ARCHIVE_NAME))
        except OSError:
            pass
        return None


def _register(tiers, task: TaskHandle, settings: CheckpointSettings, image_dir: str, diff: bool) -> None:
    """The whole, sealed image into the catalog, its copies down queued for the node's worker. A
    failure here leaves a good checkpoint that nothing moves: said loudly, the checkpoint stands."""
    scope = _scope(task, settings)
    try:
        rec = tiers.register(image_dir, scope.containerd_namespace, scope.pod_namespace, scope.name, task.id, diff)
    except (OSError, ValueError) as exc:
        log.error("container %s: checkpoint %s is whole but not in the tier catalog (%s): the tier worker will "
                  "not copy it down", task.id, image_dir, exc)
        return
    if rec is not None:
        log.info("container %s: checkpoint %s in the %s tier (%d bytes), copies down queued", task.id, rec.id,
                 rec.tiers[0] if rec.tiers else "?", rec.bytes)


async def restore(task: TaskHandle, layer: LifecycleLayer, image: str, settings: CheckpointSettings, *,
                  stdio: Any, console_socket: Optional[str], terminal: bool, no_pivot: bool,
                  profile: Optional[StageProfile] = None) -> int:
    """Start of a container created from a checkpoint: the layer's before_restore (GPU placement:
    decided before anything is created), then ``runc restore --detach`` with the new task's IO (its
    pipes become the restored process's stdio; a terminal task gets the console socket). Returns the
    restored init's pid. The caller undoes everything on failure.

    The image is opened again the way it was found at Create (beneath its root, no links), and
    runc, CRIU and the layer read it through the shim's fd: what they read is what was checked."""
    cid = task.id
    source = settings.restore
    image_fd = source.open(cid, task.namespace) if source is not None else -1
    try:
        if image_fd >= 0:
            log.info("container %s: restore from %s (%s), read through %s", cid, source.path, source.origin,
                     store.fd_path(image_fd))
        return await _restore(task, layer, store.fd_path(image_fd) if image_fd >= 0 else image, settings,
                              stdio=stdio, console_socket=console_socket, terminal=terminal, no_pivot=no_pivot,
                              profile=profile if profile is not None else StageProfile("restore", cid))
    finally:
        if image_fd >= 0:
            os.close(image_fd)


def _has_rootfs_diff(image: str) -> bool:
    """Whether the image carries a rootfs diff to apply (a link counts: `rootfs_diff.apply` refuses it)."""
    from shim.checkpoint.rootfs_diff import ARCHIVE_NAME

    return os.path.lexists(os.path.join(image, ARCHIVE_NAME))


def _apply_rootfs(task: TaskHandle, image: str) -> None:
    """The checkpoint's rootfs diff (if it carries one) into the new container's rootfs, before
    CRIU opens the files the restored processes had open."""
    import tarfile

    from shim.checkpoint import rootfs_diff

    try:
        n = rootfs_diff.apply(image, _rootfs_of(task.bundle, task.spec), task.id)
    except (OSError, rootfs_diff.RootfsDiffError, tarfile.TarError) as exc:
        raise TTRPCError(Code.FAILED_PRECONDITION, f"restore container {task.id}: cannot apply the checkpoint's "
                                                   f"{rootfs_diff.ARCHIVE_NAME}: {exc}") from exc
    if n:
        log.info("container %s: applied %d entries of the checkpoint's rootfs diff", task.id, n)


async def _restore(task: TaskHandle, layer: LifecycleLayer, image: str, settings: CheckpointSettings, *,
                   stdio: Any, console_socket: Optional[str], terminal: bool, no_pivot: bool,
                   profile: StageProfile) -> int:
    from criu.plans import RestorePlan

    cid = task.id
    with profile.stage("rootfs.diff"):
        if _has_rootfs_diff(image):  # most images carry none: no hand-over to a thread for nothing
            await asyncio.to_thread(_apply_rootfs, task, image)
    with profile.stage(f"{layer.name}.before"):
        await layer.before_restore(task, image)
    recorded = recorded_options(image)
    # what CRIU needs again on restore: as the checkpoint had it, or as this container asks
    flags = {f: bool(recorded.get(f)) or bool(settings.annotated.get(f)) for f in RESTORE_FIELDS}
    work = settings.work_dir("", cid)
    scratch = "" if work else os.path.join(task.bundle, "criu-work")
    os.makedirs(work or scratch, exist_ok=True)
    pid_file = os.path.join(task.bundle, INIT_PID_FILE)
    try:
        try:
            plan = RestorePlan(container_id=cid, bundle=task.bundle, image_path=image,
                               pid_file=pid_file, work_path=work or scratch,
                               terminal=terminal or flags["terminal"],
                               open_tcp=flags["open_tcp"], external_unix_sockets=flags["external_unix_sockets"],
                               file_locks=flags["file_locks"],
                               cgroups_mode=str(recorded.get("cgroups_mode") or ""),
                               console_socket=console_socket, no_pivot=no_pivot)
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"restore container {cid}: {exc}") from exc
        log.info("container %s: restore from %s (%s; layer %s)", cid, image,
                 ", ".join(f for f, on in flags.items() if on) or "no extra CRIU options", layer.name)
        try:
            with profile.stage("runc.restore"):
                await task.runtime.run_args("restore", plan.args(), stdio=stdio, capture=False)
        except RuntimeCommandError as exc:
            detail = await asyncio.to_thread(_failure_detail, "restore", plan.work_path, image, task.bundle)
            raise _runtime_failure(f"restore container {cid}", exc, detail) from exc
        profile.add_criu(await asyncio.to_thread(_criu_numbers, "restore", plan.work_path))
        return read_pid_file(pid_file)
    finally:
        if scratch:
            await _remove_scratch(scratch, cid)
