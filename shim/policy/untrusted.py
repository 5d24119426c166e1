"""Where what a pod, an image or a checkpoint image says becomes settings, or is refused.

Untrusted (docs/security.md): a container's annotations (``kybernate.io/*``, passed through from pod
and container annotations), its process env (the image's ``Env`` and the pod's), and the records
found in checkpoint image dirs (our note, the completion marker). Trusted: containerd (its request
fields, its namespace, the CRI plugin's own annotations), containerd's runtime options, and the
node's config (`shim.policy.node.NodeConfig`). Every untrusted value read for checkpoint and restore
passes through here:

    kybernate.io/checkpoint-exit: "true"              stop the task after its checkpoint
    kybernate.io/checkpoint-tcp-established: "true"   established TCP connections (also on restore)
    kybernate.io/checkpoint-ext-unix-sk: "true"       external unix sockets
    kybernate.io/checkpoint-file-locks: "true"        file locks
    kybernate.io/checkpoint-shell-job: "true"         a task with a terminal (CRIU --shell-job)
    kybernate.io/restore-from: NAME                   restore on Create from the checkpoint NAME in the
                                                      container's scope of the store (shim.policy.store)
    kybernate.io/criu-plugin-dir                      refused: CRIU (root) would load any .so in it;
                                                      the plugin dir is the node's (criu.plugin_dir)
    env RESTORE_FROM=NAME                             ignored (audit line) unless the node's config
                                                      says checkpoint.accept_restore_from_env

A refusal is a TTRPCError (InvalidArgument for a malformed value, PermissionDenied for one that asks
for more than a pod may have) naming the key and value, and an audit line (`shim.policy.audit`). A
restore source that cannot be used gets one sentence whatever the reason (missing, not allowed,
not a directory, not a CRIU image), so that a pod cannot probe the host's paths; the reason goes to
the audit line only.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from fsutil.bounded import UnsafeFile, read_regular
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.policy import store
from shim.policy.audit import ignored, refuse
from shim.policy.node import NodeConfig

log = logging.getLogger("kybernate.shim")

RESTORE_FROM_ANNOTATION = "kybernate.io/restore-from"
RESTORE_FROM_ENV = "RESTORE_FROM"
PLUGIN_DIR_ANNOTATION = "kybernate.io/criu-plugin-dir"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
NOTE_NAME = "kybernate-checkpoint.json"   # our note in containerd's checkpoint dir (shim.checkpoint.settings)
MAX_RECORD_BYTES = 1 << 20
RESTORE_REFUSED = "no checkpoint of that name that this container may restore from"

#: annotation -> CheckpointOptions field it turns on
OPTION_ANNOTATIONS = {
    "kybernate.io/checkpoint-exit": "exit",
    "kybernate.io/checkpoint-tcp-established": "open_tcp",
    "kybernate.io/checkpoint-ext-unix-sk": "external_unix_sockets",
    "kybernate.io/checkpoint-file-locks": "file_locks",
    "kybernate.io/checkpoint-shell-job": "terminal",
}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def annotations_of(spec: Mapping) -> Mapping[str, str]:
    ann = spec.get("annotations") if isinstance(spec, Mapping) else None
    return ann if isinstance(ann, Mapping) else {}


def env_of(spec: Mapping, name: str) -> Optional[str]:
    process = spec.get("process") if isinstance(spec, Mapping) else None
    env = process.get("env") if isinstance(process, Mapping) else None
    for item in env if isinstance(env, list) else ():
        if isinstance(item, str) and item.startswith(name + "="):
            return item[len(name) + 1:]
    return None


def is_sandbox(spec: Mapping) -> bool:
    """The CRI sandbox (pause) container: pod annotations reach it too, it is never restored."""
    return annotations_of(spec).get(CONTAINER_TYPE_ANNOTATION) == "sandbox"


# ---- checkpoint settings --------------------------------------------------------------------------
@dataclass(frozen=True)
class PodCheckpointSettings:
    """What a container's spec may say about its checkpoints, checked, with the node's part:
    `shim.checkpoint.settings.CheckpointSettings.from_pod` adds containerd's runtime options."""

    annotated: Mapping[str, bool]       # CheckpointOptions field -> True, from the option annotations
    plugin_dir: Optional[str]           # the node's CRIU plugin dir (None: CRIU's built-in default)
    scope: store.Scope                  # whose checkpoints it may restore from


