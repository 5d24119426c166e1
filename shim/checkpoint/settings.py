"""A container's checkpoint settings and the files the seam writes beside an image: the data half of
`shim.checkpoint.seam` (which does the work). What a pod or an image asks for is turned into these
settings, or refused, in `shim.policy.untrusted` (annotations, env, records read from image dirs);
where images live and how a restore source is found is `shim.policy.store`.

Where a checkpoint's image goes: the request's image_path option (checked: absolute, outside the
bundle and rootfs, new or empty), else the runtime option CriuImagePath
(``<CriuImagePath>/<namespace>/<Kubernetes namespace or _>/<name>/<UTC time>``, the store's layout),
else the request's path (containerd's directory,
which containerd stores as the checkpoint in its content store). `kybernate checkpoint` names a
directory in the node's store (``<store>/<namespace>/<Kubernetes namespace or _>/...``) as image_path.
When the image goes elsewhere than the request's path, a note naming it is written into the
request's path, so that containerd stores a distinct blob every time and a restore from containerd's
copy finds the image (`shim.policy.untrusted` follows it only into allowed places).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from fsutil.atomic import atomic_write
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.policy.node import NodeConfig
from shim.policy.store import Scope
from shim.policy.untrusted import (NOTE_NAME, ImageVerifier, PodCheckpointSettings, RestoreSource, note_target, read_note,
                                   read_record)

log = logging.getLogger("kybernate.shim")

BOOL_FIELDS = ("exit", "open_tcp", "external_unix_sockets", "terminal", "file_locks")
#: the CheckpointOptions fields that CRIU also needs on restore
RESTORE_FIELDS = ("open_tcp", "external_unix_sockets", "terminal", "file_locks")


@dataclass(frozen=True)
class CheckpointSettings:
    """A container's standing checkpoint settings, fixed at Create."""

    annotated: Mapping[str, bool]       # CheckpointOptions field -> True, from the annotations
    plugin_dir: Optional[str]           # CRIU libdir, the node's (None: CRIU's own default)
    image_root: str = ""                # runtime option CriuImagePath
    work_root: str = ""                 # runtime option CriuWorkPath
    scope: Optional[Scope] = None       # whose checkpoints it may restore from (shim.policy.store)
    restore: Optional[RestoreSource] = None  # what it is restored from, when created from a checkpoint

    @classmethod
    def from_pod(cls, pod: PodCheckpointSettings, options: Any) -> "CheckpointSettings":
        """The checked settings from the spec and the node (`shim.policy.untrusted`) with containerd's
        runtime options (trusted) CriuImagePath and CriuWorkPath."""
        return cls(annotated=pod.annotated, plugin_dir=pod.plugin_dir,
                   image_root=getattr(options, "criu_image_path", "") or "",
                   work_root=getattr(options, "criu_work_path", "") or "", scope=pod.scope)

    def merged(self, options: Any) -> dict:
        """The request's CheckpointOptions (None = unset) with the annotations OR-ed in."""
        get = (lambda name, default: getattr(options, name, default) if options is not None else default)
        out = {f: bool(get(f, False)) or bool(self.annotated.get(f)) for f in BOOL_FIELDS}
        out["empty_namespaces"] = list(get("empty_namespaces", ()) or ())
        out["cgroups_mode"] = get("cgroups_mode", "") or ""
        out["image_path"] = get("image_path", "") or ""
        out["work_path"] = get("work_path", "") or ""
        return out

    def image_dir(self, requested: str, request_path: str, namespace: str, container_id: str,
                  now: Optional[float] = None) -> str:
        """Where this checkpoint's image goes (see the module docstring). Under CriuImagePath the
        layout is the store's (`shim.policy.store`), so that a CriuImagePath equal to the node's store
        gives checkpoints that restore-from finds by name; the parents are made (0700) here."""
        if requested:
            return requested
        if self.image_root:
            from shim.policy.store import Scope, make_dirs, new_checkpoint_id

            scope = self.scope or Scope(namespace, "", (container_id,))
            parent = make_dirs(self.image_root, [scope.containerd_namespace, scope.pod_namespace or "_",
                                                 *scope.name])
            return os.path.join(parent, new_checkpoint_id(parent, now))
        return request_path

    def work_dir(self, requested: str, container_id: str) -> str:
        """CRIU's work dir (its logs); "" = a scratch dir of the shim, removed afterwards."""
        if requested:
            return requested
        if self.work_root:
            return os.path.join(self.work_root, container_id)
        return ""


