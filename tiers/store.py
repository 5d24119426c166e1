"""The tier store: where a new checkpoint goes, what the node holds, where a checkpoint id is found.

Used by the shim (`place` before a dump, `register` after the seal, `locate` at a restore by id),
by the worker (`copy_down`, `push_to_registry`, `evict`) and by `kybernate checkpoints`. See the
package docstring for the tiers and the layout.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from shim.policy import store as layout
from shim.policy.node import NodeConfig

from tiers import DISK, RAM, REGISTRY, TierError
from tiers.catalog import Catalog, Job, Record
from tiers.ids import is_id

log = logging.getLogger("kybernate.tiers")

SEAL_MANIFEST = "kybernate-seal.json"      # shim.checkpoint.seal.MANIFEST_NAME (only the name is needed)
GPU_RECORD = "kybernate-gpu.json"          # shim.gpu.records.RECORD_NAME
ROOTFS_DIFF = "rootfs-diff.tar"            # shim.checkpoint.rootfs_diff.ARCHIVE_NAME
FREE_MARGIN = 1.10                         # a dump needs its estimate and this much more of a filesystem


@dataclass(frozen=True)
class Placement:
    tier: str
    path: str            # the new checkpoint's directory (not made: the shim makes it)
    why: str             # for the log: why this tier


@dataclass(frozen=True)
class Located:
    tier: str            # where it was found (or pulled into)
    root: str            # the container's scope directory in that tier
    name: str            # the checkpoint's name beneath it (<name...>/<id>)
    pulled: bool = False


@dataclass(frozen=True)
class Evicted:
    checkpoint_id: str
    tier: str
    why: str


def _scope_parts(namespace: str, pod_namespace: str, name) -> list[str]:
    return [namespace, pod_namespace or layout.NO_POD_NAMESPACE, *name]


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.path for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except OSError:
        return []


def image_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def remove_image(path: str) -> None:
    """Remove a checkpoint directory (flat regular files; anything deeper is removed without
    crossing into another filesystem or following links)."""
    if not os.path.lexists(path):
        return
    dev = os.lstat(path).st_dev
    for top, dirs, files in os.walk(path, topdown=False, followlinks=False):
        for name in files:
            os.unlink(os.path.join(top, name))
        for name in dirs:
            p = os.path.join(top, name)
            if os.path.islink(p):
                os.unlink(p)
            elif os.lstat(p).st_dev == dev:
                os.rmdir(p)
    os.rmdir(path)


class TierStore:
    def __init__(self, node: NodeConfig, registry=None):
        self.node = node
        self.catalog = Catalog(node.store_state_dir)
        self.roots = {RAM: node.store_ram_dir, DISK: node.disk_tier_dir}
        self.caps = {RAM: node.store_ram_cap_mib << 20, DISK: node.store_disk_cap_mib << 20}
        self._registry = registry
        self._registry_lock = threading.Lock()

    # ---- the registry (made on first use: credentials are read only by those who need them) -------
    def registry(self):
        if not self.node.store_registry:
            return None
        with self._registry_lock:
            if self._registry is None:
                from tiers.registry import from_node

                try:
                    self._registry = from_node(self.node)
                except ValueError as exc:
                    raise TierError("-", REGISTRY, "config", str(exc)) from None
            return self._registry

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t for t in (RAM, DISK) if self.roots[t]) + ((REGISTRY,) if self.node.store_registry else ())

    def describe(self, tier: str) -> str:
        if tier == REGISTRY:
            return f"registry {self.node.store_registry}"
        return f"{tier} {self.roots[tier]}"

    # ---- where things are ---------------------------------------------------------------------
    def dir_of(self, tier: str, rec: Record) -> str:
        return os.path.join(self.roots[tier], *_scope_parts(rec.namespace, rec.pod_namespace, rec.name), rec.id)

    def tier_of_path(self, path: str) -> Optional[str]:
        """The directory tier an image dir lies in (by its real path), or None."""
        real = os.path.realpath(path)
        for tier in (RAM, DISK):
            root = self.roots[tier]
            if root and layout.within(real, os.path.realpath(root)) and real != os.path.realpath(root):
                return tier
        return None

    def used_bytes(self, tier: str, records: Optional[list[Record]] = None) -> int:
        return sum(r.bytes for r in (records if records is not None else self.catalog.records()) if r.holds(tier))

    def has_room(self, tier: str, estimate: int) -> tuple[bool, str]:
        root = self.roots[tier]
        if not root:
            return False, f"no {tier} tier"
        cap = self.caps[tier]
        if cap:
            used = self.used_bytes(tier)
            if used + estimate > cap:
                return False, (f"{tier} tier holds {used >> 20} MiB of its {cap >> 20} MiB cap, the checkpoint "
                               f"needs about {estimate >> 20} MiB")
        try:
            st = os.statvfs(root if os.path.isdir(root) else os.path.dirname(root) or "/")
            free = st.f_bavail * st.f_frsize
        except OSError as exc:
            return False, f"{tier} tier {root}: {exc.strerror}"
        if free < estimate * FREE_MARGIN:
            return False, f"{tier} tier {root} has {free >> 20} MiB free, the checkpoint needs about {estimate >> 20} MiB"
        return True, ""

    def place(self, namespace: str, pod_namespace: str, name, checkpoint_id: str, estimate: int,
              must_fit: bool = False) -> Placement:
        """The directory a new checkpoint goes to: tier 1 when it has room for ``estimate`` bytes,
        else tier 2 (its parents made, root's alone). ``must_fit`` (a pull, whose size is known):
        TierError ``full`` when tier 2 has no room either, before anything is written."""
        why = ""
        tier = DISK
        if self.roots[RAM]:
            ok, why = self.has_room(RAM, estimate)
            if not ok and self.make_room(RAM, estimate):
                ok, why = self.has_room(RAM, estimate)
            if ok:
                tier = RAM
        if tier == DISK and must_fit:
            ok, why_disk = self.has_room(DISK, estimate)
            if not ok:
                raise TierError(checkpoint_id, DISK, "full", f"no tier of this node has room for it: "
                                                             f"{why or 'no ram tier'}; {why_disk}")
        parent = layout.make_dirs(self.roots[tier], _scope_parts(namespace, pod_namespace, name))
        return Placement(tier, os.path.join(parent, checkpoint_id),
                         "" if tier == RAM else (f"tier 1 full: {why}; the checkpoint goes to tier 2" if why else ""))

    # ---- after a checkpoint -------------------------------------------------------------------
    def register(self, image_dir: str, namespace: str, pod_namespace: str, name, container_id: str,
                 rootfs_diff: bool = False) -> Optional[Record]:
        """Record a whole, sealed checkpoint that lies in a directory tier and queue its copies down
        (tier 2 when it is in tier 1; the registry when there is one). None when the directory is in
        no tier or its name is no checkpoint id (then nothing moves it)."""
        tier = self.tier_of_path(image_dir)
        checkpoint_id = os.path.basename(os.path.normpath(image_dir))
        if tier is None or not is_id(checkpoint_id):
            return None
        now = time.time()
        rec = Record(id=checkpoint_id, namespace=namespace, pod_namespace=pod_namespace, name=tuple(name),
                     container_id=container_id, created=now, last_used=now, bytes=image_bytes(image_dir),
                     gpu=os.path.lexists(os.path.join(image_dir, GPU_RECORD)),
                     sealed=os.path.lexists(os.path.join(image_dir, SEAL_MANIFEST)), rootfs_diff=rootfs_diff,
                     ram=tier == RAM, disk=tier == DISK)
        steps = tuple(s for s, wanted in ((DISK, tier == RAM and bool(self.roots[DISK])),
                                          (REGISTRY, bool(self.node.store_registry))) if wanted)
        with self.catalog.lock():
            self.catalog.put(rec)
            if steps:
                self.catalog.put_job(Job(id=checkpoint_id, steps=steps))
        return rec

    # ---- restore by id --------------------------------------------------------------------------
    def locate(self, checkpoint_id: str, namespace: str, pod_namespace: str,
               progress: Optional[Callable[[int, int], None]] = None) -> Located:
        """The checkpoint ``checkpoint_id`` for a container of scope (namespace, pod_namespace): in
        the fastest tier that holds it; from the registry it is pulled into tier 1 or 2 first.
        TierError: ``unknown`` (no tier holds it), ``foreign-scope`` (it is another scope's), and
        the registry's own (unreachable, unauthorized, missing-blob, corrupt, ...)."""
        if not is_id(checkpoint_id):
            raise TierError(str(checkpoint_id)[:80], "-", "malformed", "is not a checkpoint id")
        rec = self.catalog.get(checkpoint_id)
        if rec is not None:
            if (rec.namespace, rec.pod_namespace) != (namespace, pod_namespace):
                where = (rec.tiers or ("catalog",))[0]
                raise TierError(checkpoint_id, where, "foreign-scope",
                                f"belongs to scope {rec.scope_text}, not to this container's "
                                f"{namespace}/{pod_namespace or '_'}")
            for tier in (RAM, DISK):
                if rec.holds(tier) and self.roots[tier] and os.path.isdir(self.dir_of(tier, rec)):
                    self.catalog.update(checkpoint_id, last_used=time.time())
                    return self._located(tier, rec)
        else:
            found = self._find_untracked(checkpoint_id, namespace, pod_namespace)
            if found is not None:
                return found
        reg = self.registry()
        if reg is None:
            searched = ", ".join(self.describe(t) for t in self.tier_names)
            raise TierError(checkpoint_id, "any", "unknown", f"no such checkpoint on this node ({searched})")
        return self._pull(checkpoint_id, namespace, pod_namespace, progress)

    def _located(self, tier: str, rec: Record, pulled: bool = False) -> Located:
        scope_dir = os.path.join(self.roots[tier], rec.namespace, rec.pod_namespace or layout.NO_POD_NAMESPACE)
        return Located(tier, scope_dir, "/".join((*rec.name, rec.id)), pulled)

    def _find_untracked(self, checkpoint_id: str, namespace: str, pod_namespace: str) -> Optional[Located]:
        """An image of that id in the scope of a directory tier that the catalog does not know (a
        catalog that was lost, a copy an operator placed): found by name, no link followed."""
        for tier in (RAM, DISK):
            root = self.roots[tier]
            if not root:
                continue
            scope_dir = os.path.join(root, namespace, pod_namespace or layout.NO_POD_NAMESPACE)
            for first in _subdirs(scope_dir):
                for parent in (first, *_subdirs(first)):
                    candidate = os.path.join(parent, checkpoint_id)
                    if os.path.isdir(candidate) and not os.path.islink(candidate):
                        return Located(tier, scope_dir, os.path.relpath(candidate, scope_dir))
        return None

    def _pull(self, checkpoint_id: str, namespace: str, pod_namespace: str, progress) -> Located:
        from tiers.transfer import inspect, pull

        reg = self.registry()
        image = inspect(reg, checkpoint_id, (namespace, pod_namespace))
        placement = self.place(image.namespace, image.pod_namespace, image.name, checkpoint_id, image.total_bytes,
                               must_fit=True)
        if placement.why:
            log.info("checkpoint %s: %s", checkpoint_id, placement.why)
        started = time.monotonic()
        path = pull(reg, image, os.path.dirname(placement.path), self.node.store_parallel_transfers, progress)
        seconds = time.monotonic() - started
        log.info("checkpoint %s: pulled from %s into %s in %.2fs (%.2f GB/s)", checkpoint_id, reg, path, seconds,
                 image.total_bytes / max(seconds, 1e-6) / 1e9)
        now = time.time()
        rec = Record(id=checkpoint_id, namespace=image.namespace, pod_namespace=image.pod_namespace,
                     name=image.name, container_id=image.container_id, created=image.created or now, last_used=now,
                     bytes=image.total_bytes, gpu=image.gpu, sealed=image.sealed, rootfs_diff=image.rootfs_diff,
                     ram=placement.tier == RAM, disk=placement.tier == DISK, registry=image.manifest_digest)
        with self.catalog.lock():
            old = self.catalog.get(checkpoint_id)
            if old is not None:
                rec = replace(old, ram=old.ram or rec.ram, disk=old.disk or rec.disk, registry=rec.registry,
                              last_used=now)
            self.catalog.put(rec)
        return self._located(placement.tier, rec, pulled=True)

    # ---- the worker's steps -------------------------------------------------------------------
    def copy_down(self, rec: Record) -> Record:
        """Tier 1 -> tier 2: every file copied into a hidden directory beside the final one, synced,
        then renamed into place (a crash leaves a hidden directory that the next try removes)."""
        src = self.dir_of(RAM, rec)
        final = self.dir_of(DISK, rec)
        if not os.path.isdir(final):
            if not os.path.isdir(src):
                raise TierError(rec.id, RAM, "io", f"{src} is gone before it was copied to the disk tier")
            parent = layout.make_dirs(self.roots[DISK], _scope_parts(rec.namespace, rec.pod_namespace, rec.name))
            for stale in os.listdir(parent):
                if stale.startswith(f".copy-{rec.id}-"):
                    shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
            temp = os.path.join(parent, f".copy-{rec.id}-{os.getpid()}")
            os.mkdir(temp, 0o700)
            try:
                for name in sorted(os.listdir(src)):
                    s = os.path.join(src, name)
                    if not stat.S_ISREG(os.lstat(s).st_mode):
                        raise TierError(rec.id, RAM, "io", f"{s} is not a regular file")
                    shutil.copy2(s, os.path.join(temp, name), follow_symlinks=False)
                    fd = os.open(os.path.join(temp, name), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.rename(temp, final)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        return self.catalog.update(rec.id, disk=True) or replace(rec, disk=True)

    def local_copy(self, rec: Record) -> Optional[str]:
        for tier in (RAM, DISK):
            if rec.holds(tier) and self.roots[tier] and os.path.isdir(self.dir_of(tier, rec)):
                return self.dir_of(tier, rec)
        return None

    def push_to_registry(self, rec: Record, progress=None):
        from tiers.transfer import push

        src = self.local_copy(rec)
        if src is None:
            raise TierError(rec.id, DISK, "io", "no tier of this node holds the image to push")
        pushed = push(self.registry(), src, rec, self.node.store_chunk_mib << 20, self.node.store_parallel_transfers,
                      progress)
        self.catalog.update(rec.id, registry=pushed.manifest_digest, shared_bytes=pushed.shared_bytes)
        return pushed

    # ---- capacity and retention ---------------------------------------------------------------
    def drop_tier(self, rec: Record, tier: str) -> Record:
        if tier == REGISTRY:
            reg = self.registry()
            if reg is not None and rec.registry:
                reg.delete_manifest(rec.registry, rec.id)
            return self.catalog.update(rec.id, registry="") or replace(rec, registry="")
        path = self.dir_of(tier, rec)
        remove_image(path)
        return self.catalog.update(rec.id, **{tier: False}) or replace(rec, **{tier: False})

    def remove(self, rec: Record, registry_too: bool = True) -> list[str]:
        """Every copy of a checkpoint and its record: `kybernate checkpoints rm`, keep_last."""
        gone = []
        for tier in (RAM, DISK):
            if self.roots[tier] and os.path.isdir(self.dir_of(tier, rec)):
                remove_image(self.dir_of(tier, rec))
                gone.append(tier)
        if registry_too and rec.registry:
            try:
                self.drop_tier(rec, REGISTRY)
                gone.append(REGISTRY)
            except TierError as exc:
                log.warning("%s: kept in the registry", exc)
                self.catalog.update(rec.id, ram=False, disk=False)
                return gone
        with self.catalog.lock():
            self.catalog.remove(rec.id)
        return gone

    def make_room(self, tier: str, estimate: int, now: Optional[float] = None) -> list[Evicted]:
        """Room for ``estimate`` more bytes under a capped tier's cap: its least recently used
        images that a lower tier holds (and that were not used within min_idle_s) are evicted until
        it fits, or none is when even all of them would not make enough room."""
        cap = self.caps[tier]
        if not cap or not self.roots[tier]:
            return []
        now = time.time() if now is None else now
        lower = (DISK, REGISTRY) if tier == RAM else (REGISTRY,)
        records = self.catalog.records()
        used = self.used_bytes(tier, records)
        candidates = sorted((r for r in records if r.holds(tier)
                             and any(r.holds(t) for t in lower if t == REGISTRY or self.roots[t])
                             and now - r.last_used >= self.node.store_min_idle_s), key=lambda r: (r.last_used, r.id))
        if used - sum(r.bytes for r in candidates) + estimate > cap:
            return []
        out = []
        for r in candidates:
            if used + estimate <= cap:
                break
            self.drop_tier(r, tier)
            used -= r.bytes
            out.append(Evicted(r.id, tier, f"room for a new checkpoint of about {estimate >> 20} MiB under the "
                                           f"{tier} tier's cap of {cap >> 20} MiB (least recently used)"))
        for e in out:
            log.info("checkpoint %s: evicted from the %s tier: %s", e.checkpoint_id, e.tier, e.why)
        return out

    def evict(self, now: Optional[float] = None) -> list[Evicted]:
        """keep_last per container (older checkpoints removed from every tier), then each capped
        directory tier brought under its cap, least recently used first, taking only images that a
        lower tier holds and that were not used within min_idle_s."""
        now = time.time() if now is None else now
        out: list[Evicted] = []
        records = self.catalog.records()
        if self.node.store_keep_last:
            by_container: dict = {}
            for r in records:
                by_container.setdefault(r.container_key, []).append(r)
            for group in by_container.values():
                group.sort(key=lambda r: (r.created, r.id), reverse=True)
                for r in group[self.node.store_keep_last:]:
                    if self.catalog.job(r.id) is not None:
                        continue  # still being copied: next round
                    for tier in self.remove(r):
                        out.append(Evicted(r.id, tier, f"keep_last {self.node.store_keep_last}"))
            records = self.catalog.records()
        for tier, lower in ((RAM, (DISK, REGISTRY)), (DISK, (REGISTRY,))):
            cap = self.caps[tier]
            if not cap or not self.roots[tier]:
                continue
            used = self.used_bytes(tier, records)
            for r in sorted((r for r in records if r.holds(tier)), key=lambda r: (r.last_used, r.id)):
                if used <= cap:
                    break
                if not any(r.holds(t) for t in lower if t == REGISTRY or self.roots[t]):
                    continue  # nothing below holds it: never evicted
                if now - r.last_used < self.node.store_min_idle_s:
                    continue
                self.drop_tier(r, tier)
                used -= r.bytes
                out.append(Evicted(r.id, tier, f"{tier} tier over its cap of {cap >> 20} MiB (least recently used)"))
            records = self.catalog.records()
        for e in out:
            log.info("checkpoint %s: evicted from the %s tier: %s", e.checkpoint_id, e.tier, e.why)
        return out