def checkpoint_settings(spec: Mapping, node: NodeConfig, container_id: str, namespace: str) -> PodCheckpointSettings:
    """A container's standing checkpoint settings, at Create: its option annotations (each a
    boolean, or InvalidArgument), the node's CRIU plugin dir (a pod asking for one is refused with
    PermissionDenied), and its scope in the store."""
    ann = annotations_of(spec)
    annotated = {}
    for key, field in OPTION_ANNOTATIONS.items():
        if key in ann and _flag(container_id, namespace, key, ann[key]):
            annotated[field] = True
    if PLUGIN_DIR_ANNOTATION in ann:
        raise refuse(Code.PERMISSION_DENIED, container_id, PLUGIN_DIR_ANNOTATION, ann[PLUGIN_DIR_ANNOTATION],
                     "CRIU runs as root and loads every library in its plugin dir: the plugin dir comes only "
                     "from the node's config (criu.plugin_dir, KYBERNATE_CRIU_PLUGIN_DIR)", namespace=namespace)
    try:
        scope = store.scope_of(namespace, container_id, ann)
    except ValueError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"create container {container_id}: {exc}") from None
    return PodCheckpointSettings(annotated=annotated, plugin_dir=node_plugin_dir(node, container_id), scope=scope)


def _flag(container_id: str, namespace: str, key: str, value: object) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise refuse(Code.INVALID_ARGUMENT, container_id, key, value, "must be true or false", namespace=namespace)


def node_plugin_dir(node: NodeConfig, container_id: str) -> Optional[str]:
    """The node's CRIU plugin dir (None: CRIU's built-in default); one that does not exist is
    skipped with a log line rather than failing every Create on the node."""
    if not node.criu_plugin_dir:
        return None
    if os.path.isdir(node.criu_plugin_dir):
        return node.criu_plugin_dir
    log.warning("container %s: CRIU plugin dir %s (node config %s) does not exist: CRIU's default used",
                container_id, node.criu_plugin_dir, node.source)
    return None


# ---- restore sources ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreSource:
    """A checked checkpoint image to restore from, and how to find it again at Start.

    ``root``/``name``: the image is ``name`` beneath ``root``, found without leaving it (a name a pod
    gave, or a note's target); ``root`` "" means ``path`` itself (containerd's own checkpoint dir,
    from a trusted client). ``path`` is the real path found at Create (for logs)."""

    origin: str                 # "containerd checkpoint", "annotation kybernate.io/restore-from", ...
    key: str
    value: str
    path: str
    root: str = ""
    name: str = ""
    trusted: bool = False

    def open(self, container_id: str, namespace: str = "") -> int:
        """An fd of the image dir, found again the same way (Start may come long after Create; the
        fd is what CRIU reads, through `store.fd_path`). TTRPCError when it is gone."""
        try:
            if self.root:
                return store.open_beneath(self.root, self.name)
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except store.StoreError as exc:
            reason = exc.reason
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if self.trusted:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"restore container {container_id} ({self.origin}): "
                                                       f"checkpoint image {self.path}: {reason}")
        raise refuse(Code.PERMISSION_DENIED, container_id, self.key, self.value, RESTORE_REFUSED,
                     action="restore", namespace=namespace, detail=f"at start: {reason}")


#: "" when a directory holds a whole CRIU image, else why not (the seam's check, `criu.images`)
ImageProblem = Callable[[str], str]
#: The seal check (`shim.checkpoint.seal.check_restore`, handed in by the seam): called once a restore
#: source is found and allowed, before anything in it is read, with (a path that reads the directory
#: that was found, its real path for messages, the key and the value that named it); raises
#: TTRPCError (PermissionDenied with an audit line) to refuse the image.
ImageVerifier = Callable[[str, str, str, str], None]
#: The tier store's resolution of a checkpoint id (handed in by the seam where the node has tiers):
#: called with (the value a pod named, its scope, the key that named it); None when the value is no
#: checkpoint id (then it is a name in the store, as always), else (the scope's directory in the tier
#: that holds it, the checkpoint's name beneath it), pulled from the registry first where need be.
#: Raises TTRPCError (with an audit line) naming the id and the tier for an id it cannot serve.
IdLocator = Callable[[str, store.Scope, str], Optional[tuple[str, str]]]