def prepare_bundle(bundle: str, spec: dict, settings: CheckpointSettings, container_id: str) -> Optional[str]:
    """Write the per-task CRIU config and name it in config.json (org.criu.config) before runc reads
    the spec: runc takes the annotation from the spec it stored at create for a checkpoint (runc 1.1.5
    and 1.3.6 alike), and from config.json at restore. A spec that names its own file keeps it."""
    from criu.config import CRIU_CONFIG_ANNOTATION, TASK_CONFIG_NAME, annotate_bundle, write_runc_criu_config

    annotations = spec.get("annotations") if isinstance(spec.get("annotations"), Mapping) else {}
    own = annotations.get(CRIU_CONFIG_ANNOTATION)
    if own is not None:
        log.info("container %s: the spec names its own CRIU config %r; plugin dir not set by kybernate",
                 container_id, own)
        return own
    path = os.path.join(bundle, TASK_CONFIG_NAME)
    try:
        # the bundle is containerd's state (/run): replaced atomically, not fsync'ed (`atomic_write`)
        write_runc_criu_config(path, plugin_dir=settings.plugin_dir, durable=False)
        annotate_bundle(bundle, path, durable=False)
    except (OSError, ValueError) as exc:
        raise TTRPCError(Code.FAILED_PRECONDITION,
                         f"create container {container_id}: cannot write the CRIU config {path}: {exc}") from exc
    spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = path
    return path


def write_note(directory: str, doc: Mapping) -> None:
    """Our note in containerd's checkpoint dir: unique per checkpoint (id, time, where the image is)."""
    atomic_write(os.path.join(directory, NOTE_NAME), json.dumps(dict(doc), sort_keys=True))


def image_problem(path: str) -> str:
    """"" when ``path`` looks like a whole CRIU dump (`criu.images.validate_image_dir`), else why not:
    the check `shim.policy.untrusted` applies to what a pod names."""
    from criu.errors import CriuImageError
    from criu.images import validate_image_dir

    try:
        validate_image_dir(path)
    except CriuImageError as exc:
        return str(exc)
    return ""


def containerd_checkpoint_source(path: str, settings: CheckpointSettings, node: NodeConfig, container_id: str,
                                 namespace: str, verify: Optional[ImageVerifier] = None) -> RestoreSource:
    """containerd's checkpoint dir (a trusted client's, e.g. ``ctr c restore``), checked with the
    detailed errors: missing or not a directory is InvalidArgument; empty, not CRIU, corrupt or
    incomplete is FailedPrecondition. A dir holding only our note (containerd's copy of a checkpoint
    whose image went to an image_path or CriuImagePath) leads to the image the note names, where
    `shim.policy.untrusted.note_target` allows it (the note is content).

    ``verify`` (the seal) sees the image before anything in it is read: a dir that holds a CRIU
    image (its inventory, not read) is verified before its note is looked at; a dir without one
    is containerd's copy of a note only (not sealed: the image it names is), and the note is read
    (as an untrusted record) to find the image, which is verified where it is found."""
    from criu.errors import CriuImageError
    from criu.images import INVENTORY, validate_image_dir

    origin = "containerd checkpoint"
    what = f"restore container {container_id} ({origin})"
    if not os.path.isabs(path):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what}: checkpoint image path {path!r} is not absolute")
    source = RestoreSource(origin=origin, key="checkpoint", value=path, path=path, trusted=True)
    has_image = os.path.lexists(os.path.join(path, INVENTORY))
    note = None if has_image else read_note(path)
    target = note.get("image_path") if note else None
    if target and settings.scope is not None:
        roots = [settings.scope.directory(node.checkpoint_store)]
        roots += [settings.scope.directory(r) for r in (node.store_ram_dir, node.store_disk_dir) if r]  # tiers
        if settings.image_root:
            roots.append(settings.scope.directory(settings.image_root))
        roots += list(node.restore_roots)
        source = note_target(str(target), path, roots, node, settings.scope, container_id, namespace, verify)
    elif verify is not None and os.path.isdir(path):
        verify(path, path, "checkpoint", path)
    try:
        stats = validate_image_dir(source.path)
    except CriuImageError as exc:
        code = Code.INVALID_ARGUMENT if exc.reason in ("missing", "not-a-directory") else Code.FAILED_PRECONDITION
        raise TTRPCError(code, f"{what}: {exc}") from exc
    log.info("container %s: restore from %s (%d bytes, %d bytes of pages)", container_id, source.path,
             stats.total_bytes, stats.page_bytes)
    return source


def recorded_options(image_dir: str) -> dict:
    """The CheckpointOptions a (kybernate) checkpoint was taken with, from its completion marker
    (read as an untrusted record: a regular file, size-capped)."""
    from criu.images import COMPLETE_MARKER, MARKER_VERSION

    doc = read_record(image_dir, COMPLETE_MARKER) or {}
    if doc.get("version") != MARKER_VERSION:
        return {}
    opts = (doc.get("meta") or {}).get("options")
    return opts if isinstance(opts, dict) else {}
