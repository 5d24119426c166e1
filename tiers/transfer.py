"""Moving one checkpoint image between a directory tier and the registry.

A checkpoint in the registry is one OCI image manifest, tagged with the checkpoint id:

    config   application/vnd.kybernate.checkpoint.config.v1+json: the image's index (`CONFIG_FORMAT`):
             its id and scope, and every file with its mode, size and chunk digests, in order
    layers   application/vnd.kybernate.checkpoint.chunk.v1: every distinct chunk (`tiers.chunks`), once
    annotations  io.kybernate.checkpoint.id, io.kybernate.checkpoint.scope, org.opencontainers.image.created

`push` sends only the chunks the repository lacks (a HEAD first: an earlier checkpoint of the same
container, or a push that a crash broke off, already put them there), in parallel, then the config,
then the manifest last: a tag exists only for an image whose every blob is there. `pull` reads the
manifest and the config as untrusted input (shape, sizes, single-component file names, every chunk
listed among the manifest's layers, the scope the caller expects), fetches the chunks in parallel,
each hashed while it streams, into a hidden directory beside its final place, and renames it into
place only when every byte is checked: a failed pull leaves nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from tiers import REGISTRY, TierError
from tiers.catalog import Record
from tiers.chunks import index, read_piece, unique_chunks
from tiers.registry import MANIFEST_TYPE, Registry

CONFIG_TYPE = "application/vnd.kybernate.checkpoint.config.v1+json"
CHUNK_TYPE = "application/vnd.kybernate.checkpoint.chunk.v1"
CONFIG_FORMAT = 1
MAX_CONFIG_BYTES = 16 << 20
MAX_FILES = 100_000
ANNOTATION_ID = "io.kybernate.checkpoint.id"
ANNOTATION_SCOPE = "io.kybernate.checkpoint.scope"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

Progress = Callable[[int, int], None]   # (bytes done, bytes in all)


@dataclass(frozen=True)
class Pushed:
    manifest_digest: str
    total_bytes: int       # the image
    sent_bytes: int        # blobs this push uploaded
    shared_bytes: int      # blobs the repository already held (earlier checkpoints, a broken-off push)
    blobs: int
    seconds: float


def push(registry: Registry, image_dir: str, record: Record, chunk_bytes: int, parallel: int,
         progress: Optional[Progress] = None) -> Pushed:
    started = time.monotonic()
    cid = record.id
    try:
        files = index(image_dir, chunk_bytes)
    except (OSError, ValueError) as exc:
        raise TierError(cid, REGISTRY, "io", f"cannot read the image {image_dir}: {exc}") from None
    blobs = unique_chunks(files)
    where = {}
    for f in files:
        off = 0
        for c in f.chunks:
            where.setdefault(c.digest, (os.path.join(image_dir, f.name), off))
            off += c.size
    total = sum(c.size for c in blobs)
    lock = threading.Lock()
    counts = {"done": 0, "sent": 0, "shared": 0}

    def one(chunk) -> None:
        if registry.has_blob(chunk.digest, cid):
            kind = "shared"
        else:
            path, off = where[chunk.digest]
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                data = read_piece(fd, off, chunk.size)
            finally:
                os.close(fd)
            registry.push_blob(chunk.digest, data, cid)
            kind = "sent"
        with lock:
            counts[kind] += chunk.size
            counts["done"] += chunk.size
            if progress:
                progress(counts["done"], total)

    _run_all(one, blobs, parallel)
    config = {"format": CONFIG_FORMAT, "id": cid, "namespace": record.namespace,
              "pod_namespace": record.pod_namespace, "name": list(record.name),
              "container_id": record.container_id, "created": record.created, "gpu": record.gpu,
              "sealed": record.sealed, "rootfs_diff": record.rootfs_diff, "chunk_bytes": chunk_bytes,
              "files": [{"name": f.name, "size": f.size, "mode": f.mode,
                         "chunks": [[c.digest, c.size] for c in f.chunks]} for f in files]}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    if not registry.has_blob(config_digest, cid):
        registry.push_blob(config_digest, config_bytes, cid)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": CHUNK_TYPE, "digest": c.digest, "size": c.size} for c in blobs],
                "annotations": {ANNOTATION_ID: cid, ANNOTATION_SCOPE: record.scope_text,
                                "org.opencontainers.image.created":
                                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created or time.time()))}}
    digest = registry.put_manifest(cid, json.dumps(manifest, sort_keys=True).encode(), cid)
    return Pushed(digest, sum(f.size for f in files), counts["sent"], counts["shared"], len(blobs),
                  time.monotonic() - started)


def _run_all(fn, items, parallel: int) -> None:
    """fn over items in ``parallel`` threads; the first error is raised once all have stopped (the
    rest are cancelled)."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items))), thread_name_prefix="kyb-xfer") as pool:
        futures = [pool.submit(fn, item) for item in items]
        error = None
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - the first one is re-raised below
                if error is None:
                    error = exc
                    for g in futures:
                        g.cancel()
        if error is not None:
            raise error