def pod_restore_source(spec: Mapping, scope: store.Scope, node: NodeConfig, container_id: str, namespace: str,
                       image_problem: ImageProblem, verify: Optional[ImageVerifier] = None,
                       locate: Optional[IdLocator] = None) -> Optional[RestoreSource]:
    """What a Create that containerd gave no checkpoint restores from, as the pod asks, checked
    before anything is created; None for a fresh start. The annotation kybernate.io/restore-from,
    then (only where the node opts in) RESTORE_FROM in the process env; never for the CRI sandbox.
    ``verify`` (the seal) sees the image once it is found, before ``image_problem`` reads it."""
    if is_sandbox(spec):
        return None
    ann = annotations_of(spec).get(RESTORE_FROM_ANNOTATION)
    env = env_of(spec, RESTORE_FROM_ENV)
    if ann:
        if env:
            ignored(container_id, f"env {RESTORE_FROM_ENV}", env, f"{RESTORE_FROM_ANNOTATION} is set", namespace)
        return _pod_source(RESTORE_FROM_ANNOTATION, f"annotation {RESTORE_FROM_ANNOTATION}", ann, scope, node,
                           container_id, namespace, image_problem, verify, locate)
    if env:
        if not node.accept_restore_from_env:
            ignored(container_id, f"env {RESTORE_FROM_ENV}", env,
                    "an image's or pod's env does not choose a restore (node config "
                    "checkpoint.accept_restore_from_env is off): the container starts fresh", namespace)
            return None
        return _pod_source(f"env {RESTORE_FROM_ENV}", f"env {RESTORE_FROM_ENV}", env, scope, node,
                           container_id, namespace, image_problem, verify, locate)
    return None


def _pod_source(key: str, origin: str, value: str, scope: store.Scope, node: NodeConfig, container_id: str,
                namespace: str, image_problem: ImageProblem, verify: Optional[ImageVerifier],
                locate: Optional[IdLocator] = None) -> RestoreSource:
    """A restore source a pod named: a checkpoint id the node's tiers serve (``locate``), a
    checkpoint in its own scope of the store (a relative name, or an absolute path inside the
    scope), or beneath one of the node's restore_roots."""
    located = locate(value, scope, key) if locate is not None else None
    try:
        root, name = located if located is not None else _place(value, scope, node)
        real = _check_image(root, name, node, scope, image_problem,
                            (lambda via, real: verify(via, real, key, value)) if verify else None)
    except store.StoreError as exc:
        raise refuse(Code.PERMISSION_DENIED, container_id, key, value, RESTORE_REFUSED, action="restore",
                     namespace=namespace, detail=exc.reason) from None
    log.info("container %s: restore from %s (%s, scope %s)", container_id, real, origin, scope)
    return RestoreSource(origin=origin, key=key, value=value, path=real, root=root, name=name)


def _place(value: str, scope: store.Scope, node: NodeConfig) -> tuple[str, str]:
    """(root, relative name) for a name a pod gave; StoreError for one outside everything allowed."""
    if ".." in value.split("/"):
        raise store.StoreError("holds '..'")
    scope_dir = scope.directory(node.checkpoint_store)
    if not os.path.isabs(value):
        return scope_dir, value
    path = os.path.normpath(value)
    if store.within(path, scope_dir):
        return scope_dir, os.path.relpath(path, scope_dir)
    if store.within(path, node.checkpoint_store):
        raise store.StoreError(f"in the checkpoint store outside this container's scope {scope}")
    for root in node.restore_roots:
        if store.within(path, root) and os.path.normpath(root) != path:
            return os.path.normpath(root), os.path.relpath(path, os.path.normpath(root))
    raise store.StoreError("an absolute path outside the checkpoint store and the node's restore_roots")


