"""What a container's spec, its runtime options and the shim's environment say about checkpoint and
restore: the data half of `shim.checkpoint.seam` (which does the work).

Why annotations: ``ctr task checkpoint`` fills CheckpointOptions (``--exit``, ``--image-path``) only for
runc's runtimes and has no flag at all for tcp-established; kubelet never sends options. So a
container may ask for its checkpoint options in its OCI spec (``ctr run --annotation``, or a pod
annotation passed through ``container_annotations``), OR-ed with whatever the request carries:

    kybernate.io/checkpoint-exit: "true"              stop the task after its checkpoint
    kybernate.io/checkpoint-tcp-established: "true"   established TCP connections (also on restore)
    kybernate.io/checkpoint-ext-unix-sk: "true"       external unix sockets
    kybernate.io/checkpoint-file-locks: "true"        file locks
    kybernate.io/checkpoint-shell-job: "true"         a task with a terminal (CRIU --shell-job)
    kybernate.io/criu-plugin-dir: DIR                 CRIU plugins (else $KYBERNATE_CRIU_PLUGIN_DIR,
                                                      else /usr/local/lib/criu)
    kybernate.io/restore-from: DIR                    restore this container from DIR on Create
                                                      (also the process env RESTORE_FROM=DIR)

Where the image goes: the request's image_path option, else the runtime option CriuImagePath
(``<CriuImagePath>/<namespace>/<id>/<UTC time>``, the layout `kybernate checkpoint` uses), else the
request's path (containerd's directory, which containerd stores as the checkpoint in its content
store). When the image goes elsewhere, a note naming it is written into the request's path, so that
containerd stores a distinct blob every time and a restore from containerd's copy finds the image.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from fsutil.atomic import atomic_write
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

log = logging.getLogger("kybernate.shim")

RESTORE_FROM_ANNOTATION = "kybernate.io/restore-from"
RESTORE_FROM_ENV = "RESTORE_FROM"
PLUGIN_DIR_ANNOTATION = "kybernate.io/criu-plugin-dir"
PLUGIN_DIR_ENV = "KYBERNATE_CRIU_PLUGIN_DIR"
DEFAULT_PLUGIN_DIR = "/usr/local/lib/criu"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
NOTE_NAME = "kybernate-checkpoint.json"

#: annotation -> CheckpointOptions field it turns on
OPTION_ANNOTATIONS = {
    "kybernate.io/checkpoint-exit": "exit",
    "kybernate.io/checkpoint-tcp-established": "open_tcp",
    "kybernate.io/checkpoint-ext-unix-sk": "external_unix_sockets",
    "kybernate.io/checkpoint-file-locks": "file_locks",
    "kybernate.io/checkpoint-shell-job": "terminal",
}
BOOL_FIELDS = ("exit", "open_tcp", "external_unix_sockets", "terminal", "file_locks")
#: the CheckpointOptions fields that CRIU also needs on restore
RESTORE_FIELDS = ("open_tcp", "external_unix_sockets", "terminal", "file_locks")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def annotations_of(spec: Mapping) -> Mapping[str, str]:
    ann = spec.get("annotations") if isinstance(spec, Mapping) else None
    return ann if isinstance(ann, Mapping) else {}


def env_of(spec: Mapping, name: str) -> Optional[str]:
    process = spec.get("process") if isinstance(spec, Mapping) else None
    for item in (process or {}).get("env") or []:
        if isinstance(item, str) and item.startswith(name + "="):
            return item[len(name) + 1:]
    return None


def is_sandbox(spec: Mapping) -> bool:
    """The CRI sandbox (pause) container: pod annotations reach it too, it is never restored."""
    return annotations_of(spec).get(CONTAINER_TYPE_ANNOTATION) == "sandbox"


def _flag(container_id: str, key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise TTRPCError(Code.INVALID_ARGUMENT,
                     f"create container {container_id}: annotation {key}={value!r} must be true or false")


@dataclass(frozen=True)
class CheckpointSettings:
    """A container's standing checkpoint settings, fixed at Create."""

    annotated: Mapping[str, bool]       # CheckpointOptions field -> True, from the annotations
    plugin_dir: Optional[str]           # CRIU libdir (None: CRIU's own default)
    image_root: str = ""                # runtime option CriuImagePath
    work_root: str = ""                 # runtime option CriuWorkPath

    @classmethod
    def from_spec(cls, spec: Mapping, options: Any, container_id: str,
                  environ: Mapping[str, str] = os.environ) -> "CheckpointSettings":
        ann = annotations_of(spec)
        annotated = {field: True for key, field in OPTION_ANNOTATIONS.items()
                     if key in ann and _flag(container_id, key, ann[key])}
        return cls(annotated=annotated, plugin_dir=plugin_dir_for(spec, container_id, environ),
                   image_root=getattr(options, "criu_image_path", "") or "",
                   work_root=getattr(options, "criu_work_path", "") or "")

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
        """Where this checkpoint's image goes (see the module docstring)."""
        if requested:
            return requested
        if self.image_root:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            base = os.path.join(self.image_root, namespace, container_id, stamp)
            path, n = base, 1
            while os.path.exists(path):  # two checkpoints within one second
                n += 1
                path = f"{base}.{n}"
            return path
        return request_path

    def work_dir(self, requested: str, container_id: str) -> str:
        """CRIU's work dir (its logs); "" = a scratch dir of the shim, removed afterwards."""
        if requested:
            return requested
        if self.work_root:
            return os.path.join(self.work_root, container_id)
        return ""