# ---- pull ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteImage:
    """A checked manifest and config: what `pull` will write."""

    checkpoint_id: str
    manifest_digest: str
    namespace: str
    pod_namespace: str
    name: tuple[str, ...]
    container_id: str
    created: float
    gpu: bool
    sealed: bool
    rootfs_diff: bool
    files: tuple            # ((name, size, mode, ((digest, size), ...)), ...)
    total_bytes: int


def _malformed(cid: str, why: str) -> TierError:
    return TierError(cid, REGISTRY, "malformed", f"the registry's manifest {why}: refused")


def inspect(registry: Registry, checkpoint_id: str, expected_scope: Optional[tuple[str, str]] = None) -> RemoteImage:
    """The registry's manifest and config for ``checkpoint_id``, checked. ``expected_scope``
    (containerd namespace, Kubernetes namespace or ""): a checkpoint of another scope is refused
    (``foreign-scope``) before any blob but the config is read."""
    from shim.policy.store import component as _component

    cid = checkpoint_id
    try:
        manifest, digest = registry.get_manifest(cid, cid)
    except TierError as exc:
        if exc.kind == "not-found":
            raise TierError(cid, REGISTRY, "unknown", f"no such checkpoint in registry {registry}") from None
        raise
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if (manifest.get("schemaVersion") != 2 or not isinstance(config_desc, dict) or not isinstance(layers, list)
            or config_desc.get("mediaType") != CONFIG_TYPE):
        raise _malformed(cid, "is not a kybernate checkpoint")
    annotations = manifest.get("annotations") if isinstance(manifest.get("annotations"), dict) else {}
    if expected_scope is not None and annotations.get(ANNOTATION_SCOPE) not in (None, _scope_text(*expected_scope)):
        raise TierError(cid, REGISTRY, "foreign-scope", f"belongs to scope {str(annotations.get(ANNOTATION_SCOPE))[:100]!r}, "
                                                        f"not to this container's {_scope_text(*expected_scope)!r}")
    listed = {}
    for layer in layers:
        if (not isinstance(layer, dict) or not isinstance(layer.get("digest"), str)
                or not _DIGEST.fullmatch(layer["digest"]) or not isinstance(layer.get("size"), int)
                or layer["size"] < 0):
            raise _malformed(cid, "lists a layer that is no sha256 blob with a size")
        listed[layer["digest"]] = layer["size"]
    size = config_desc.get("size")
    cdigest = config_desc.get("digest")
    if not isinstance(size, int) or not 0 < size <= MAX_CONFIG_BYTES or not isinstance(cdigest, str) \
            or not _DIGEST.fullmatch(cdigest):
        raise _malformed(cid, "has a config descriptor without a sha256 digest and a size up to 16 MiB")
    buf = bytearray(size)

    def sink(off: int, data: bytes) -> None:
        buf[off:off + len(data)] = data

    try:
        registry.get_blob(cdigest, size, sink, cid)
    except TierError as exc:
        if exc.kind == "not-found":
            raise TierError(cid, REGISTRY, "missing-blob", f"the manifest names config blob {cdigest}, which the "
                                                           f"registry does not have") from None
        raise
    try:
        config = json.loads(bytes(buf))
    except ValueError:
        raise _malformed(cid, "config is not JSON") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT or config.get("id") != cid:
        raise _malformed(cid, f"config is not format {CONFIG_FORMAT} of this id")
    ns, pod_ns, name = config.get("namespace"), config.get("pod_namespace"), config.get("name")
    try:
        _component(ns, "containerd namespace")
        if pod_ns:
            _component(pod_ns, "Kubernetes namespace")
        if not isinstance(name, list) or len(name) not in (1, 2):
            raise ValueError("name")
        for part in name:
            _component(part, "name")
    except (ValueError, TypeError):
        raise _malformed(cid, "config names a scope that is no directory of the store") from None
    if expected_scope is not None and (ns, pod_ns or "") != (expected_scope[0], expected_scope[1] or ""):
        raise TierError(cid, REGISTRY, "foreign-scope", f"belongs to scope {_scope_text(ns, pod_ns or '')!r}, not to "
                                                        f"this container's {_scope_text(*expected_scope)!r}")
    files = config.get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise _malformed(cid, "config has no file list")
    out, seen, total = [], set(), 0
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _FILE_NAME.fullmatch(f["name"]) \
                or f["name"] in seen or not isinstance(f.get("size"), int) or f["size"] < 0 \
                or not isinstance(f.get("mode"), int) or not isinstance(f.get("chunks"), list):
            raise _malformed(cid, "config lists a file without a plain name, size, mode and chunks")
        seen.add(f["name"])
        chunks = []
        for c in f["chunks"]:
            if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], int)):
                raise _malformed(cid, f"config lists a bad chunk of {f['name']}")
            if c[0] not in listed or listed[c[0]] != c[1]:
                raise _malformed(cid, f"config names chunk {c[0][:19]} of {f['name']} that the manifest does not list")
            chunks.append((c[0], c[1]))
        if sum(s for _, s in chunks) != f["size"]:
            raise _malformed(cid, f"config's chunks of {f['name']} do not add up to its size")
        total += f["size"]
        out.append((f["name"], f["size"], f["mode"] & 0o777, tuple(chunks)))
    return RemoteImage(cid, digest, ns, pod_ns or "", tuple(name), str(config.get("container_id") or ""),
                       float(config.get("created") or 0), bool(config.get("gpu")), bool(config.get("sealed")),
                       bool(config.get("rootfs_diff")), tuple(out), total)