def _outside_scope(real: str, node: NodeConfig, scope: store.Scope) -> bool:
    """In the store, but not in the scope (a restore root that holds the store opens no other scope)."""
    return (store.within(real, os.path.realpath(node.checkpoint_store))
            and not store.within(real, os.path.realpath(scope.directory(node.checkpoint_store))))


def _check_image(root: str, name: str, node: NodeConfig, scope: store.Scope, image_problem: ImageProblem,
                 verify: Optional[Callable[[str, str], None]] = None) -> str:
    """Open ``name`` beneath ``root``, make sure it is not in another scope of the store, verify it
    (the seal: ``verify(fd path, real path)``, which refuses on its own; before anything in the
    directory is read), and that it looks like a whole CRIU dump; returns its real path. StoreError
    for each reason but the seal's."""
    for tier_root in (node.checkpoint_store, node.store_ram_dir, node.store_disk_dir):
        if tier_root and store.within(root, tier_root):
            store.check_store_root(tier_root)
    fd = store.open_beneath(root, name)
    try:
        real = store.real_path(fd)
        if _outside_scope(real, node, scope):
            raise store.StoreError(f"{real} is in the checkpoint store outside this container's scope {scope}")
        via = f"/proc/self/fd/{fd}"
        if verify is not None:
            verify(via, real)
        problem = image_problem(via)
        if problem:
            raise store.StoreError(f"{real}: {problem.replace(via, real)}")
    finally:
        os.close(fd)
    return real


def note_target(target: str, note_dir: str, roots: list[str], node: NodeConfig, scope: store.Scope,
                container_id: str, namespace: str, verify: Optional[ImageVerifier] = None) -> RestoreSource:
    """Where our note in containerd's checkpoint dir leads. The note is content that may have
    travelled through a registry: it is followed only beneath ``roots`` (the container's scope of the
    store and of CriuImagePath, the node's restore_roots), without links, never into another scope
    of the store; else PermissionDenied naming the note. ``verify`` (the seal) sees the image it
    leads to, through the fd that found it."""
    key = f"{NOTE_NAME} image_path"
    try:
        if not os.path.isabs(target) or ".." in target.split("/"):
            raise store.StoreError("not an absolute path without '..'")
        root = next((os.path.normpath(r) for r in roots
                     if store.within(target, r) and os.path.normpath(target) != os.path.normpath(r)), None)
        if root is None:
            raise store.StoreError("outside this container's scope of the store and of CriuImagePath, and "
                                   "outside the node's restore_roots")
        name = os.path.relpath(os.path.normpath(target), root)
        fd = store.open_beneath(root, name)
        try:
            real = store.real_path(fd)
            if _outside_scope(real, node, scope):
                raise store.StoreError(f"{real} is in the checkpoint store outside this container's scope {scope}")
            if verify is not None:
                verify(f"/proc/self/fd/{fd}", real, "checkpoint", target)
        finally:
            os.close(fd)
    except store.StoreError as exc:
        raise refuse(Code.PERMISSION_DENIED, container_id, key, target, "the note in containerd's checkpoint "
                     f"{note_dir} leads to an image this container may not restore from", action="restore",
                     namespace=namespace, detail=exc.reason) from None
    log.info("container %s: %s holds a note: the image is in %s", container_id, note_dir, real)
    return RestoreSource(origin="containerd checkpoint", key=key, value=target, path=real, root=root, name=name,
                         trusted=True)


# ---- records read from image dirs ---------------------------------------------------------------
def read_record(directory: str, name: str, limit: int = MAX_RECORD_BYTES) -> Optional[dict]:
    """A small JSON record from an image dir: a regular file (never through a link), at most
    ``limit`` bytes, a JSON object; None otherwise (absent, a link, a fifo, too big, not JSON)."""
    try:
        found = read_regular(os.path.join(directory, name), limit)
    except UnsafeFile as exc:
        log.warning("%s: ignored", exc)
        return None
    except OSError:
        return None
    if found is None:
        return None
    data, _ = found
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def read_note(directory: str) -> Optional[dict]:
    """Our note in a checkpoint dir (`shim.checkpoint.settings.write_note`), as an untrusted record."""
    return read_record(directory, NOTE_NAME)