def plugin_dir_for(spec: Mapping, container_id: str, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The CRIU plugin dir: annotation, then env, then the default; a dir named by the annotation
    must exist (the operator asked for it), the env/default one is skipped when absent."""
    asked = annotations_of(spec).get(PLUGIN_DIR_ANNOTATION)
    if asked:
        if not os.path.isabs(asked) or not os.path.isdir(asked):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"create container {container_id}: "
                             f"{PLUGIN_DIR_ANNOTATION}={asked!r} is not an absolute path to a directory")
        return asked
    for candidate, source in ((environ.get(PLUGIN_DIR_ENV), PLUGIN_DIR_ENV), (DEFAULT_PLUGIN_DIR, "default")):
        if candidate:
            if os.path.isdir(candidate):
                return candidate
            log.info("container %s: CRIU plugin dir %s (%s) does not exist: CRIU's default used",
                     container_id, candidate, source)
    return None


def prepare_bundle(bundle: str, spec: dict, settings: CheckpointSettings, container_id: str) -> Optional[str]:
    """Write the per-task CRIU config and name it in config.json (org.criu.config) before runc reads
    the spec: runc takes the annotation from the spec it stored at create for a checkpoint (runc 1.1.5
    and 1.3.6 alike), and from config.json at restore. A spec that names its own file keeps it."""
    from criu.config import CRIU_CONFIG_ANNOTATION, TASK_CONFIG_NAME, annotate_bundle, write_runc_criu_config

    own = annotations_of(spec).get(CRIU_CONFIG_ANNOTATION)
    if own is not None:
        log.info("container %s: the spec names its own CRIU config %r; plugin dir not set by kybernate",
                 container_id, own)
        return own
    path = os.path.join(bundle, TASK_CONFIG_NAME)
    try:
        write_runc_criu_config(path, plugin_dir=settings.plugin_dir)
        annotate_bundle(bundle, path)
    except (OSError, ValueError) as exc:
        raise TTRPCError(Code.FAILED_PRECONDITION,
                         f"create container {container_id}: cannot write the CRIU config {path}: {exc}") from exc
    spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = path
    return path


def restore_source(checkpoint: str, spec: Mapping) -> tuple[str, str]:
    """(image dir, where it came from) for Create: containerd's checkpoint, else the annotation, else
    RESTORE_FROM in the process env; ("", "") for a fresh start (always for the CRI sandbox)."""
    if checkpoint:
        return checkpoint, "containerd checkpoint"
    if is_sandbox(spec):
        return "", ""
    ann = annotations_of(spec).get(RESTORE_FROM_ANNOTATION)
    if ann:
        return ann, f"annotation {RESTORE_FROM_ANNOTATION}"
    env = env_of(spec, RESTORE_FROM_ENV)
    if env:
        return env, f"env {RESTORE_FROM_ENV}"
    return "", ""


_REASON_CODES = {"missing": Code.INVALID_ARGUMENT, "not-a-directory": Code.INVALID_ARGUMENT}


def resolve_image(path: str, container_id: str, source: str,
                  verify: Optional[Callable[[str], None]] = None) -> str:
    """The CRIU image dir to restore from, checked before anything is created.

    A directory holding only our note (containerd's copy of a checkpoint whose image went to
    CriuImagePath or an image_path option) leads to the image the note names. Missing or not a
    directory: InvalidArgument; empty, not CRIU, corrupt or incomplete: FailedPrecondition.
    `verify` (the seal, `shim.checkpoint.seal.check_restore`) sees a directory before anything in it
    is parsed: an image is authenticated before even our own checks read its records.
    """
    from criu.errors import CriuImageError
    from criu.images import INVENTORY, validate_image_dir

    what = f"restore container {container_id} ({source})"
    if not os.path.isabs(path):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what}: checkpoint image path {path!r} is not absolute")
    image = path
    note = read_note(path)
    if note and not os.path.exists(os.path.join(path, INVENTORY)) and note.get("image_path"):
        image = str(note["image_path"])
        log.info("container %s: %s holds a note: the image is in %s", container_id, path, image)
    if verify is not None and os.path.isdir(image):
        verify(image)
    try:
        stats = validate_image_dir(image)
    except CriuImageError as exc:
        raise TTRPCError(_REASON_CODES.get(exc.reason, Code.FAILED_PRECONDITION), f"{what}: {exc}") from exc
    log.info("container %s: restore from %s (%d bytes, %d bytes of pages)", container_id, image,
             stats.total_bytes, stats.page_bytes)
    return image


def write_note(directory: str, doc: Mapping) -> None:
    """Our note in containerd's checkpoint dir: unique per checkpoint (id, time, where the image is)."""
    atomic_write(os.path.join(directory, NOTE_NAME), json.dumps(dict(doc), sort_keys=True))


def read_note(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, NOTE_NAME)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def recorded_options(image_dir: str) -> dict:
    """The CheckpointOptions a (kybernate) checkpoint was taken with, from its completion marker."""
    from criu.images import read_completion

    doc = read_completion(image_dir) or {}
    opts = (doc.get("meta") or {}).get("options")
    return opts if isinstance(opts, dict) else {}