def _scope_text(namespace: str, pod_namespace: str) -> str:
    return f"{namespace}/{pod_namespace or '_'}"


def pull(registry: Registry, image: RemoteImage, parent: str, parallel: int,
         progress: Optional[Progress] = None) -> str:
    """Write ``image`` as ``parent/<id>`` (the parent made by the caller, in a tier's layout);
    returns that path. Chunks are fetched in parallel; a blob that is missing, or whose bytes do not
    match its digest, fails the pull and removes everything it wrote."""
    cid = image.checkpoint_id
    final = os.path.join(parent, cid)
    if os.path.lexists(final):
        return final
    temp = os.path.join(parent, f".pull-{cid}-{os.getpid()}-{threading.get_ident()}")
    os.mkdir(temp, 0o700)
    fds: dict[str, int] = {}
    try:
        positions: dict[str, list] = {}
        for name, size, mode, chunks in image.files:
            fd = os.open(os.path.join(temp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode or 0o600)
            fds[name] = fd
            os.ftruncate(fd, size)
            off = 0
            for digest, csize in chunks:
                positions.setdefault(digest, []).append((fd, off, csize))
                off += csize
        lock = threading.Lock()
        done = {"bytes": 0}

        def one(item) -> None:
            digest, places = item
            fd, off, csize = places[0]

            def sink(at: int, data: bytes) -> None:
                os.pwrite(fd, data, off + at)

            try:
                registry.get_blob(digest, csize, sink, cid)
            except TierError as exc:
                if exc.kind == "not-found":
                    raise TierError(cid, REGISTRY, "missing-blob", f"the manifest names blob {digest}, which the "
                                                                   f"registry does not have: nothing restored") from None
                raise
            if len(places) > 1:
                rfd = os.open(os.path.join(temp, _name_of(fds, fd)), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = read_piece(rfd, off, csize)
                finally:
                    os.close(rfd)
                for ofd, ooff, _ in places[1:]:
                    os.pwrite(ofd, data, ooff)
            with lock:
                done["bytes"] += csize * len(places)
                if progress:
                    progress(done["bytes"], image.total_bytes)

        _run_all(one, list(positions.items()), parallel)
        for fd in fds.values():
            os.fsync(fd)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        os.rename(temp, final)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if not os.path.isdir(final):
            raise
    return final


def _name_of(fds: dict, fd: int) -> str:
    return next(n for n, f in fds.items() if f == fd)
